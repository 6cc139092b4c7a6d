"""Each notebook is paired with a percent-format .py (jupytext.toml): both hold the same cells, the
committed .ipynb has no outputs, and the first code cell is the tagged parameters cell.

After editing either file, ``make notebooks`` syncs the pair and strips the outputs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from jupyter_server.services.contents.filemanager import FileContentsManager
from jupytext.config import find_jupytext_configuration_file, load_jupytext_configuration_file
from jupytext.sync_contentsmanager import build_sync_jupytext_contents_manager_class

from aimonk import config

NOTEBOOKS_DIR = config.PROJECT_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
FIX = "run `make notebooks` to sync the pair and strip outputs"


def cells(nb) -> list[tuple[str, str, list[str]]]:
    """What a pair must agree on: each cell's type, source and tags."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def test_every_notebook_has_its_py_and_every_py_its_notebook():
    assert [p.stem for p in NOTEBOOKS] == ["01_explore", "02_train", "03_evaluate", "04_infer", "05_audit"]
    assert sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.py")) == [p.stem for p in NOTEBOOKS]


def test_jupytext_toml_pairs_the_notebooks_with_percent_scripts():
    # What JupyterLab's jupytext contents manager and `jupytext --sync` read.
    conf = load_jupytext_configuration_file(find_jupytext_configuration_file(str(NOTEBOOKS_DIR)))
    for path in NOTEBOOKS:
        assert conf.default_formats(str(path)) == "notebooks///ipynb,notebooks///py:percent"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_pair_holds_the_same_cells(path: Path):
    ipynb = jupytext.read(path)
    py = jupytext.read(path.with_suffix(".py"), fmt="py:percent")
    assert cells(py) == cells(ipynb), f"{path.name} and {path.stem}.py differ: {FIX}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_committed_notebook_has_no_outputs(path: Path):
    nb = jupytext.read(path)
    executed = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not executed, f"{path.name}: cells {executed} hold outputs or execution counts: {FIX}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_first_code_cell_alone_is_tagged_parameters(path: Path):
    nb = jupytext.read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert tagged == code[:1], f"{path.name}: the first code cell, and only it, must be tagged parameters"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cell_ids_are_unique(path: Path):
    ids = [c.id for c in jupytext.read(path).cells]
    assert len(set(ids)) == len(ids), f"{path.name}: repeated cell ids"


def test_jupyterlab_edits_reach_the_py_and_py_edits_reach_the_notebook(tmp_path):
    # JupyterLab saves through jupytext's contents manager, which reads jupytext.toml.
    shutil.copy(config.PROJECT_ROOT / "jupytext.toml", tmp_path)
    (tmp_path / "notebooks").mkdir()
    for path in NOTEBOOKS_DIR.glob("04_infer.*"):
        shutil.copy(path, tmp_path / "notebooks")
    cm = build_sync_jupytext_contents_manager_class(FileContentsManager)(root_dir=str(tmp_path))
    name = "notebooks/04_infer.ipynb"
    nb = cm.get(name)["content"]
    ids = [c.id for c in nb.cells]
    nb.cells.insert(2, nbformat.v4.new_markdown_cell("Added in JupyterLab"))
    nb.cells[-1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="ran\n")]
    cm.save({"type": "notebook", "content": nb}, name)
    py = tmp_path / "notebooks" / "04_infer.py"
    assert "# Added in JupyterLab" in py.read_text()

    time.sleep(1.1)  # the .py must be newer to be read as the source of the cells
    py.write_text(py.read_text().replace("Added in JupyterLab", "Edited as text"))
    nb = cm.get(name)["content"]
    assert nb.cells[2].source == "Edited as text"
    assert [c.id for c in nb.cells if c.id in ids] == ids  # the other cells keep their ids
    assert nb.cells[-1].outputs[0].text == "ran\n"  # and their outputs
