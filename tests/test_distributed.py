"""Training on several processes with torchrun: helpers without torchrun, and 2 CPU processes (gloo) end to end.

The end-to-end tests run ``torchrun --standalone --nproc_per_node 2 -m aimonk train`` on 80 images
of the embedded sample and compare with one process with the same global batch size and seed.
The two differ only in floating-point summation order: BatchNorm statistics are taken over the
global batch (``GlobalBatchNorm2d``) and each process's loss is weighted by its known labels, so the
gradient is the global batch's. Adam's first steps are sign-like, so float noise on near-zero
gradients grows to about 1e-3 in the loss after a few steps; one process run twice with a different
memory format (channels-last off) drifts as much (measured: 9e-4 against 7e-4 for two processes).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import sample_subset
from torch import nn

from aimonk import config, distributed
from aimonk.checkpoint import load_checkpoint
from aimonk.losses import MaskedBCEWithLogitsLoss
from aimonk.predict import Predictor
from aimonk.train.resume import resume_path

REPO = config.PROJECT_ROOT
N_IMAGES = 80  # 64 training images after the split: 4 global batches of 16 per epoch


# --------------------------------------------------------------------------- without torchrun


@pytest.fixture
def no_torchrun(monkeypatch):
    for v in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(v, raising=False)


def as_rank(monkeypatch, rank: int, world: int) -> None:
    """Make the helpers believe torchrun started this process as ``rank`` of ``world`` (no group joined)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def test_without_torchrun_everything_is_one_process(no_torchrun):
    assert not distributed.launched_by_torchrun()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    with distributed.process_group(torch.device("cpu")) as device:
        assert device == torch.device("cpu") and not distributed.active()
        assert distributed.from_main(lambda: 42) == 42
        distributed.check_same([1.0, 2.0], "a value")
        distributed.barrier()
        with distributed.local_main_first():
            pass
        assert distributed.rank_seed(1234) == 1234
        model = nn.Linear(2, 2)
        assert distributed.wrap(model, device) is model
        loss = torch.tensor(0.5, requires_grad=True)
        back, value = distributed.global_mean_loss(loss, torch.tensor(7))
        assert back is loss and value.item() == 0.5 and not value.requires_grad


@pytest.mark.parametrize("batch_size, world, error", [
    (16, 3, r"batch_size 16 is the global batch size and must be a multiple of the 3 processes \(e\.g\. 15\)"),
    (2, 4, r"batch_size 2 is the global batch size and must be a multiple of the 4 processes \(e\.g\. 4\)"),
])
def test_global_batch_must_split_evenly(monkeypatch, batch_size, world, error):
    as_rank(monkeypatch, 0, world)
    with pytest.raises(ValueError, match=error):
        distributed.per_rank_batch(batch_size)


def test_other_ranks_get_their_own_augmentation_seed(monkeypatch):
    seeds = []
    for r in range(3):
        as_rank(monkeypatch, r, 3)
        seeds.append(distributed.rank_seed(5001))
    assert seeds[0] == 5001 and len(set(seeds)) == 3


def _batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    sampler = distributed.epoch_sampler(list(range(n)), seed)
    sampler.set_epoch(epoch)
    return [b.tolist() for b in torch.utils.data.DataLoader(list(range(n)), batch_size=batch, sampler=sampler)]


