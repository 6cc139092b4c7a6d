"""Precision "auto" on the CPU is measured, cached and never slower than fp32; explicit choices pass through."""

from __future__ import annotations

import json

import pytest
import torch

from aimonk import config, runtime
from aimonk.runtime import Execution, choose_execution, measure_executions, pick_execution

CPU = torch.device("cpu")
FP32, FP32_CL, BF16, BF16_CL = (Execution("fp32", False), Execution("fp32", True), Execution("bf16", False),
                                Execution("bf16", True))


@pytest.mark.parametrize(("rates", "expected"), [
    ({FP32: 10, FP32_CL: 12, BF16: 9, BF16_CL: 11}, FP32_CL),  # bf16 slower (AVX512-BF16 without AMX, say)
    ({FP32: 10, FP32_CL: 12, BF16: 9, BF16_CL: 12.3}, FP32_CL),  # faster, but within the margin: not worth it
    ({FP32: 10, FP32_CL: 12, BF16: 9, BF16_CL: 25}, BF16_CL),  # clearly faster
    ({FP32: 12, FP32_CL: 10}, FP32),  # fp32 only (a backbone kept in fp32): the faster layout
], ids=["bf16 slower", "bf16 within margin", "bf16 faster", "fp32 only"])
def test_auto_never_picks_a_setting_slower_than_fp32(rates, expected):
    choice = pick_execution(rates)
    assert choice == expected
    assert rates[choice] >= max(r for e, r in rates.items() if e.precision == "fp32")


def test_measuring_times_every_candidate_and_leaves_the_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    rates = measure_executions("resnet18", "train", 32, 2, bf16=True)
    assert set(rates) == {FP32, FP32_CL, BF16, BF16_CL} and all(r > 0 for r in rates.values())
    assert torch.equal(torch.rand(3), expected)  # a seeded run is the same whether or not auto measured


def test_after_the_first_timed_round_only_the_faster_layout_of_each_precision_is_timed(monkeypatch):
    steps = {FP32: 0.4, FP32_CL: 0.2, BF16: 0.1, BF16_CL: 0.3}  # seconds per step, each candidate's own
    timed = []

    def fake_step(model, x, precision, device, train):
        e = Execution(precision, not x.is_contiguous())  # a channels_last input is not NCHW-contiguous
        timed.append(e)
        return steps[e]

    monkeypatch.setattr(runtime, "_timed_step", fake_step)
    rates = measure_executions("resnet18", "train", 32, 2, bf16=True)
    # warm-up and first timed round: all four; then the two finalists, fp32 + channels_last and bf16
    assert timed == [FP32, FP32_CL, BF16, BF16_CL] * 2 + [FP32_CL, BF16] * (runtime.PROBE_STEPS - 1)
    assert rates == {e: pytest.approx(2 / s) for e, s in steps.items()}  # every candidate keeps its measured rate
    assert pick_execution(rates) == BF16


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Measurements recorded (and faked: fp32 + channels_last fastest) with the cache in ``tmp_path``."""
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(runtime, "_reported", set())
    calls = []

    def fake(backbone, mode, image_size, batch_size, bf16=True):
        calls.append((backbone, mode, image_size, batch_size, bf16))
        return {FP32: 10.0, FP32_CL: 14.0, **({BF16: 9.0, BF16_CL: 13.0} if bf16 else {})}

    monkeypatch.setattr(runtime, "measure_executions", fake)
    return calls


def test_the_choice_is_cached_per_setting_and_printed_once(counted, tmp_path, capsys):
    first = choose_execution("auto", CPU, "resnet18", mode="train", image_size=64, batch_size=8)
    again = choose_execution("auto", CPU, "resnet18", mode="train", image_size=64, batch_size=8)
    assert first == again == FP32_CL and len(counted) == 1
    printed = capsys.readouterr().err
    assert printed.count("precision auto") == 1
    assert "fp32 + channels_last; measured img/s: fp32 10.0, fp32 + channels_last 14.0" in printed
    choose_execution("auto", CPU, "resnet18", mode="infer", image_size=64, batch_size=8)
    choose_execution("auto", CPU, "efficientnet_lite0", mode="train", image_size=64, batch_size=8)
    assert len(counted) == 3  # another mode, another backbone: measured for themselves
    cache = json.loads((tmp_path / runtime.PRECISION_CACHE_NAME).read_text())
    [key] = [k for k in cache if "resnet18 | train" in k]
    assert runtime.cpu_model() in key and torch.__version__ in key and "64 px | batch 8" in key
    # the CPU's vector extension and bf16 too: one model name covers CPUs whose fastest settings differ
    assert key.startswith(runtime.cpu_identity() + " | ") and torch.backends.cpu.get_cpu_capability() in key
    assert cache[key]["choice"] == {"precision": "fp32", "channels_last": True}


def test_lite_backbones_measure_bf16_for_training_and_stay_fp32_for_inference(counted, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    for mode in ("train", "infer"):
        choose_execution("auto", CPU, "efficientnet_lite0", mode=mode, image_size=64, batch_size=8)
        choose_execution("auto", CPU, "resnet18", mode=mode, image_size=64, batch_size=8)
    measured_bf16 = {(b, m): bf16 for b, m, _, _, bf16 in counted}
    assert measured_bf16 == {("efficientnet_lite0", "train"): True, ("resnet18", "train"): True,
                             ("efficientnet_lite0", "infer"): False, ("resnet18", "infer"): True}


def test_a_damaged_cache_is_measured_again(counted, tmp_path):
    (tmp_path / runtime.PRECISION_CACHE_NAME).write_text("{not json")
    assert choose_execution("auto", CPU, "resnet18", image_size=64, batch_size=8) == FP32_CL
    assert len(counted) == 1 and json.loads((tmp_path / runtime.PRECISION_CACHE_NAME).read_text())


def test_explicit_choices_pass_through_unmeasured(counted):
    assert choose_execution("bf16", CPU, "resnet18", channels_last=False) == BF16
    assert choose_execution("fp32", CPU, "efficientnet_lite0") == FP32_CL
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        choose_execution("fp16", CPU, "resnet18")
    assert counted == []
