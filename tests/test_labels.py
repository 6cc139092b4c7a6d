"""The strict labels.txt parser and matching labels against images/."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from aimonk.data import NA, LabelFileError, index_dataset, parse_labels


def write(tmp_path, text: str | bytes, name: str = "labels.txt"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, newline="")
    return path


# --------------------------------------------------------------------------- good files

GOOD = {
    "spaces": "a.jpg 1 0 NA 1\nb.jpg 0 1 1 0\n",
    "tabs and runs of spaces": "a.jpg\t1  0\tNA   1\n  b.jpg 0 1\t1 0  \n",
    "crlf": "a.jpg 1 0 NA 1\r\nb.jpg 0 1 1 0\r\n",
    "no final newline": "a.jpg 1 0 NA 1\nb.jpg 0 1 1 0",
    "blank lines": "\n\na.jpg 1 0 NA 1\n   \n\t\nb.jpg 0 1 1 0\n\n",
    "na spellings": "a.jpg 1 0 na 1\nb.jpg 0 1 1 0\n",
    "NaN": "a.jpg 1 0 NaN 1\nb.jpg 0 1 1 0\n",
    "N/A": "a.jpg 1 0 N/A 1\nb.jpg 0 1 1 0\n",
    "utf-8 bom": "\ufeffa.jpg 1 0 NA 1\nb.jpg 0 1 1 0\n",
}


@pytest.mark.parametrize("text", GOOD.values(), ids=GOOD.keys())
def test_good_variants_parse_to_the_same_table(tmp_path, text):
    table = parse_labels(write(tmp_path, text))
    assert table.names == ["a.jpg", "b.jpg"]
    assert table.attributes == ["Attr1", "Attr2", "Attr3", "Attr4"]
    np.testing.assert_array_equal(table.targets, [[1, 0, NA, 1], [0, 1, 1, 0]])
    assert table.targets.dtype == np.float32


def test_na_is_minus_one_and_line_numbers_are_kept(tmp_path):
    table = parse_labels(write(tmp_path, "\na.jpg NA NA 1 0\n\nb.jpg 1 1 0 0\n"))
    assert NA == -1.0
    assert table.targets[0, 0] == -1.0 and table.targets[0, 1] == -1.0
    assert table.line_numbers == [2, 4]
    assert table.counts()["Attr1"] == {"1": 1, "0": 0, "NA": 1}


@pytest.mark.parametrize("n", [1, 2, 6])
def test_attribute_count_comes_from_the_file(tmp_path, n):
    rng = np.random.default_rng(n)
    values = rng.integers(0, 2, (3, n))
    text = "".join(f"img_{i}.png " + " ".join(map(str, row)) + "\n" for i, row in enumerate(values))
    table = parse_labels(write(tmp_path, text))
    assert table.attributes == [f"Attr{j + 1}" for j in range(n)]
    assert table.targets.shape == (3, n)
    np.testing.assert_array_equal(table.targets, values)


def test_header_line_names_the_attributes(tmp_path):
    text = "image blue light striped red_square\na.jpg 1 0 NA 1\nb.jpg 0 1 1 0\n"
    table = parse_labels(write(tmp_path, text))
    assert table.attributes == ["blue", "light", "striped", "red_square"]
    assert table.names == ["a.jpg", "b.jpg"]
    assert table.line_numbers == [2, 3]


def test_header_after_blank_lines_and_with_six_attributes(tmp_path):
    text = "\nfile a b c d e f\nx.jpg 1 0 1 0 1 NA\n"
    table = parse_labels(write(tmp_path, text))
    assert table.attributes == list("abcdef")
    np.testing.assert_array_equal(table.targets, [[1, 0, 1, 0, 1, NA]])


def test_explicit_attribute_names_override_the_default(tmp_path):
    table = parse_labels(write(tmp_path, "a.jpg 1 0\n"), attributes=["x", "y"])
    assert table.attributes == ["x", "y"]


def test_names_in_subfolders_are_allowed(tmp_path):
    table = parse_labels(write(tmp_path, "sub/a.jpg 1 0\nsub/deeper/b.jpg 0 1\n"))
    assert table.names == ["sub/a.jpg", "sub/deeper/b.jpg"]


def test_subset_keeps_rows_and_line_numbers(tmp_path):
    table = parse_labels(write(tmp_path, "a.jpg 1 0\nb.jpg 0 1\nc.jpg NA 1\n"))
    sub = table.subset([2, 0])
    assert sub.names == ["c.jpg", "a.jpg"]
    assert sub.line_numbers == [3, 1]
    np.testing.assert_array_equal(sub.targets, [[NA, 1], [1, 0]])


# --------------------------------------------------------------------------- bad files

# (file text, the line the error must name, a pattern the message must contain)
BAD = {
    "too few labels": ("a.jpg 1 0 NA 1\nb.jpg 1 0 1\n", 2, r"expected 4 labels after the file name, got 3"),
    "too many labels": ("a.jpg 1 0\nb.jpg 1 0 1\n", 2, r"expected 2 labels after the file name, got 3"),
    "name only": ("a.jpg 1 0\n\nb.jpg\n", 3, r"expected 2 labels after the file name, got 0"),
    "only a name on the first line": ("a.jpg\n", 1, r"expected a file name followed by label tokens"),
    "space in a file name": ("a.jpg 1 0\nmy image.jpg 1 0\n", 2, r"got 3 \(file names may not contain spaces\)"),
    "token 2": ("a.jpg 1 0 NA 1\nb.jpg 1 2 0 1\n", 2, r"label 2 is '2'; expected 1, 0 or NA"),
    "token 1mobilenet": ("a.jpg 1mobilenet 0 NA 1\n", 1, r"label 1 is '1mobilenet'; expected 1, 0 or NA"),
    "token 1.0": ("a.jpg 1 0\nb.jpg 1.0 0\n", 2, r"label 1 is '1.0'; expected 1, 0 or NA"),
    "token -1": ("a.jpg 1 0\nb.jpg 1 -1\n", 2, r"label 2 is '-1'; expected 1, 0 or NA"),
    "token yes": ("a.jpg 1 0\nb.jpg yes 0\n", 2, r"label 1 is 'yes'; expected 1, 0 or NA"),
    "duplicate name": ("a.jpg 1 0\nb.jpg 0 1\na.jpg 1 1\n", 3, r"duplicate image name 'a.jpg' \(first seen on line 1\)"),
    "absolute path": ("a.jpg 1 0\n/etc/passwd 1 0\n", 2, r"absolute path"),
    "windows absolute path": ("a.jpg 1 0\nC:\\x\\b.jpg 1 0\n", 2, r"absolute path"),
    "parent folder": ("a.jpg 1 0\n../b.jpg 1 0\n", 2, r"contains '\.\.'"),
    "parent folder inside": ("a.jpg 1 0\nsub/../../b.jpg 1 0\n", 2, r"contains '\.\.'"),
    "header with wrong count": ("image A B C\na.jpg 1 0 1 1\n", 2, r"expected 3 labels after the file name, got 4"),
    "header naming an attribute twice": ("image A B A\na.jpg 1 0 1\n", 1, r"attribute\(s\) \['A'\] more than once"),
    # An image row of words is bad labels, not a header that would silently swallow the row.
    "first row of words": ("a.jpg yes no yes no\nb.jpg 1 0 1 0\n", 1, r"label 1 is 'yes'; expected 1, 0 or NA"),
    "first row of words, png": ("x/a.PNG present absent\n", 1, r"label 1 is 'present'; expected 1, 0 or NA"),
}


@pytest.mark.parametrize(("text", "line", "pattern"), BAD.values(), ids=BAD.keys())
def test_bad_lines_name_the_file_the_line_and_what_was_expected(tmp_path, text, line, pattern):
    path = write(tmp_path, text)
    with pytest.raises(LabelFileError) as info:
        parse_labels(path)
    message = str(info.value)
    assert message.startswith(f"{path} line {line}: "), message
    assert re.search(pattern, message), message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["", "\n\n  \n", "image A B C D\n"], ids=["empty", "blank", "header only"])
def test_a_file_without_label_rows_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(LabelFileError, match=re.escape(str(path)) + r": no label rows found"):
        parse_labels(path)


def test_missing_and_non_utf8_files_are_label_errors(tmp_path):
    with pytest.raises(LabelFileError, match="labels file not found"):
        parse_labels(tmp_path / "nope.txt")
    with pytest.raises(LabelFileError, match="not UTF-8"):
        parse_labels(write(tmp_path, b"a.jpg 1 0\n\xff\xfe 1 0\n"))


def test_explicit_attributes_must_match_the_file(tmp_path):
    with pytest.raises(LabelFileError, match="line 1: expected 3 labels after the file name, got 2"):
        parse_labels(write(tmp_path, "a.jpg 1 0\n"), attributes=["x", "y", "z"])


def test_the_embedded_sample_parses(sample_dir):
    table = parse_labels(sample_dir / "labels.txt")
    assert len(table) == 202
    assert table.attributes == ["Attr1", "Attr2", "Attr3", "Attr4"]
    assert set(np.unique(table.targets)) <= {-1.0, 0.0, 1.0}


# --------------------------------------------------------------------------- index_dataset


def make_folder(tmp_path, labels: str, images: list[str]):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels.txt").write_text(labels)
    for name in images:
        p = root / "images" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"not decoded by index_dataset")
    return root


def test_missing_images_are_skipped_with_one_warning_listing_them(tmp_path):
    root = make_folder(tmp_path, "a.jpg 1 0\ngone1.jpg 0 1\nb.jpg NA 1\ngone2.jpg 1 1\n", ["a.jpg", "b.jpg"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = index_dataset(root)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "2 labelled image(s) not found" in messages[0]
    assert "gone1.jpg" in messages[0] and "gone2.jpg" in messages[0]
    assert index.missing == ["gone1.jpg", "gone2.jpg"]
    assert index.table.names == ["a.jpg", "b.jpg"]
    assert [p.name for p in index.paths] == ["a.jpg", "b.jpg"]
    np.testing.assert_array_equal(index.table.targets, [[1, 0], [NA, 1]])
    assert index.table.line_numbers == [1, 3]


def test_unlisted_images_are_counted_and_ignored(tmp_path):
    root = make_folder(tmp_path, "a.jpg 1 0\n", ["a.jpg", "extra1.jpg", "sub/extra2.png", ".hidden"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing: no warning at all
        index = index_dataset(root)
    assert index.unlisted == ["extra1.jpg", "sub/extra2.png"]
    assert index.missing == []
    assert len(index.table) == 1


def test_no_warning_when_warn_is_false(tmp_path):
    root = make_folder(tmp_path, "a.jpg 1 0\ngone.jpg 0 1\n", ["a.jpg"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = index_dataset(root, warn=False)
    assert index.missing == ["gone.jpg"]


def test_the_sample_has_one_missing_and_one_unlisted_image(sample_dir):
    with pytest.warns(UserWarning, match=r"1 labelled image\(s\) not found .*image_201\.jpg"):
        index = index_dataset(sample_dir)
    assert index.missing == ["image_201.jpg"]
    assert index.unlisted == ["unlisted_0.jpg"]
    assert len(index.table) == 201


@pytest.mark.parametrize(
    ("setup", "pattern"),
    [
        (lambda root: None, "data folder not found"),
        (lambda root: (root.mkdir(), (root / "images").mkdir()), "labels file not found"),
        (lambda root: (root.mkdir(), (root / "labels.txt").write_text("a.jpg 1\n")), "images folder not found"),
    ],
    ids=["no folder", "no labels.txt", "no images/"],
)
def test_incomplete_folders_say_what_is_missing(tmp_path, setup, pattern):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(FileNotFoundError, match=pattern):
        index_dataset(root)


def test_no_labelled_image_present_is_an_error(tmp_path):
    root = make_folder(tmp_path, "a.jpg 1 0\n", [])
    with pytest.warns(UserWarning), pytest.raises(LabelFileError, match="none of the 1 labelled images exist"):
        index_dataset(root)


def test_a_symlink_escaping_images_is_refused(tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    root = make_folder(tmp_path, "a.jpg 1 0\nlink.jpg 0 1\n", ["a.jpg"])
    (root / "images" / "link.jpg").symlink_to(outside)
    with pytest.raises(LabelFileError, match=r"line 2: 'link.jpg' points outside"):
        index_dataset(root)
