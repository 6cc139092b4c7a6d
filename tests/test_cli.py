"""The command line, ``python -m aimonk {train,predict,evaluate}``: outputs, JSON, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
from PIL import Image

from aimonk import config
from aimonk.checkpoint import load_checkpoint
from aimonk.cli import main
from aimonk.train import PRETRAINED_RECIPE, TrainConfig, recipe_config

PROBS = [0.9, 0.2, 0.4, 0.7]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m aimonk ARGS`` in a fresh interpreter (inherits the temporary output folders)."""
    return subprocess.run([sys.executable, "-m", "aimonk", *map(str, args)], capture_output=True, text=True,
                          cwd=config.PROJECT_ROOT, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": ""})


@pytest.fixture
def cli(monkeypatch, capsys):
    """Call ``aimonk.cli.main`` in-process; returns ``(exit status, stdout, stderr)``."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it

    def call(*args):
        status = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err

    return call


def assert_one_line_error(err: str, *fragments: str):
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.fixture(scope="module")
def constant_model(make_constant_checkpoint, tmp_path_factory) -> Path:
    return make_constant_checkpoint(PROBS, tmp_path_factory.mktemp("cli") / "model.pth")


# --------------------------------------------------------------------------- train


@pytest.mark.slow
def test_train_writes_the_model_and_the_loss_plot(tmp_path, sample_dir):
    out, plot = tmp_path / "out" / "model.pth", tmp_path / "figures" / "loss.png"
    proc = run_cli("train", "--data", sample_dir, "--epochs", 1, "--image-size", 32, "--weights", "none",
                   "--batch-size", 24, "--no-progress", "--out", out, "--loss-plot", plot)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"Saved {out}" in proc.stdout
    assert f"Loss plot: {plot}" in proc.stdout
    assert "Validation macro AP (kept epoch 1 of 1)" in proc.stdout  # the pretrained recipe keeps the best epoch
    assert re.search(r"^Decisions: Attr1 (p >= 0\.\d\d|always (present|absent) \(majority\)), Attr2 ", proc.stdout, re.M)
    assert "probe_ensemble skipped: it needs pretrained weights" in proc.stderr  # --weights none: nothing to probe
    assert "image_201.jpg" in proc.stderr  # the sample's missing image, warned about once
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out.parent / config.SPLIT_NAME).is_file()
    _, meta = load_checkpoint(out)
    assert meta.image_size == 32 and meta.config["batch_size"] == 24 and meta.config["epochs"] == 1
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob("*.resume.*"))


def test_train_help_lists_every_training_parameter(cli):
    with pytest.raises(SystemExit) as info:
        cli("train", "--help")
    assert info.value.code == 0
    import aimonk.cli

    parser = aimonk.cli.build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train_parser._actions for s in a.option_strings}
    for f in fields(TrainConfig):
        flag = "--data" if f.name == "data_dir" else "--" + f.name.replace("_", "-")
        assert flag in flags, flag
    help_text = train_parser.format_help()
    assert "passes over the training set" in help_text  # the dataclass comments are the help


def test_train_flags_fill_the_dataclass():
    from aimonk.cli import build_parser, train_config

    args = build_parser().parse_args(["train", "--data", "d", "--epochs", "3", "--lr", "0.001", "--no-channels-last",
                                      "--tta", "--image-size", "64"])
    cfg = train_config(args)
    assert (cfg.data_dir, cfg.epochs, cfg.lr, cfg.channels_last, cfg.tta, cfg.image_size) == ("d", 3, 1e-3, False, True, 64)
    # Flags not given come from the default recipe (the best measured one), then from the dataclass.
    assert cfg.backbone == PRETRAINED_RECIPE["backbone"] and cfg.batch_size == PRETRAINED_RECIPE["batch_size"]
    assert cfg.out == str(config.DEFAULT_MODEL)


def test_recipe_original_reproduces_the_seed_recipe_and_flags_override_it():
    from aimonk.cli import build_parser, train_config

    cfg = train_config(build_parser().parse_args(["train", "--data", "d", "--recipe", "original", "--epochs", "2"]))
    assert (cfg.backbone, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.schedule, cfg.augment) == (
        "resnet18", "adam", 1e-4, 16, "constant", "flip")
    assert cfg.epochs == 2 and cfg.weights == "imagenet"
    with pytest.raises(ValueError, match="recipe must be one of pretrained, original"):
        recipe_config("best")


def test_train_on_a_bad_labels_file_exits_with_the_line(cli, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels.txt").write_text("a.jpg 1 0 NA 1\nb.jpg 1 0 1\n")
    status, out, err = cli("train", "--data", data, "--epochs", 1, "--out", tmp_path / "model.pth")
    assert status == 1
    assert_one_line_error(err, "labels.txt line 2: expected 4 labels after the file name, got 3")
    assert not (tmp_path / "model.pth").exists()


def test_train_on_a_missing_folder_exits_non_zero(cli, tmp_path):
    status, _, err = cli("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "model.pth")
    assert status == 1
    assert_one_line_error(err, "nowhere", "data folder not found")


# --------------------------------------------------------------------------- predict


def test_predict_prints_the_seed_format(constant_model, sample_dir):
    proc = run_cli("predict", "--model", constant_model, sample_dir / "images" / "image_0.jpg")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Image: image_0.jpg\nAttributes present: ['Attr1', 'Attr4']\n"


def test_predict_several_images_and_a_threshold(cli, constant_model, sample_dir):
    images = [sample_dir / "images" / f"image_{i}.jpg" for i in (3, 19)]
    status, out, err = cli("predict", "--model", constant_model, "--threshold", 0.3, *images)
    assert status == 0, err
    assert out == ("Image: image_3.jpg\nAttributes present: ['Attr1', 'Attr3', 'Attr4']\n"
                   "Image: image_19.jpg\nAttributes present: ['Attr1', 'Attr3', 'Attr4']\n")


def test_predict_json_parses(cli, constant_model, tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 60, 0, 0)).save(tmp_path / f"img_{i}.png")
    status, out, err = cli("predict", "--model", constant_model, "--json", tmp_path)
    assert status == 0, err
    results = json.loads(out)
    assert [r["image"] for r in results] == ["img_0.png", "img_1.png", "img_2.png"]
    for r in results:
        assert r["present"] == ["Attr1", "Attr4"] and r["error"] is None
        assert r["probabilities"] == pytest.approx(dict(zip(["Attr1", "Attr2", "Attr3", "Attr4"], PROBS)), abs=0.01)
        assert r["thresholds"] == {"Attr1": 0.5, "Attr2": 0.5, "Attr3": 0.5, "Attr4": 0.5}


def test_predict_with_an_unreadable_image_reports_it_and_exits_non_zero(cli, constant_model, tmp_path, sample_dir):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"nope")
    status, out, err = cli("predict", "--model", constant_model, sample_dir / "images" / "image_0.jpg", bad)
    assert status == 1
    assert out.startswith("Image: image_0.jpg\nAttributes present: ['Attr1', 'Attr4']\nImage: broken.jpg\nError: ")
    assert "Traceback" not in err


def test_predict_with_a_missing_model_is_a_one_line_error(tmp_path, sample_dir):
    proc = run_cli("predict", "--model", tmp_path / "missing.pth", sample_dir / "images" / "image_0.jpg")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, str(tmp_path / "missing.pth"), "model file not found")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "empty file"), (b"plain text", "not a readable aimonk checkpoint")],
    ids=["empty", "text"],
)
def test_predict_with_a_broken_model_is_a_one_line_error(cli, tmp_path, sample_dir, content, fragment):
    model = tmp_path / "model.pth"
    model.write_bytes(content)
    status, out, err = cli("predict", "--model", model, sample_dir / "images" / "image_0.jpg")
    assert status == 1 and out == ""
    assert_one_line_error(err, str(model), fragment)


def test_predict_on_an_empty_folder_is_an_error(cli, constant_model, tmp_path):
    status, _, err = cli("predict", "--model", constant_model, tmp_path)
    assert status == 1
    assert_one_line_error(err, "no images found")


@pytest.mark.parametrize("args", [(), ("predict",), ("evaluate", "--json")], ids=["no command", "no image", "no data"])
def test_a_missing_subcommand_or_argument_is_a_usage_error(cli, capsys, args):
    with pytest.raises(SystemExit) as info:
        cli(*args)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluate


METRICS = ("ap", "roc_auc", "precision", "recall", "f1")


@pytest.mark.slow  # bootstrap and permutation intervals for every attribute: about 10 s
def test_evaluate_json_has_per_attribute_metrics_and_macro_means(cli, trained, sample_dir):
    status, out, err = cli("evaluate", "--model", trained.checkpoint, "--data", sample_dir, "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["n_images"] == 201
    assert list(report["attributes"]) == ["Attr1", "Attr2", "Attr3", "Attr4"]
    for name, row in report["attributes"].items():
        for metric in METRICS:
            value = row[metric]
            assert value is None or 0.0 <= value <= 1.0, (name, metric, value)
        assert row["roc_auc"] is not None and row["ap"] is not None  # both classes are present in the sample
        assert 0 < row["n_known"] <= 201
        assert isinstance(row["verdict"], str)
    for metric in METRICS:
        values = [row[metric] for row in report["attributes"].values()]
        assert report["macro"][f"macro_{metric}"] == pytest.approx(sum(values) / len(values))


@pytest.mark.slow
def test_evaluate_prints_a_table_and_verdicts(cli, trained, sample_dir):
    status, out, err = cli("evaluate", "--model", trained.checkpoint, "--data", sample_dir)
    assert status == 0, err
    for name in ["Attr1", "Attr2", "Attr3", "Attr4"]:
        assert f"\n{name}: " in out
    assert "macro AP" in out and "majority baseline" in out


def test_evaluate_with_a_missing_model_is_a_one_line_error(cli, tmp_path, sample_dir):
    status, out, err = cli("evaluate", "--model", tmp_path / "none.pth", "--data", sample_dir)
    assert status == 1 and out == ""
    assert_one_line_error(err, "model file not found")


def test_evaluate_with_a_bad_labels_file_is_a_one_line_error(cli, constant_model, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels.txt").write_text("a.jpg 1 0 NA 1\nb.jpg 1 0 2 1\n")
    status, _, err = cli("evaluate", "--model", constant_model, "--data", data)
    assert status == 1
    assert_one_line_error(err, "labels.txt line 2: label 3 is '2'; expected 1, 0 or NA")
