"""Interrupted training: SIGKILL mid-epoch then resume, non-finite losses, unwritable outputs.

A resumed run must replay an uninterrupted one exactly on the CPU: same final weights, same loss
history. That holds because every epoch reseeds from ``(seed, epoch)`` and the per-epoch state
file carries the model, optimiser, scheduler, EMA and history.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import sample_subset, stop_in_epoch, tiny_config

import aimonk.train.run as train_run
from aimonk import config
from aimonk.checkpoint import load_checkpoint
from aimonk.cli import main as cli_main
from aimonk.train import TrainConfig, TrainingError, train
from aimonk.train.resume import resume_path

REPO = config.PROJECT_ROOT
TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


def config_for(data: Path, out: Path, cache: Path, **kw) -> TrainConfig:
    return tiny_config(data, out, cache, **{"epochs": 3, "val_fraction": 0.25, "schedule": "cosine",
                                            "warmup_epochs": 0.5, **kw})


def assert_same_run(a: Path, b: Path) -> None:
    """Two checkpoints hold identical weights and identical loss/validation history."""
    model_a, meta_a = load_checkpoint(a)
    model_b, meta_b = load_checkpoint(b)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights differ in {len(different)} tensors, e.g. {different[:3]}"
    for key in ("loss", "epoch_loss", "val_macro_ap"):
        assert meta_a.history[key] == meta_b.history[key], key
    assert len(meta_a.history["epoch_loss"]) == meta_a.config["epochs"]


class Interrupted(Exception):
    """Stands in for a crash in the middle of an epoch."""


def interrupt_at(monkeypatch, epoch: int, step: int = 2) -> None:
    """Make ``train`` die after ``step`` optimiser steps of (0-based) ``epoch``."""
    def crash():
        raise Interrupted

    monkeypatch.setattr(train_run, "train_one_epoch", stop_in_epoch(train_run, epoch, step, crash))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return sample_subset(tmp_path_factory.mktemp("data") / "sample12")


# --------------------------------------------------------------------------- kill -9 and resume

# Runs the CLI in a child process that writes a marker and stalls after two optimiser steps of a
# chosen epoch, so the parent can SIGKILL it at a known point in the middle of that epoch.
STALL_THEN_TRAIN = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from helpers import stop_in_epoch
import aimonk.train.run as R
from aimonk.cli import main

marker, stall_epoch = Path(sys.argv[2]), int(sys.argv[3])

def stall():
    marker.write_text("in the middle of the epoch")
    time.sleep(600)

R.train_one_epoch = stop_in_epoch(R, stall_epoch, 2, stall)
sys.exit(main(sys.argv[4:]))
"""


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _train_args(data: Path, out: Path, cache: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--loss-plot", "", "--epochs", "3",
            "--batch-size", "4", "--image-size", "32", "--weights", "none", "--precision", "fp32",
            "--device", "cpu", "--num-workers", "0", "--cache-dir", str(cache), "--val-fraction", "0.25",
            "--schedule", "cosine", "--warmup-epochs", "0.5", "--no-progress"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(data, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "killed" / "model.pth"
    reference = tmp_path / "uninterrupted" / "model.pth"
    # The uninterrupted run goes alongside (one thread each), with its own cache: nothing is shared.
    straight = subprocess.Popen([sys.executable, "-m", "aimonk", *_train_args(data, reference, tmp_path / "cache2")],
                                cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = tmp_path / "stalled"
    child = subprocess.Popen([sys.executable, "-c", STALL_THEN_TRAIN, str(TESTS), str(marker), "1",
                              *_train_args(data, out, cache)],
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"training ended before the kill point:\n{child.communicate()[0]}")
            if time.monotonic() > deadline:
                pytest.fail("training did not reach the middle of epoch 2 within 300 s")
            time.sleep(0.1)
        state = torch.load(resume_path(out), weights_only=True)
        assert state["epoch"] == 1 and len(state["history"]["epoch_loss"]) == 1
        n_train = len(json.loads((out.parent / config.SPLIT_NAME).read_text())["train"])
        assert len(state["history"]["loss"]) == n_train // 4 if n_train % 4 == 1 else -(-n_train // 4)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
        assert not out.exists() and resume_path(out).exists()

        resumed = subprocess.run([sys.executable, "-m", "aimonk", *_train_args(data, out, cache), "--resume"],
                                 cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"Resuming from {resume_path(out)} after epoch 1" in resumed.stdout
        assert out.exists() and not resume_path(out).exists()  # the state file goes once training completes

        log, _ = straight.communicate(timeout=600)
        assert straight.returncode == 0, log[-2000:]
    finally:
        _stop(child)
        _stop(straight)
    assert_same_run(out, reference)


# --------------------------------------------------------------------------- in-process interruption


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted fp32 run (3 epochs), for comparison."""
    root = tmp_path_factory.mktemp("reference")
    return train(config_for(data, root / "model.pth", root / "cache")).checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_interrupted_run_resumes_to_the_same_result(data, tmp_path, monkeypatch, precision):
    """EMA, keep-best, crop augmentation and a cosine schedule all carry over a crash exactly."""
    kw = dict(precision=precision, ema_decay=0.9, keep_best=True, augment="crop")
    cfg = config_for(data, tmp_path / "a" / "model.pth", tmp_path / "cache", **kw)
    with monkeypatch.context() as m:
        interrupt_at(m, epoch=2)
        with pytest.raises(Interrupted):
            train(cfg)
    assert torch.load(resume_path(cfg.out), weights_only=True)["epoch"] == 2
    cfg.resume = True
    train(cfg)
    ref = train(config_for(data, tmp_path / "b" / "model.pth", tmp_path / "cache", **kw)).checkpoint
    assert_same_run(Path(cfg.out), ref)


def test_resume_without_state_starts_from_scratch(data, tmp_path, reference, capsys):
    cfg = config_for(data, tmp_path / "model.pth", tmp_path / "cache", resume=True)
    train(cfg)
    assert f"No resumable state at {resume_path(cfg.out)}; starting from scratch" in capsys.readouterr().out
    assert_same_run(Path(cfg.out), reference)


@pytest.mark.parametrize("change, error", [
    (dict(lr=3e-4), r"saved with a different configuration \(lr\); delete it or drop resume"),
    (dict(epochs=5, batch_size=8), r"saved with a different configuration \(batch_size, epochs\)"),
], ids=["lr", "epochs-and-batch-size"])
def test_resume_refuses_state_from_another_configuration(data, tmp_path, monkeypatch, change, error):
    cfg = config_for(data, tmp_path / "model.pth", tmp_path / "cache", epochs=2)
    with monkeypatch.context() as m:
        interrupt_at(m, epoch=1)
        with pytest.raises(Interrupted):
            train(cfg)
    with pytest.raises(TrainingError, match=re.escape(str(resume_path(cfg.out))) + ": " + error):
        train(config_for(data, tmp_path / "model.pth", tmp_path / "cache", resume=True, **{**dict(epochs=2), **change}))


@pytest.mark.parametrize("content, error", [
    (b"", r"empty file \(0 bytes\)"),
    (b"PK\x03\x04garbage", r"truncated or corrupted"),
    (b"not a state file", r"unrecognised file format"),
], ids=["empty", "truncated", "not-a-state-file"])
def test_resume_from_a_damaged_state_file_is_a_clear_error(data, tmp_path, content, error):
    cfg = config_for(data, tmp_path / "model.pth", tmp_path / "cache", resume=True)
    resume_path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    resume_path(cfg.out).write_bytes(content)
    with pytest.raises(TrainingError, match=re.escape(str(resume_path(cfg.out))) + ".*" + error):
        train(cfg)


# --------------------------------------------------------------------------- non-finite loss


def test_nonfinite_loss_stops_with_epoch_and_batch_and_keeps_last_good_state(data, tmp_path, monkeypatch, reference,
                                                                              capsys):
    """A NaN loss in epoch 2, batch 2 stops training; the state after epoch 1 survives and resumes."""
    original = train_run.train_one_epoch

    def poisoned(*args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        if bound.arguments["epoch"] == 1:  # epoch 2
            criterion, calls = bound.arguments["criterion"], [0]

            def nan_on_second_batch(logits, y):
                calls[0] += 1
                loss = criterion(logits, y)
                return loss * float("nan") if calls[0] == 2 else loss

            bound.arguments["criterion"] = nan_on_second_batch
        return original(*bound.args, **bound.kwargs)

    cfg = config_for(data, tmp_path / "model.pth", tmp_path / "cache")
    with monkeypatch.context() as m:
        m.setattr(train_run, "train_one_epoch", poisoned)
        with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 2, batch 2.*"
                           r"The state after epoch 1 is kept in " + re.escape(str(resume_path(cfg.out)))):
            train(cfg)
        assert not Path(cfg.out).exists()
        state = torch.load(resume_path(cfg.out), weights_only=True)
        assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                           if v.is_floating_point())

        with warnings.catch_warnings():  # the CLI sets process-wide warning filters
            rc = cli_main(_train_args(data, tmp_path / "cli" / "model.pth", tmp_path / "cache"))
        err = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in err
        assert "error: non-finite loss (nan) at epoch 2, batch 2" in err

    cfg.resume = True
    train(cfg)  # the poison is gone: the kept state resumes to the uninterrupted result
    assert_same_run(Path(cfg.out), reference)


def test_a_failed_state_write_stops_training_with_its_error_and_the_written_states_stay_whole(data, tmp_path,
                                                                                              monkeypatch):
    """The state is written in the background while the next epoch trains; a write that fails (here the
    second: a full disk) still stops the run with the write's own error, and leaves the first state whole."""
    import aimonk.train.resume as resume

    writes, real = [], resume.atomic_write_bytes

    def second_write_fails(path, data_):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data_)

    monkeypatch.setattr(resume, "atomic_write_bytes", second_write_fails)
    cfg = config_for(data, tmp_path / "model.pth", tmp_path / "cache")
    with pytest.raises(OSError, match="No space left on device"):
        train(cfg)
    assert not Path(cfg.out).exists()  # no checkpoint after a failed run
    assert torch.load(resume_path(cfg.out), weights_only=True)["epoch"] == 1
    assert len(writes) == 2  # the failure stopped the run at the next epoch's hand-over at the latest


# --------------------------------------------------------------------------- output folder


def _no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data was indexed or decoded before the output folder was checked")

    monkeypatch.setattr(train_run, "prepare_data", fail)
    monkeypatch.setattr(train_run, "DecodedCache", fail)
    monkeypatch.setattr(train_run, "index_dataset", fail)


def _blocked(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("a file where a folder should be")
    return tmp_path / "a_file" / "models"


@pytest.mark.parametrize("which", ["out", "loss_plot"])
def test_unwritable_output_folder_fails_before_any_work(data, tmp_path, monkeypatch, capsys, which):
    _no_work(monkeypatch)
    blocked = _blocked(tmp_path)
    target = {"out": blocked / "model.pth", "loss_plot": blocked / "loss.png"}[which]
    cfg = config_for(data, tmp_path / "ok" / "model.pth", tmp_path / "cache")
    setattr(cfg, which, str(target))
    with pytest.raises(TrainingError, match=re.escape(str(blocked)) + ": output folder is not writable"):
        train(cfg)
    assert not (tmp_path / "cache").exists()

    flag = {"out": "--out", "loss_plot": "--loss-plot"}[which]
    args = _train_args(data, tmp_path / "ok" / "model.pth", tmp_path / "cache")
    args[args.index(flag) + 1] = str(target)
    with warnings.catch_warnings():
        assert cli_main(args) == 1
    assert f"error: {blocked}: output folder is not writable" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder_fails_before_any_work(data, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(TrainingError, match=re.escape(str(locked)) + ": output folder is not writable"):
            train(config_for(data, locked / "model.pth", tmp_path / "cache"))
    finally:
        locked.chmod(0o700)


def test_missing_output_folder_is_created_before_any_work(data, tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(train_run, "prepare_data", stop)
    out = tmp_path / "new" / "deeper" / "model.pth"
    with pytest.raises(Stop):
        train(config_for(data, out, tmp_path / "cache", loss_plot=str(tmp_path / "figs" / "loss.png")))
    assert out.parent.is_dir() and (tmp_path / "figs").is_dir()
    assert list(out.parent.iterdir()) == []  # the write probe is removed