@pytest.mark.parametrize("n, batch_size, world", [(64, 16, 2), (57, 16, 2), (10, 6, 3), (160, 16, 4), (5, 8, 4)])
def test_each_process_gets_its_share_of_the_single_process_batches(monkeypatch, n, batch_size, world):
    """Rank r's k-th batch is the r-th interleaved share of one process's k-th batch (last one padded)."""
    as_rank(monkeypatch, 0, 1)
    single = _batches(n, batch_size, seed=3000, epoch=2)
    shards = []
    for r in range(world):
        as_rank(monkeypatch, r, world)
        shards.append(_batches(n, batch_size // world, seed=3000, epoch=2))
    assert all(len(s) == len(single) for s in shards)
    order = sum(single, [])
    for k, batch in enumerate(single):
        share = [shards[r][k] for r in range(world)]
        if k < len(single) - 1 or n % world == 0:
            assert share == [batch[r::world] for r in range(world)]
        else:  # padded with the permutation's first images, as DistributedSampler pads
            padded = (batch + order * world)[:len(batch) + (-n) % world]
            assert share == [padded[r::world] for r in range(world)]


def test_global_batchnorm_is_batchnorm_in_one_process(no_torchrun):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    converted = distributed.sync_batchnorm(copy.deepcopy(reference))
    params = list(converted.parameters())
    assert isinstance(converted[1], distributed.GlobalBatchNorm2d) and isinstance(converted[1], nn.BatchNorm2d)
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(reference(x), converted(x))
    assert torch.equal(reference[1].running_var, converted[1].running_var)
    assert [id(p) for p in converted.parameters()] == [id(p) for p in params]


@pytest.mark.parametrize("normalization", ["known", "partial"])
def test_loss_normalizer_is_what_the_mean_divides_by(normalization):
    """``global_mean_loss`` relies on loss * normalizer being the summed loss of the share."""
    criterion = MaskedBCEWithLogitsLoss(torch.tensor([2.0, 0.5, 1.0]), normalization)
    targets = torch.tensor([[1, -1, 0], [-1, -1, -1], [0, 1, -1], [1, 1, 1]], dtype=torch.float32)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    halves = [(logits[:2], targets[:2]), (logits[2:], targets[2:])]
    summed = sum(criterion(lg, t) * criterion.normalizer(t) for lg, t in halves)
    total = sum(criterion.normalizer(t) for _, t in halves)
    torch.testing.assert_close(summed / total, criterion(logits, targets))


# --------------------------------------------------------------------------- torchrun, 2 processes


# A worker that fails two optimiser steps into a chosen epoch, on every rank: a crash mid-epoch.
CRASH_THEN_TRAIN = r"""
import sys
sys.path.insert(0, sys.argv[1])
from helpers import stop_in_epoch
import aimonk.train.run as R
from aimonk.cli import main

def crash():
    raise RuntimeError("simulated crash in the middle of the epoch")

R.train_one_epoch = stop_in_epoch(R, int(sys.argv[2]), 2, crash)
sys.exit(main(sys.argv[3:]))
"""


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for v in distributed.TORCHRUN_VARIABLES:
        env.pop(v, None)
    return env


def _train_args(data: Path, out: Path, cache: Path) -> list[str]:
    # The seed recipe's ResNet18 has no dropout, so one process and two draw the same computation
    # (EfficientNet's dropout masks are drawn per process).
    return ["train", "--recipe", "original", "--data", str(data), "--out", str(out),
            "--loss-plot", str(out.with_name("loss.png")), "--epochs", "2", "--batch-size", "16", "--image-size", "32", "--augment", "none", "--weights", "none",
            "--precision", "fp32", "--device", "cpu", "--num-workers", "0", "--seed", "0", "--cache-dir", str(cache),
            "--no-progress"]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args[:6]} did not finish within {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Three runs side by side (one thread each): 2 processes, 1 process, and 2 processes crashed then resumed."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "data"
    sample_subset(data, N_IMAGES)
    script = root / "crash_then_train.py"
    script.write_text(CRASH_THEN_TRAIN)

    ddp, single, resumed = root / "ddp" / "model.pth", root / "single" / "model.pth", root / "resumed" / "model.pth"
    procs = {"ddp": _start([*TORCHRUN, "-m", "aimonk", *_train_args(data, ddp, root / "cache-ddp")]),
             "single": _start([sys.executable, "-m", "aimonk", *_train_args(data, single, root / "cache-single")]),
             "crashed": _start([*TORCHRUN, str(script), str(Path(__file__).resolve().parent), "1", *_train_args(data, resumed, root / "cache-resumed")])}
    try:
        result = {"data": data, "ddp": ddp, "single": single, "resumed": resumed}
        result["crashed"] = _finish(procs["crashed"])
        state_file = resume_path(resumed)
        result["state_after_crash"] = torch.load(state_file, weights_only=True) if state_file.exists() else None
        result["model_after_crash"] = resumed.exists()
        procs["resumed"] = _start([*TORCHRUN, "-m", "aimonk", *_train_args(data, resumed, root / "cache-resumed"),
                                   "--resume"])
        for name in ("ddp", "single", "resumed"):
            result[name + "_run"] = _finish(procs[name])
        return result
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.slow
def test_two_processes_complete_and_only_rank_0_writes(runs):
    rc, out = runs["ddp_run"]
    assert rc == 0, out[-3000:]
    assert sorted(p.name for p in runs["ddp"].parent.iterdir()) == ["loss.png", "model.pth", config.SPLIT_NAME]
    assert out.count("Saved ") == 1 and f"Saved {runs['ddp']}" in out  # rank 0 reports, once
    _, meta = load_checkpoint(runs["ddp"])
    assert meta.config["batch_size"] == 16 and len(meta.history["loss"]) == 2 * 4  # 64 images / 16, twice


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    for name in ("ddp_run", "single_run"):
        assert runs[name][0] == 0, runs[name][1][-3000:]
    _, ddp = load_checkpoint(runs["ddp"])
    _, single = load_checkpoint(runs["single"])
    a, b = np.array(ddp.history["loss"]), np.array(single.history["loss"])
    assert a.shape == b.shape == (8,)
    # Before Adam has amplified float noise, the two are the same computation (measured: < 1e-6).
    np.testing.assert_allclose(a[:2], b[:2], rtol=0, atol=1e-5)
    # Afterwards within the float-noise drift of one process (measured: 7e-4; channels-last off: 9e-4).
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-3)
    np.testing.assert_allclose(ddp.history["epoch_loss"], single.history["epoch_loss"], rtol=0, atol=2e-3)
    np.testing.assert_allclose(ddp.history["val_macro_ap"], single.history["val_macro_ap"], rtol=0, atol=0.02)
    assert ddp.pos_weight == single.pos_weight and ddp.split["val"] == single.split["val"]

    images = sorted((runs["data"] / "images").iterdir())
    pa = Predictor(runs["ddp"], device="cpu", precision="fp32").predict_many(images)
    pb = Predictor(runs["single"], device="cpu", precision="fp32").predict_many(images)
    prob_a = np.array([list(r.probabilities.values()) for r in pa])
    prob_b = np.array([list(r.probabilities.values()) for r in pb])
    thresholds = np.array([list(r.thresholds.values()) for r in pa])
    # Probabilities agree to float noise (measured: 0.0019 at most), so every decision not that close to
    # its threshold is equal. An attribute sitting on the threshold may flip: measured, all 80 images
    # here have the same attributes present, but 2 of the 202 in the whole sample folder did not.
    assert np.abs(prob_a - prob_b).max() < 0.01
    clear = (np.abs(prob_a - thresholds) > 0.01) & (np.abs(prob_b - thresholds) > 0.01)
    assert np.array_equal((prob_a >= thresholds)[clear], (prob_b >= thresholds)[clear])
    assert np.mean([x.present == y.present for x, y in zip(pa, pb)]) >= 0.95


@pytest.mark.slow
def test_two_processes_resume_after_a_crash_to_the_uninterrupted_result(runs):
    rc, out = runs["crashed"]
    assert rc != 0 and "simulated crash in the middle of the epoch" in out
    state = runs["state_after_crash"]
    assert state is not None and state["epoch"] == 1 and len(state["history"]["loss"]) == 4
    assert not runs["model_after_crash"]

    rc, out = runs["resumed_run"]
    assert rc == 0, out[-3000:]
    assert out.count(f"Resuming from {resume_path(runs['resumed'])} after epoch 1") == 2  # every rank loads it
    assert not resume_path(runs["resumed"]).exists()
    model_a, meta_a = load_checkpoint(runs["resumed"])
    model_b, meta_b = load_checkpoint(runs["ddp"])
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []  # exactly the uninterrupted 2-process run
    for key in ("loss", "epoch_loss", "val_macro_ap"):
        assert meta_a.history[key] == meta_b.history[key], key
