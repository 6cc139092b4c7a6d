"""The package is layered: a module imports only modules of lower layers, so there is no import cycle.

Bottom to top; modules in one layer do not import each other. A package's ``__init__`` re-exports its
own modules, which are layered among themselves in the same way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aimonk"

LAYERS = [
    # paths, constants, file primitives; reading and showing user paths safely
    ["aimonk", "aimonk.config", "aimonk.progress", "aimonk.files", "aimonk.data.paths"],
    ["aimonk.data.labels", "aimonk.data.images", "aimonk.data.splits", "aimonk.sample"],
    ["aimonk.data.folder"],
    ["aimonk.data"],
    ["aimonk.cache", "aimonk.losses", "aimonk.metrics", "aimonk.plots", "aimonk.distributed"],
    ["aimonk.model", "aimonk.explore"],  # networks; the dataset health report
    ["aimonk.runtime", "aimonk.checkpoint", "aimonk.review"],  # device and precision; the checkpoint schema; label review files
    ["aimonk.int8", "aimonk.artifact"],  # int8 torch models; the exported ONNX file, sealed with its metadata
    ["aimonk.backends"],  # ONNX Runtime and OpenVINO sessions of an exported file
    ["aimonk.inference"],  # the engine: Predictor
    ["aimonk.features"],  # frozen pretrained features, cached on disk
    ["aimonk.probe", "aimonk.evaluate"],
    ["aimonk.train.config"],
    ["aimonk.train.loop"],
    ["aimonk.train.resume"],
    ["aimonk.train.run"],
    ["aimonk.train"],
    ["aimonk.audit"],  # the label audit (cross-fitted probe or fine-tuned networks, confident learning, copies)
    ["aimonk.predict", "aimonk.export"],  # the public predict(); export with a model card
    ["aimonk.cli", "aimonk.widgets", "aimonk.run_notebooks", "aimonk.benchmark"],  # the CLI and the upload panel
    ["aimonk.app", "aimonk.review_panel"],  # the Streamlit app and the review panel share the upload panel's thumbnail
    ["aimonk.__main__"],
]
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of ``module``, or of the nearest enclosing package listed (``aimonk.benchmark.speed``)."""
    while module not in LAYER_OF and "." in module:
        module = module.rsplit(".", 1)[0]
    return LAYER_OF[module]


def aimonk_imports(path: Path) -> set[str]:
    """Every aimonk module that ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("aimonk")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aimonk"):
            for a in node.names:  # "from aimonk import config" imports the module aimonk.config
                sub = f"{node.module}.{a.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else node.module)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert [module_name(p) for p in MODULES if not _has_layer(module_name(p))] == []


def _has_layer(module: str) -> bool:
    try:
        layer(module)
        return True
    except KeyError:
        return False


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_a_module_imports_only_from_lower_layers(path):
    me = module_name(path)
    upward = []
    for other in aimonk_imports(path):
        inside_own_package = other.startswith(me + ".") and path.name == "__init__.py"
        same_benchmark = me.startswith("aimonk.benchmark") and other.startswith("aimonk.benchmark")
        if other != me and not inside_own_package and not same_benchmark and layer(other) >= layer(me):
            upward.append(f"{other} (layer {layer(other)})")
    assert upward == [], f"{me} (layer {layer(me)}) imports from its own layer or above: {upward}"


def test_the_layer_test_catches_an_upward_import(tmp_path):
    """Guard: a module that imported one above it would be reported."""
    fake = PACKAGE / "data" / "labels.py"
    source = fake.read_text() + "\nfrom aimonk.train import train\n"
    (tmp_path / "labels.py").write_text(source)
    imports = aimonk_imports(tmp_path / "labels.py")
    assert "aimonk.train" in imports and layer("aimonk.train") > layer("aimonk.data.labels")


if __name__ == "__main__":  # python tests/test_layers.py: the module graph, layer by layer
    for path in MODULES:
        me = module_name(path)
        print(f"{layer(me):2d} {me} -> {', '.join(sorted(aimonk_imports(path) - {me})) or '-'}")
