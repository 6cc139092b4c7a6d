"""predict: the seed output format, input kinds, thresholds and decisions, determinism and model caching."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from aimonk.checkpoint import CheckpointError, update_checkpoint
from aimonk.data import ImageLoadError
from aimonk.predict import PredictionResult, Predictor, get_predictor, list_images, predict

PROBS = [0.9, 0.2, 0.4, 0.7]  # what the constant model says for every image


def png_bytes(color=(10, 120, 250), size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "image_0.jpg"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(path, "JPEG")
    return path


@pytest.fixture(scope="module")
def constant(make_constant_checkpoint, tmp_path_factory):
    """A Predictor that says PROBS for every image (shared: tests must not change it)."""
    return Predictor(make_constant_checkpoint(PROBS, tmp_path_factory.mktemp("constant") / "model.pth"), device="cpu")


def test_str_is_exactly_the_two_seed_lines(constant, image_file):
    result = constant.predict(image_file)
    assert str(result) == "Image: image_0.jpg\nAttributes present: ['Attr1', 'Attr4']"
    assert result.present == ["Attr1", "Attr4"]
    assert result.image == "image_0.jpg"
    assert list(result.probabilities) == ["Attr1", "Attr2", "Attr3", "Attr4"]
    np.testing.assert_allclose(list(result.probabilities.values()), PROBS, atol=0.01)
    assert result.thresholds == {a: 0.5 for a in ["Attr1", "Attr2", "Attr3", "Attr4"]}
    assert result.error is None


@pytest.mark.parametrize(
    ("present", "expected"),
    [([], "Attributes present: []"), (["Attr2"], "Attributes present: ['Attr2']"),
     (["Attr1", "Attr2", "Attr3", "Attr4"], "Attributes present: ['Attr1', 'Attr2', 'Attr3', 'Attr4']")],
)
def test_result_format_for_any_present_list(present, expected):
    result = PredictionResult("image_7.jpg", present, {})
    assert str(result) == f"Image: image_7.jpg\n{expected}"
    assert result.to_dict()["present"] == present


def test_predict_function_prints_the_seed_format(constant, image_file, capsys):
    result = predict(image_file, model=constant)
    assert capsys.readouterr().out == "Image: image_0.jpg\nAttributes present: ['Attr1', 'Attr4']\n"
    assert isinstance(result, PredictionResult)
    predict(image_file, model=constant, show=False)
    assert capsys.readouterr().out == ""


def test_predict_with_a_model_path_uses_the_cached_predictor(constant_checkpoint, image_file, capsys):
    path = constant_checkpoint(PROBS)
    result = predict(str(image_file), model=path)
    assert result.present == ["Attr1", "Attr4"]
    assert get_predictor(path) is get_predictor(str(path))


@pytest.mark.parametrize("kind", ["path", "str", "pil", "bytes", "bytearray", "file object"])
def test_accepts_a_path_a_pil_image_and_bytes(constant, image_file, kind):
    data = image_file.read_bytes()
    source = {
        "path": image_file, "str": str(image_file), "pil": Image.open(image_file), "bytes": data,
        "bytearray": bytearray(data), "file object": io.BytesIO(data),
    }[kind]
    result = constant.predict(source)
    assert result.present == ["Attr1", "Attr4"]
    expected_name = {"path": "image_0.jpg", "str": "image_0.jpg", "pil": "image_0.jpg"}.get(kind)
    if expected_name:
        assert result.image == expected_name
    assert constant.predict(source if kind not in ("file object", "pil") else io.BytesIO(data),
                            name="upload.jpg").image == "upload.jpg"


def test_in_memory_pil_and_bytes_get_a_placeholder_name(constant):
    assert constant.predict(Image.new("RGBA", (20, 20))).image == "<image>"
    assert constant.predict(png_bytes()).image == "<image>"


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [(None, ["Attr1", "Attr4"]), (0.1, ["Attr1", "Attr2", "Attr3", "Attr4"]), (0.3, ["Attr1", "Attr3", "Attr4"]),
     (0.8, ["Attr1"]), (0.95, [])],
)
def test_threshold_override_applies_to_every_attribute(constant, image_file, threshold, expected):
    result = constant.predict(image_file, threshold=threshold)
    assert result.present == expected
    if threshold is not None:
        assert set(result.thresholds.values()) == {threshold}


def test_checkpoint_thresholds_are_used(constant_checkpoint, image_file):
    path = constant_checkpoint(PROBS, thresholds=[0.95, 0.1, 0.5, 0.8])
    assert Predictor(path).predict(image_file).present == ["Attr2"]


def test_checkpoint_majority_decisions_are_applied(constant_checkpoint, image_file):
    path = constant_checkpoint(PROBS, decision=["majority_absent", "majority_present", "threshold", "threshold"])
    predictor = Predictor(path)
    # Attr1 (p=0.9) is forced absent, Attr2 (p=0.2) forced present, Attr3/Attr4 use their 0.5 thresholds.
    assert predictor.predict(image_file).present == ["Attr2", "Attr4"]
    assert predictor.predict(image_file, threshold=0.5).present == ["Attr1", "Attr4"]  # an explicit threshold wins


def test_a_checkpoint_without_decisions_uses_thresholds(constant_checkpoint, image_file, tmp_path):
    path = constant_checkpoint(PROBS)
    meta_less = update_checkpoint(path, decision=[])
    assert meta_less.decision == [] and meta_less.decisions == ["threshold"] * 4
    assert Predictor(path).predict(image_file).present == ["Attr1", "Attr4"]


def test_named_attributes_come_from_the_checkpoint(constant_checkpoint, image_file):
    names = ["blue", "light", "striped", "red_square"]
    result = Predictor(constant_checkpoint(PROBS, attributes=names)).predict(image_file)
    assert str(result) == "Image: image_0.jpg\nAttributes present: ['blue', 'red_square']"


def test_prediction_is_deterministic(trained, image_file):
    predictor = Predictor(trained.checkpoint)
    first = predictor.predict(image_file)
    second = predictor.predict(image_file)
    assert first.probabilities == second.probabilities
    pixels = torch.from_numpy(np.array(Image.open(image_file).resize((32, 32)))).permute(2, 0, 1)  # (3, 32, 32)
    probs = predictor.probabilities(torch.stack([pixels, pixels]))  # (2, 4)
    np.testing.assert_array_equal(probs[0], probs[1])
    assert not predictor.model.training


def test_predict_many_matches_predict_one_by_one(trained, sample_dir):
    predictor = Predictor(trained.checkpoint)
    paths = [sample_dir / "images" / f"image_{i}.jpg" for i in (0, 7, 19, 29)]  # RGB, L, RGBA and P files
    batch = predictor.predict_many(paths, batch_size=3)
    assert [r.image for r in batch] == [p.name for p in paths]
    for path, result in zip(paths, batch):
        single = predictor.predict(path)
        assert result.present == single.present
        np.testing.assert_allclose(list(result.probabilities.values()), list(single.probabilities.values()), atol=2e-3)


def test_predict_many_over_a_folder_reports_only_the_unreadable_file(constant, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (30, 30), (i * 80, 10, 10)).save(folder / f"ok_{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    paths = list_images([folder])
    assert [p.name for p in paths] == ["broken.jpg", "ok_0.jpg", "ok_1.jpg", "ok_2.jpg"]
    results = constant.predict_many(paths, batch_size=2)
    assert [r.image for r in results] == ["broken.jpg", "ok_0.jpg", "ok_1.jpg", "ok_2.jpg"]
    broken, *good = results
    assert broken.error and "broken.jpg" in broken.error and "not a recognised image" in broken.error
    assert broken.present == [] and broken.probabilities == {}
    assert str(broken).startswith("Image: broken.jpg\nError: ")
    assert all(r.error is None and r.present == ["Attr1", "Attr4"] for r in good)


def test_list_images_keeps_files_and_expands_folders_recursively(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/x.PNG", "a/b/y.jpeg", "a/z.txt"]:
        (tmp_path / name).write_bytes(b"")
    single = tmp_path / "single.gif"
    assert list_images([single, tmp_path / "a"]) == [single, tmp_path / "a" / "b" / "y.jpeg", tmp_path / "a" / "x.PNG"]


def test_an_unreadable_image_raises_naming_it(constant, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        constant.predict(bad)


# --------------------------------------------------------------------------- loading once


def test_get_predictor_loads_once_and_reloads_when_the_file_changes(constant_checkpoint, image_file, monkeypatch):
    path = constant_checkpoint(PROBS)
    loads = []
    import aimonk.inference as predict_module

    real = predict_module.load_checkpoint

    def counting(p):
        loads.append(p)
        return real(p)

    monkeypatch.setattr(predict_module, "load_checkpoint", counting)
    first = get_predictor(path)
    assert get_predictor(path) is first
    for _ in range(3):
        predict(image_file, model=path, show=False)
    assert len(loads) == 1

    constant_checkpoint([0.1, 0.9, 0.9, 0.1], path=path)  # retrained: the file is replaced
    second = get_predictor(path)
    assert second is not first
    assert len(loads) == 2
    assert predict(image_file, model=path, show=False).present == ["Attr2", "Attr3"]


def test_get_predictor_notices_a_replacement_with_the_same_mtime(constant_checkpoint, image_file):
    path = constant_checkpoint(PROBS)
    first = get_predictor(path)
    stamp = os.stat(path).st_mtime_ns
    other = constant_checkpoint([0.1, 0.9, 0.9, 0.1], path=path.with_name("other.pth"))
    shutil.copyfile(other, path)
    os.utime(path, ns=(stamp, stamp))  # a copy that kept the old timestamp (e.g. cp -p, rsync -t)
    assert get_predictor(path) is not first
    assert get_predictor(path).predict(image_file).present == ["Attr2", "Attr3"]


def test_get_predictor_on_a_missing_model_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="model file not found"):
        get_predictor(tmp_path / "model.pth")
