"""``train(cfg)``: setup, then the epochs, then finishing the model, then writing it."""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Subset

from aimonk import config, distributed, int8
from aimonk.cache import DecodedCache
from aimonk.checkpoint import CheckpointMeta, save_checkpoint
from aimonk.data import DatasetIndex, ImageDataset, file_digest, index_dataset, make_split, save_split
from aimonk.files import atomic_savefig
from aimonk.losses import MaskedBCEWithLogitsLoss, compute_pos_weight
from aimonk.metrics import choose_decisions, initial_decisions
from aimonk.model import BACKBONES, BackboneSpec, backbone_parameters, build_model, head_parameters
from aimonk.plots import plot_loss_curve
from aimonk.probe import fit_probe, linear_probe_head, probe_backbone_list
from aimonk.progress import tqdm
from aimonk.runtime import choose_execution, select_device, set_seed
from aimonk.train.config import TrainConfig
from aimonk.train.loop import (
    TrainingError,
    make_optimizer,
    make_scheduler,
    set_backbone_trainable,
    train_one_epoch,
    train_transform,
    validate,
)
from aimonk.train.resume import StateWriter, load_state, resume_path, state_bytes

DEFAULT_THRESHOLD = 0.5  # every learnable attribute's threshold when there are no validation images to tune on


@dataclass
class TrainResult:
    """What ``train`` produced."""

    model: nn.Module
    meta: CheckpointMeta
    checkpoint: Path
    loss_plot: Path | None
    history: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Run:
    """Everything ``setup`` builds for one training run; the later phases read it."""

    cfg: TrainConfig
    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    channels_last: bool  # resolved memory format
    spec: BackboneSpec
    index: DatasetIndex
    cache: DecodedCache
    train_idx: np.ndarray  # rows of index.table
    val_idx: np.ndarray
    train_set: ImageDataset  # augmented
    train_small: ImageDataset | None  # augmented, at cfg.progressive_size px: the first cfg.progressive_epochs epochs
    train_plain: ImageDataset  # the same images without augmentation: what probes are fitted on
    val_set: ImageDataset
    pos_weight: torch.Tensor
    decisions: list[str]
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    ema: AveragedModel | None
    batch_size: int  # this process's share of the global batch
    drop_last: bool
    steps_per_epoch: int
    reduce_loss: Callable | None

    @property
    def names(self) -> list[str]:
        return self.index.table.names

    @property
    def eval_precision(self) -> str:
        """What validation and the probe run in: the training precision, except fp32 instead of bf16 on the
        CPU for a backbone whose single predictions bf16 moves (``BackboneSpec.cpu_bf16_infer``)."""
        if self.device.type == "cpu" and self.precision == "bf16" and not self.spec.cpu_bf16_infer:
            return "fp32"
        return self.precision


