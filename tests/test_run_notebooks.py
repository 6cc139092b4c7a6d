"""The notebook runner behind ``make reports``: parameters checked, bars in their final state, no absolute paths."""

from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import pytest

from aimonk import config
from aimonk.run_notebooks import (ParameterError, find_notebooks, main, notebook_parameters, parse_value,
                                  path_replacements, run, scrub_paths, terminal_text, tidy_report)

KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


def tiny_notebook(path: Path, *sources: str) -> Path:
    """A notebook whose first cell is the parameters cell."""
    nb = nbformat.v4.new_notebook(metadata=KERNEL)
    nb.cells = [nbformat.v4.new_code_cell(sources[0], metadata={"tags": ["parameters"]}),
                *(nbformat.v4.new_code_cell(s) for s in sources[1:])]
    nbformat.write(nb, path)
    return path


def test_find_notebooks_default_is_the_numbered_five_in_order():
    assert [nb.stem for nb in find_notebooks()] == ["01_explore", "02_train", "03_evaluate", "04_infer", "05_audit"]
    assert find_notebooks(["02_train"]) == [config.PROJECT_ROOT / "notebooks" / "02_train.ipynb"]
    with pytest.raises(FileNotFoundError, match="02_trian"):
        find_notebooks(["02_trian"])


@pytest.mark.parametrize("argv, expected", [
    (["-p", "epoch", "5"], ["unknown parameter epoch", "did you mean epochs?", "batch_size", "data_dir", "n_boot"]),
    (["-p", "epochs", "five"], ["02_train.ipynb: parameter epochs: expected int, got 'five'"]),
    (["-p", "n_boot", "10", "-p", "colour", "red"], ["unknown parameter colour;", "n_perm"]),
])
def test_a_bad_parameter_stops_the_run_before_anything_executes(argv, expected, tmp_path, capsys):
    status = main([*argv, "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err
    assert not list(tmp_path.iterdir())  # no notebook ran


def test_each_notebook_gets_only_the_parameters_it_declares():
    params = notebook_parameters(find_notebooks(), {"data_dir": "data/sample", "epochs": "2", "n_boot": "10"})
    by_stem = {nb.stem: p for nb, p in params.items()}
    assert by_stem["01_explore"] == {"data_dir": "data/sample"}
    assert by_stem["02_train"] == {"data_dir": "data/sample", "epochs": 2}
    assert by_stem["03_evaluate"] == {"data_dir": "data/sample", "n_boot": 10}
    assert by_stem["05_audit"] == {"data_dir": "data/sample"}


@pytest.mark.parametrize("text, type_name, value", [
    ("5", "int", 5), ("5", "float", 5.0), ("1e-3", "float", 0.001), ("None", "int", None),
    ("2024", "str", "2024"), ("None", "str", None), ("True", "bool", True), ("0.5", "Optional[float]", 0.5),
    ("resnet18", "None", "resnet18"),
])
def test_parse_value_follows_papermill_and_the_declared_type(text, type_name, value):
    assert parse_value(text, type_name) == value
    assert type(parse_value(text, type_name)) is type(value)


def test_parse_value_refuses_text_for_a_number():
    with pytest.raises(ParameterError, match="expected float, got 'fast'"):
        parse_value("fast", "float")


@pytest.mark.parametrize("text, shown", [
    ("plain\ntext\n", "plain\ntext\n"),
    ("\r 0%|  | 0/3\r 33%|# | 1/3\r100%|##| 3/3\n", "100%|##| 3/3\n"),
    # tqdm's nested bars: the inner one (leave=False) on the next line, reached by \n and left by ESC[A
    ("\rtraining:   0%| 0/2\n\repoch 1:  50%| 1/2\x1b[A\n\repoch 1: 100%| 2/2\x1b[A\n\r                  \x1b[A"
     "\rtraining: 100%| 2/2", "training: 100%| 2/2\n"),
    ("\r   \r", ""),
])
def test_terminal_text_keeps_what_a_terminal_shows(text, shown):
    assert terminal_text(text) == shown


def test_path_replacements_cover_the_repository_home_and_an_outside_data_folder(tmp_path):
    pairs = dict(path_replacements(tmp_path))
    assert pairs[str(config.PROJECT_ROOT)] == "<repo>"
    assert pairs[str(Path.home())] == "~"
    assert pairs[str(tmp_path.resolve())] == "<data>"
    assert "<data>" not in dict(path_replacements("data/sample")).values()  # inside the repository
    lengths = [len(path) for path, _ in path_replacements(tmp_path)]
    assert lengths == sorted(lengths, reverse=True)  # /a/b is replaced before /a


def test_tidy_report_scrubs_paths_everywhere_but_in_images_and_keeps_final_bars(tmp_path):
    repo, data = str(config.PROJECT_ROOT), "/srv/shared/data"
    png = base64.b64encode(f"{repo}/not text".encode()).decode()  # stands for image bytes: left alone
    nb = nbformat.v4.new_notebook(metadata={"papermill": {"input_path": f"{repo}/notebooks/x.ipynb",
                                                          "parameters": {"data_dir": data}}})
    nb.cells = [nbformat.v4.new_code_cell(f'data_dir = "{data}"', outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="\r 0%| 0/4"),
        nbformat.v4.new_output("stream", name="stderr", text="\r100%| 4/4"),
        nbformat.v4.new_output("stream", name="stderr", text=f"\n{repo}/aimonk/train.py:3: UserWarning\n"),
        nbformat.v4.new_output("execute_result", execution_count=1, data={
            "text/plain": f"PosixPath('{data}/images') {repo}x {Path.home()}/.cache/aimonk", "image/png": png}),
    ])]
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    tidy_report(path, [(data, "<data>"), (repo, "<repo>"), (str(Path.home()), "~")])
    out = nbformat.read(path, as_version=4)
    cell = out.cells[0]
    assert out.metadata.papermill == {"input_path": "<repo>/notebooks/x.ipynb", "parameters": {"data_dir": "<data>"}}
    assert cell.source == 'data_dir = "<data>"'
    assert [o.get("text") for o in cell.outputs[:1]] == ["100%| 4/4\n<repo>/aimonk/train.py:3: UserWarning\n"]
    assert cell.outputs[1].data["text/plain"] == f"PosixPath('<data>/images') {repo}x ~/.cache/aimonk"
    assert cell.outputs[1].data["image/png"] == png


def test_scrub_paths_replaces_whole_paths_only():
    assert scrub_paths(["/a/b", "/a/b/c", "/a/bc", "(/a/b)"], [("/a/b", "<repo>")]) == \
        ["<repo>", "<repo>/c", "/a/bc", "(<repo>)"]


@pytest.mark.slow
def test_a_run_stores_the_text_bar_in_its_final_state(tmp_path, capsys):
    nb = tiny_notebook(tmp_path / "tiny.ipynb", "n: int = 2  # steps",
                       "from aimonk.progress import tqdm\nfor _ in tqdm(range(n), desc='steps'):\n    pass",
                       "import os\nos.getcwd()")
    [out] = run([nb], {"n": "3"}, tmp_path / "reports")
    assert "steps: 100%" in capsys.readouterr().err  # streamed while it ran
    cells = nbformat.read(out, as_version=4).cells
    [bar] = [o for o in cells[2].outputs if o.output_type == "stream"]
    assert bar.text.startswith("steps: 100%") and "3/3" in bar.text and "\r" not in bar.text
    assert "0%" not in bar.text.replace("100%", "")
    assert cells[3].outputs[0].data["text/plain"] == scrub_paths(repr(str(tmp_path)), path_replacements())  # its folder
