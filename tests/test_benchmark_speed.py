"""Smoke tests of ``python -m aimonk.benchmark speed``: it runs and reports positive figures (no duration is asserted)."""

from __future__ import annotations

import json
import math

import pytest

from aimonk import int8
from aimonk.benchmark.__main__ import main as benchmark_main
from helpers import record_predictors

SMALL = ["--limit", "24", "--epochs", "2", "--image-size", "64", "--peak-size", "256", "--latency-calls", "3"]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_speed_benchmark_prints_and_returns_positive_figures(sample_dir, tmp_path, capsys, monkeypatch):
    from aimonk.benchmark import speed

    made = record_predictors(monkeypatch, speed)  # the project loop is torch's, whatever a user's default runtime
    monkeypatch.setenv("AIMONK_RUNTIME", "auto")  # a user's default (the tests' default is torch)
    out = tmp_path / "speed.json"
    assert benchmark_main(["speed", "--data", str(sample_dir), *SMALL, "--json", str(out)]) == 0
    assert made and all(p.runtime == "torch" for p in made)
    printed = capsys.readouterr().out
    for row in ("training, first epoch", "training, steady state", "inference from files", "single-image latency",
                "peak RSS", "share of the bf16 peak", "project/original", "Reference peak"):
        assert row in printed
    res = json.loads(out.read_text())
    assert res["n_images"] == 24
    assert _positive(res["peak_flops"]["bf16"]) and _positive(res["forward_flops"])
    keys = ("train_first", "train_steady", "infer", "infer_model_only", "latency_ms", "peak_rss_mb",
            "train_share_bf16_peak", "infer_share_bf16_peak")
    for loop in ("original", "project"):
        for key in keys:
            assert _positive(res[loop][key]), (loop, key, res[loop][key])
        assert len(res[loop]["epoch_seconds"]) == 2
    assert _positive(res["project"]["cache_seconds"]) and _positive(res["project"]["cache_mb"])
    for key in ("train_first", "train_steady", "infer", "latency_ms"):
        assert _positive(res["ratios"][key])
    if int8.available():  # the project's model again in int8, against the original loop again
        assert "project in int8" in printed
        for key in ("infer_int8", "infer_model_only_int8", "latency_ms_int8"):
            assert _positive(res["original"][key]) and _positive(res["project"][key]) and _positive(res["ratios"][key])
        assert _positive(res["project"]["int8_calibration_seconds"]) and _positive(res["peak_flops"]["int8"])
        assert _positive(res["project"]["infer_model_only_int8_share_int8_peak"])


@pytest.mark.slow
def test_speed_tuning_runs(sample_dir, capsys):
    argv = ["speed", "--data", str(sample_dir), "--tune", "--image-size", "32", "--batch-size", "4",
            "--tune-images", "8", "--tune-rounds", "1"]
    assert benchmark_main(argv) == 0
    printed = capsys.readouterr().out
    for part in ("num_workers=0", "num_workers=2 persistent=True", "bf16 channels_last", "fp32 NCHW",
                 "resolve_precision('auto')", "fused (make_optimizer)"):
        assert part in printed


@pytest.mark.slow
def test_the_end_to_end_benchmark_times_the_cli_and_the_seed_script_as_processes(sample_dir, tmp_path, capsys):
    from aimonk.benchmark.report import render_endtoend

    out = tmp_path / "endtoend.json"
    argv = ["endtoend", "--data", str(sample_dir), "--limit", "16", "--epochs", "1", "--image-size", "64",
            "--json", str(out)]
    assert benchmark_main(argv) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 16 and res["cli_train_images"] < 16  # the CLI keeps its validation split
    for side in ("original", "cli cold", "cli warm"):
        assert len(res["seconds"][side]) == 1 and _positive(res["median"][side])
    assert set(res["ratios"]) == {"cli cold", "cli warm"} and all(_positive(r) for r in res["ratios"].values())
    for side in ("cli cold", "cli warm"):  # the ceiling: the CLI's own epochs, from its checkpoint, are part of its run
        assert 0 < res["epochs_median"][side] < res["median"][side]
        assert res["ceiling"][side] == pytest.approx(res["median"]["original"] / res["epochs_median"][side])
        assert res["ceiling"][side] > res["ratios"][side]
    printed = capsys.readouterr().out
    assert "faster than the seed's script" in printed and "its epochs alone" in printed
    table = render_endtoend(res | {"runs": [res["run"]]}, "endtoend.json")
    assert "| cli warm | `python -m aimonk train --recipe original" in table
    assert f"| cli warm | {res['epochs_median']['cli warm']:.1f} | {res['ceiling']['cli warm']:.2f}x |" in table


def test_dispatch_lists_the_benchmarks(capsys):
    assert benchmark_main([]) == 2
    usage = capsys.readouterr().out
    assert "speed" in usage and "quality" in usage
    assert benchmark_main(["nonsense"]) == 2
    assert "unknown benchmark 'nonsense'" in capsys.readouterr().err


def test_speed_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark_main(["speed", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--epochs", "--image-size", "--batch-size", "--backbone", "--limit", "--device", "--tune"):
        assert flag in text


def test_missing_data_folder_is_a_one_line_error(tmp_path, capsys):
    assert benchmark_main(["speed", "--data", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and "\n" not in err


# --------------------------------------------------------------------------- the fast paths the benchmark measures


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_fold_batchnorm_keeps_the_outputs_and_the_module_names(backbone):
    import copy

    import torch

    from aimonk.inference import fold_batchnorm
    from aimonk.model import build_model

    if backbone == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    model = build_model(backbone, 4, weights="none").train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    model.eval()
    folded = copy.deepcopy(model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(folded) == n_bn > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert {name for name, _ in folded.named_modules()} == {name for name, _ in model.named_modules()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_refuses_a_model_in_training_mode():
    from aimonk.inference import fold_batchnorm
    from aimonk.model import build_model

    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(build_model("resnet18", 4, weights="none").train())


def test_predictor_runs_the_folded_model(constant_checkpoint):
    import torch

    from aimonk.predict import Predictor

    predictor = Predictor(constant_checkpoint([0.9, 0.1, 0.6, 0.3]))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())
    probs = predictor.probabilities(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert probs.shape == (2, 4)
    assert probs[0] == pytest.approx([0.9, 0.1, 0.6, 0.3], abs=0.01)


def test_training_uses_the_fused_optimizer():
    import torch

    from aimonk.train.loop import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("adam", "adamw"):
        opt = make_optimizer(params, name, 1e-3, 0.0, torch.device("cpu"))
        assert opt.defaults["fused"] is True
    with pytest.raises(ValueError, match="adam or adamw"):
        make_optimizer(params, "sgd", 1e-3, 0.0, torch.device("cpu"))


def test_batch_decoding_threads_give_the_same_items_and_errors(sample_dir, tmp_path):
    import torch

    from aimonk.inference import _DecodeDataset

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    sources = sorted((sample_dir / "images").glob("*.jpg"))[:5] + [broken]
    ds = _DecodeDataset(sources, [str(s) for s in sources], 32)
    batch = ds.__getitems__(list(range(len(ds))))
    for i, (x, err) in enumerate(batch):
        x1, err1 = ds[i]
        assert torch.equal(x, x1) and err == err1
    assert batch[-1][1] and "broken.jpg" in batch[-1][1]
    assert not any(err for _, err in batch[:-1])