def check_writable(path: Path) -> None:
    """Fail now, not after training, if ``path``'s folder cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".aimonk-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"{path.parent}: output folder is not writable ({e.strerror or e})") from None


def prepare_data(cfg: TrainConfig, names: Sequence[str] | None = None):
    """Index the folder, split it by content hash, and decode images into the cache.

    Args:
        cfg: the training configuration.
        names: restrict to these image names (e.g. the training part of a cross-validation fold).
    Returns:
        ``(index, cache, train_idx, val_idx)`` with indices into ``index.table`` (unreadable
        images already removed).
    """
    index = index_dataset(cfg.data_dir, labels_file=cfg.labels or None)
    if names is not None:
        keep = set(names)
        rows = [i for i, n in enumerate(index.table.names) if n in keep]
        index = replace(index, table=index.table.subset(rows), paths=[index.paths[i] for i in rows])
    digests = [file_digest(p) for p in index.paths]
    cache = DecodedCache(index.paths, cfg.image_size, cfg.cache_dir or None, digests=digests, progress=cfg.progress)
    ok = np.asarray(cache.ok)
    if len(ok) == 0:
        raise TrainingError(f"{cfg.data_dir}: no readable images")
    targets = index.table.targets[ok]
    if cfg.val_fraction > 0:
        tr, va = make_split(targets, [digests[i] for i in ok], cfg.val_fraction, cfg.seed)
        return index, cache, ok[tr], ok[va]
    return index, cache, ok, ok[:0]


def train(cfg: TrainConfig, names: Sequence[str] | None = None) -> TrainResult:
    """Train a model end to end and write the checkpoint, the split and the loss plot.

    Writes ``cfg.out`` (the self-describing checkpoint), ``split.json`` next to it, the loss plot,
    and a resumable state file after each epoch (removed when training completes).

    Under torchrun (``torchrun --nproc_per_node N -m aimonk train ...``) every process runs this
    with DistributedDataParallel: ``cfg.batch_size`` is the global batch, shared equally; the loss
    history is the mean over processes; rank 0 alone validates, writes files and shows progress.

    Args:
        cfg: the training configuration.
        names: train (and validate) only on these image names; default all.
    Returns:
        A ``TrainResult`` (on every process; its files are rank 0's).
    """
    with distributed.process_group(select_device(cfg.device)) as device:
        if distributed.is_main():
            return _train(cfg, names, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank 0 reports data and recipe warnings once
            return _train(replace(cfg, progress=False), names, device)


def _train(cfg: TrainConfig, names: Sequence[str] | None, device: torch.device) -> TrainResult:
    start = time.perf_counter()
    run = setup(cfg, names, device)  # checks, data and split, model, loss, optimizer
    history, best_state, saved_probs = run_epochs(run)  # resume, then train + validate + save state, epoch by epoch
    model, probe, val_scores = finish(run, history, best_state)  # best epoch, probe ensemble, on the CPU
    thresholds, decisions = tune_decisions(run, model, val_scores, saved_probs)  # majority where no signal
    meta = describe(run, history, probe, val_scores, thresholds, decisions)
    checkpoint, plot = write(run, model, meta, history)  # checkpoint and loss plot (rank 0)
    return TrainResult(model, meta, checkpoint, plot, history, time.perf_counter() - start)


def setup(cfg: TrainConfig, names: Sequence[str] | None, device: torch.device) -> Run:
    """Check the settings and outputs, split and cache the data, and build model, loss and optimizer."""
    out = Path(cfg.out)
    if distributed.is_main():  # only rank 0 writes files
        check_writable(out)
        if cfg.loss_plot:
            check_writable(Path(cfg.loss_plot))
    batch_size = distributed.per_rank_batch(cfg.batch_size)
    set_seed(cfg.seed)
    spec = check_settings(cfg)

    with distributed.local_main_first():  # one process per machine fills the decoded-image cache
        index, cache, train_idx, val_idx = prepare_data(cfg, names)
    train_targets = index.table.targets[train_idx]
    if len(train_idx) < 2:
        raise TrainingError(f"{cfg.data_dir}: {len(train_idx)} training image(s) after the validation split; "
                            "need at least 2 (add images or lower val_fraction)")
    decisions = initial_decisions(train_targets, index.attributes)
    # after the data checks, so bad data fails at once; measured on rank 0 and shared, so every process runs alike
    execution = distributed.from_main(lambda: choose_execution(cfg.precision, device, cfg.backbone, cfg.channels_last,
                                                                "train", cfg.image_size, batch_size))
    if distributed.is_main():
        save_split(out.with_name(config.SPLIT_NAME), [index.table.names[i] for i in train_idx],
                   [index.table.names[i] for i in val_idx], data_dir=str(cfg.data_dir), labels=cfg.labels, seed=cfg.seed,
                   val_fraction=cfg.val_fraction)
    pos_weight = compute_pos_weight(train_targets, index.attributes)
    train_names = hashlib.sha256("\n".join(index.table.names[i] for i in train_idx).encode()).hexdigest()
    distributed.check_same((train_names, pos_weight.tolist()), "the training split or pos_weight")

    model = build_model(cfg.backbone, len(index.attributes), cfg.weights, cfg.on_missing_weights).to(device)
    if execution.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = MaskedBCEWithLogitsLoss(pos_weight, cfg.loss_normalization).to(device)
    train_set = ImageDataset(Subset(cache, train_idx), train_targets, train_transform(cfg.augment, cfg.image_size))
    train_small = None if cfg.progressive_epochs <= 0 else ImageDataset(
        Subset(cache, train_idx), train_targets, train_transform(cfg.augment, cfg.image_size, cfg.progressive_size))
    train_plain = ImageDataset(Subset(cache, train_idx), train_targets)
    val_set = ImageDataset(Subset(cache, val_idx), index.table.targets[val_idx])
    if cfg.head_init == "linear_probe" and not (cfg.resume and resume_path(out).is_file()):
        # Every process fits the same head on the same images, so the weights stay identical.
        linear_probe_head(model, train_plain, device, execution.precision, execution.channels_last, spec.mean, spec.std)
    groups = [{"params": backbone_parameters(model), "lr": cfg.lr * cfg.backbone_lr_mult},
              {"params": head_parameters(model), "lr": cfg.lr}]
    optimizer = make_optimizer(groups, cfg.optimizer, cfg.lr, cfg.weight_decay, device)
    scaler = torch.amp.GradScaler("cuda") if execution.precision == "fp16" else None
    ema = None if cfg.ema_decay <= 0 else \
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)

    # BatchNorm cannot train on a batch of one image, so a lone last image is left out of that epoch
    # (the shuffle differs per epoch, so a different image each time).
    # Under torchrun each process takes its interleaved share of the same shuffle, padded to equal length.
    n_local = math.ceil(len(train_set) / distributed.world_size())
    drop_last = n_local % batch_size == 1
    steps_per_epoch = n_local // batch_size if drop_last else math.ceil(n_local / batch_size)
    reduce_loss = None
    if distributed.world_size() > 1:
        def reduce_loss(loss, y):  # each process's mean loss, weighted into the global batch's
            return distributed.global_mean_loss(loss, criterion.normalizer(y))
    return Run(cfg, device, execution.precision, execution.channels_last, spec, index, cache, train_idx, val_idx,
               train_set, train_small, train_plain, val_set,
               pos_weight, decisions, model, criterion, optimizer, make_scheduler(optimizer, cfg, steps_per_epoch),
               scaler, ema, batch_size, drop_last, steps_per_epoch, reduce_loss)


def check_settings(cfg: TrainConfig) -> BackboneSpec:
    """Refuse settings that cannot train, before any data is read; returns the backbone's spec."""
    spec = BACKBONES.get(cfg.backbone)
    if spec is None:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose one of {sorted(BACKBONES)}")
    if cfg.progressive_epochs > 0 and not 0 < cfg.progressive_size < cfg.image_size:
        raise ValueError(f"progressive_size must be between 0 and image_size ({cfg.image_size}), "
                         f"got {cfg.progressive_size}")
    if cfg.head_init not in ("random", "linear_probe"):
        raise ValueError(f"head_init must be random or linear_probe, got {cfg.head_init!r}")
    if cfg.probe_ensemble:
        probe_backbone_list(cfg.backbone, cfg.probe_backbones)  # refuse a misspelt name before training, not after
    return spec


def run_epochs(run: Run) -> tuple[dict, dict | None, np.ndarray | None]:
    """Train from the first (or the resumed) epoch to ``cfg.epochs``.

    After each epoch rank 0 validates and saves the resumable state.

    Returns:
        ``(history, best_state, saved_probs)``: best_state holds the best epoch's weights with ``keep_best``,
        else None; saved_probs the validation probabilities of the weights ``finish`` saves (the best epoch's
        with ``keep_best``, else the last epoch's), or None where this run did not validate them.
    """
    cfg, main = run.cfg, distributed.is_main()
    state_file = resume_path(cfg.out)
    history = {"loss": [], "epoch_loss": [], "val_macro_ap": [], "epoch_seconds": [],
               "steps_per_epoch": run.steps_per_epoch}
    start_epoch, best_ap, best_state, last_probs, best_probs = 0, -1.0, None, None, None
    if cfg.resume and distributed.from_main(state_file.is_file):  # rank 0's file, sent to every process
        state = load_state(state_file, cfg, run.model, run.optimizer, run.scheduler, run.ema)
        history, start_epoch, best_ap, best_state = state["history"], state["epoch"], state["best_ap"], state["best_state"]
        print(f"Resuming from {state_file} after epoch {start_epoch}")
    elif cfg.resume:
        print(f"No resumable state at {state_file}; starting from scratch")

    # The shuffle is randperm(n) seeded by (seed, epoch), drawn by the sampler: the same permutation for
    # any number of processes, each taking its share. (A DataLoader's own shuffle also depends on how
    # often the loader is iterated; tqdm.auto calls iter() once more.)
    sampler = distributed.epoch_sampler(run.train_set, cfg.seed * 1000)
    # DistributedDataParallel under torchrun (frozen parameters are then "unused"), else the model itself.
    trained = distributed.wrap(run.model, run.device, find_unused_parameters=cfg.freeze_epochs > 0)
    scored = run.ema.module if run.ema is not None else run.model  # what validation and the checkpoint see
    bar = tqdm(range(start_epoch, cfg.epochs), desc="training", unit="epoch", disable=not cfg.progress,
               initial=start_epoch, total=cfg.epochs)
    writer = StateWriter() if main else None  # each epoch's state is written while the next one trains
    try:
        for epoch in bar:
            seed = distributed.rank_seed(cfg.seed * 1000 + epoch)
            set_seed(seed)  # per-epoch seeding makes a resumed run replay exactly
            set_backbone_trainable(run.model, epoch >= cfg.freeze_epochs)
            sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            losses = _train_epoch(run, trained, epoch_loader(run, sampler, epoch, seed), epoch, state_file)
            history["loss"].extend(losses)
            history["epoch_loss"].append(float(np.mean(losses)))
            history["epoch_seconds"].append(time.perf_counter() - t0)
            if len(run.val_set) and main:  # the other processes go on to the next epoch's first gradient exchange
                ap, last_probs = validate(scored, run.val_set, run.device, run.eval_precision, run.channels_last,
                                          run.spec.mean, run.spec.std, cfg.tta)
                history["val_macro_ap"].append(ap)
                if cfg.keep_best and ap > best_ap:
                    best_ap, best_probs = ap, last_probs
                    best_state = {k: v.detach().cpu().clone() for k, v in scored.state_dict().items()}
            bar.set_postfix(loss=f"{history['epoch_loss'][-1]:.4f}",
                            val_ap=f"{history['val_macro_ap'][-1]:.3f}" if history["val_macro_ap"] else "-")
            if writer is not None:
                writer.write(state_file, state_bytes(cfg, epoch + 1, history, run.model, run.optimizer, run.scheduler,
                                                     run.ema, best_ap, best_state))
    finally:
        if writer is not None:
            writer.close()  # the last state is on disk before training reports success or failure
    return history, best_state, best_probs if cfg.keep_best and best_state is not None else last_probs


def epoch_loader(run: Run, sampler, epoch: int, seed: int) -> torch.utils.data.DataLoader:
    """The training images of ``epoch`` in the sampler's order: smaller ones in the first epochs of progressive resizing."""
    cfg = run.cfg
    small = run.train_small is not None and epoch < cfg.progressive_epochs
    return torch.utils.data.DataLoader(
        run.train_small if small else run.train_set, batch_size=run.batch_size, sampler=sampler,
        drop_last=run.drop_last, generator=torch.Generator().manual_seed(seed),  # the generator seeds workers
        num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda", persistent_workers=cfg.num_workers > 0)


def _train_epoch(run: Run, trained: nn.Module, loader, epoch: int, state_file: Path) -> list[float]:
    """One epoch of ``train_one_epoch``; a failure says what state was kept for resuming."""
    try:
        return train_one_epoch(trained, loader, run.criterion, run.optimizer, run.device, run.precision,
                               run.channels_last, run.spec.mean, run.spec.std, run.scheduler, run.scaler, run.ema,
                               epoch, run.cfg.progress, reduce_loss=run.reduce_loss)
    except TrainingError as e:
        kept = (f"the state after epoch {epoch} is kept in {state_file} (resume=True continues from it)"
                if epoch > 0 else "no epoch had completed, so no state was saved")
        raise TrainingError(f"{e}. {kept[0].upper()}{kept[1:]}") from None


def finish(run: Run, history: dict, best_state: dict | None) -> tuple[nn.Module, dict | None, dict | None]:
    """The model to save: the best epoch's weights if kept, averaged with the probe if asked, on the CPU.

    Returns:
        ``(model, probe info or None, out-of-fold validation scores or None)``.
    """
    cfg = run.cfg
    distributed.check_same(distributed.weights_digest(run.model), "the trained weights")
    model = run.ema.module if run.ema is not None else run.model
    if cfg.keep_best and best_state is not None:
        model.load_state_dict(best_state)
        history["best_epoch"] = int(np.argmax(history["val_macro_ap"])) + 1
    probe = val_scores = None
    if cfg.probe_ensemble:
        model, probe, val_scores = fit_probe(
            model, run.train_plain, run.val_set, backbone=cfg.backbone, weights=cfg.weights,
            probe_backbones=cfg.probe_backbones, cross_fit=cfg.probe_cross_fit, tta=cfg.tta, seed=cfg.seed,
            device=run.device, precision=run.eval_precision, channels_last=run.channels_last,
            val_groups=[run.cache.digests[i] for i in run.val_idx], feature_cache=cfg.probe_feature_cache)
    return model.to("cpu").to(memory_format=torch.contiguous_format).eval(), probe, val_scores


def tune_decisions(run: Run, model: nn.Module, val_scores: dict | None,
                   saved_probs: np.ndarray | None = None) -> tuple[list[float], list[str]]:
    """Per attribute, a threshold tuned on validation where the model beats chance and the majority rule
    there, else the majority rule (``metrics.choose_decisions``).

    The probabilities are the saved model's on the validation images (``saved_probs``: the epoch's validation
    pass that scored those weights, in its precision, where there was one), or the out-of-fold ones when the
    saved model has seen them (the cross-fitted probe). An attribute training could not learn keeps its
    majority rule. Without validation images every learnable attribute gets ``DEFAULT_THRESHOLD``, with
    a warning.
    """
    cfg, attributes = run.cfg, list(run.index.attributes)
    if not len(run.val_set) or not distributed.is_main():
        if distributed.is_main():
            warnings.warn(f"val_fraction is {cfg.val_fraction}: no validation images to tune the decisions on, so "
                          f"every learnable attribute uses threshold {DEFAULT_THRESHOLD}, which can do worse than "
                          "always predicting the majority class; keep a validation split, or tune later in "
                          "notebook 03", stacklevel=3)
        return [DEFAULT_THRESHOLD] * len(attributes), list(run.decisions)
    if val_scores is not None:
        probs = val_scores["flip_tta"] if cfg.tta and val_scores.get("flip_tta") is not None else val_scores["plain"]
    elif saved_probs is not None:
        probs = saved_probs
    else:  # a resumed run that trained no epoch after its best one
        _, probs = validate(model, run.val_set, torch.device("cpu"), "fp32", False, run.spec.mean, run.spec.std,
                            cfg.tta)
    thresholds, decisions = choose_decisions(run.val_set.targets.numpy(), probs, attributes)
    return thresholds, [d if first == "threshold" else first for first, d in zip(run.decisions, decisions)]


def describe(run: Run, history: dict, probe: dict | None, val_scores: dict | None, thresholds: list[float],
             decisions: list[str]) -> CheckpointMeta:
    """The checkpoint's metadata for this run."""
    cfg, names = run.cfg, run.names
    val_names = [names[i] for i in run.val_idx]
    return CheckpointMeta(
        backbone=cfg.backbone, attributes=list(run.index.attributes), image_size=cfg.image_size,
        mean=list(run.spec.mean), std=list(run.spec.std), thresholds=thresholds, decision=decisions, tta=cfg.tta, probe=probe, pos_weight=run.pos_weight.tolist(),
        precision=run.precision, config=asdict(cfg), history=history,
        split={"file": str(Path(cfg.out).with_name(config.SPLIT_NAME)), "val": val_names},
        # honest validation probabilities when the saved model has seen the validation images (probe_cross_fit)
        validation_scores=None if val_scores is None else {
            "names": val_names, **{k: None if v is None else v.tolist() for k, v in val_scores.items()}},
        data={"dir": str(cfg.data_dir), "labels": str(run.index.table.source),
              "labels_sha256": file_digest(run.index.table.source), "missing": run.index.missing,
              "unreadable": sorted(run.cache.failed.values())},
    )


def write(run: Run, model: nn.Module, meta: CheckpointMeta, history: dict) -> tuple[Path, Path | None]:
    """Rank 0 adds the int8 calibration (``int8_calibration``) and writes the checkpoint and the loss plot;
    then every process waits for it. Returns the checkpoint and plot paths."""
    cfg = run.cfg
    out = Path(cfg.out)
    plot = Path(cfg.loss_plot) if cfg.loss_plot and distributed.is_main() else None
    if distributed.is_main():
        if cfg.int8_calibration:  # opt-in, like int8 inference: it costs a ResNet18 run about 10 s
            meta.int8 = _int8_calibration(model, cfg, len(meta.attributes), run.train_plain, meta.probe)
        save_checkpoint(out, model, meta)
        resume_path(out).unlink(missing_ok=True)
    if plot is not None:
        fig = plot_loss_curve(history["loss"], run.steps_per_epoch)
        atomic_savefig(fig, plot, dpi=120, bbox_inches="tight")
        plt.close(fig)
    distributed.barrier()  # every process returns once rank 0 has written the checkpoint
    return out, plot


def _int8_calibration(model: nn.Module, cfg: TrainConfig, n_attributes: int, dataset: ImageDataset,
                      probe: dict | None) -> dict | None:
    """int8 calibration for the checkpoint, or None where its model cannot run in int8 (or calibration
    fails, with a warning: the trained model is saved either way)."""
    if int8.unsupported(cfg.backbone, probe):
        return None
    spec = BACKBONES[cfg.backbone]
    try:
        plain = build_model(cfg.backbone, n_attributes, weights="none")  # as loaded: no distributed BatchNorm
        plain.load_state_dict(model.state_dict())
        return int8.calibrate(plain.eval(), dataset, cfg.image_size, spec.mean, spec.std)
    except Exception as e:  # an optional extra must not cost the training run
        warnings.warn(f"int8 calibration failed ({str(e)[:200]}); the checkpoint is saved without it "
                      "(python -m aimonk calibrate-int8 can add it later)")
        return None
