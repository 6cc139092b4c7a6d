"""The speed benchmark's tuning experiments (``--tune``): the project loop's knobs measured in turns on cached data.

DataLoader workers / pinning / persistent workers on the cached loader, precision x memory format
for the backbone, the Adam kernel, BatchNorm folding, and with ``--compile`` also ``torch.compile``
(``--experiments`` picks some). Other jobs on the machine shrink the ratios (OpenMP threads wait for
cores, and the faster loop loses more): compare ratios within one run and note the load average it prints.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from aimonk.benchmark.measure import race, steady_rate
from aimonk.benchmark.workload import SpeedConfig, drop_lone_last, load_images
from aimonk.cache import DecodedCache
from aimonk.data import ImageDataset
from aimonk.inference import fold_batchnorm, infer_probabilities
from aimonk.losses import MaskedBCEWithLogitsLoss, compute_pos_weight
from aimonk.model import BACKBONES, build_model
from aimonk.runtime import resolve_precision, select_device, set_seed
from aimonk.train import train_one_epoch, train_transform
from aimonk.train.loop import make_optimizer

TUNING_EXPERIMENTS = ("loader", "precision", "optimizer", "fold", "compile")


def tune(cfg: SpeedConfig, log: Callable[[str], None] = print) -> dict:
    """Measure the project loop's knobs on cached data, variants taking turns; print and return medians.

    - DataLoader ``num_workers`` 0/1/2, ``persistent_workers`` and (CUDA only) ``pin_memory``;
      plus the loader alone, to show whether it can be the bottleneck.
    - precision x memory format for training epochs and batched inference of the backbone.
    - the Adam kernel (per-parameter loop, foreach, fused).
    - BatchNorm folding for inference (what ``Predictor`` does).
    - with ``cfg.compile``: ``torch.compile`` first epoch (compilation included) and steady epochs vs eager.

    Args:
        cfg: the run's settings; ``experiments``, ``compile``, ``tune_images`` and ``tune_rounds`` pick the work.
        log: where the tables go, line by line.

    Returns:
        The device, threads and backbone, plus each chosen experiment's figures under its name.
    """
    device = select_device(cfg.device)
    _, paths, targets = load_images(cfg)
    out: dict = {"device": str(device), "threads": torch.get_num_threads(), "backbone": cfg.backbone}
    with tempfile.TemporaryDirectory(prefix="aimonk-tune-") as tmp:
        cache = DecodedCache(paths, cfg.image_size, tmp, progress=False)
        ok = cache.ok[: cfg.tune_images]
        train_set = ImageDataset(Subset(cache, ok), targets[ok], train_transform("flip", cfg.image_size))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            criterion = MaskedBCEWithLogitsLoss(compute_pos_weight(targets[ok])).to(device)
        log(f"tune: {len(ok)} cached images at {cfg.image_size} px, batch {cfg.batch_size}, {cfg.backbone}, "
            f"device {device} ({torch.get_num_threads()} threads); {cfg.tune_rounds} rounds in turns, medians")
        t = _Tuning(cfg, device, train_set, targets.shape[1], criterion, log)
        chosen = [e.strip() for e in cfg.experiments.split(",") if e.strip()] + (["compile"] if cfg.compile else [])
        for name in dict.fromkeys(chosen):
            if name not in TUNING_EXPERIMENTS:
                raise ValueError(f"unknown tuning experiment {name!r}; choose from {', '.join(TUNING_EXPERIMENTS)}")
            out[name] = {"loader": t.loader, "precision": t.precision_and_format, "optimizer": t.optimizer,
                         "fold": t.fold, "compile": t.compile}[name]()
    return out


class _Tuning:
    """The tuning experiments, sharing one cached training set."""

    def __init__(self, cfg: SpeedConfig, device, train_set: ImageDataset, n_attr: int, criterion, log):
        self.cfg, self.device, self.train_set, self.n_attr, self.criterion, self.log = (
            cfg, device, train_set, n_attr, criterion, log)
        self.spec = BACKBONES[cfg.backbone]
        self.precision = resolve_precision(cfg.precision, device, cfg.backbone, image_size=cfg.image_size,
                                           batch_size=cfg.batch_size)
        self.plain = ImageDataset(train_set.images, train_set.targets.numpy())  # no augmentation, for inference
        self.loader0 = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=False,
                                  drop_last=drop_lone_last(len(train_set), cfg.batch_size))

    def model(self, channels_last: bool = True) -> nn.Module:
        set_seed(self.cfg.seed)
        m = build_model(self.cfg.backbone, self.n_attr, weights="none").to(self.device)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    def epoch(self, model, optimizer, loader=None, precision=None, channels_last=True, scaler=None) -> Callable:
        return lambda: train_one_epoch(model, loader or self.loader0, self.criterion, optimizer, self.device,
                                       precision or self.precision, channels_last, self.spec.mean, self.spec.std,
                                       scaler=scaler, progress=False)

    def infer(self, model, precision=None, channels_last=True) -> Callable:
        return lambda: infer_probabilities(model, self.plain, self.device, precision or self.precision, channels_last,
                                           self.spec.mean, self.spec.std, batch_size=self.cfg.infer_batch_size)

    def show(self, title: str, rates: dict[str, float]) -> dict[str, float]:
        base = next(iter(rates.values()))
        self.log(title)
        for k, v in rates.items():
            self.log(f"  {k:44s} {v:8.1f} img/s  {v / base:5.2f}x")
        return rates

    def loader(self) -> dict:
        variants = [(0, False, False), (1, False, False), (1, True, False), (2, False, False), (2, True, False)]
        if self.device.type == "cuda":
            variants += [(0, False, True), (2, True, True)]
        model = self.model()
        opt = make_optimizer(model.parameters(), "adam", 1e-4, 0.0, self.device)
        runs = {}
        for w, persistent, pin in variants:
            loader = DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=True, num_workers=w,
                                persistent_workers=persistent, pin_memory=pin,
                                drop_last=drop_lone_last(len(self.train_set), self.cfg.batch_size))
            runs[f"num_workers={w} persistent={persistent} pin_memory={pin}"] = self.epoch(model, opt, loader)
        runs["loader alone (no model), num_workers=0"] = lambda: sum(len(x) for x, _ in self.loader0)
        times = race(runs, self.cfg.tune_rounds, self.device)
        return self.show("DataLoader (training epochs on the cached uint8 loader, one model):",
                         {k: steady_rate(v, len(self.train_set)) for k, v in times.items()})

    def precision_and_format(self) -> dict:
        combos = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
        if self.device.type == "cuda":
            combos.append(("fp16", True))
        name = {c: f"{c[0]} {'channels_last' if c[1] else 'NCHW'}" for c in combos}
        models = {c: self.model(c[1]) for c in combos}
        runs = {}
        for c in combos:
            opt = make_optimizer(models[c].parameters(), "adam", 1e-4, 0.0, self.device)
            scaler = torch.amp.GradScaler("cuda") if c[0] == "fp16" else None
            runs[("train", c)] = self.epoch(models[c], opt, precision=c[0], channels_last=c[1], scaler=scaler)
            runs[("infer", c)] = self.infer(models[c], precision=c[0], channels_last=c[1])
        times = race(runs, self.cfg.tune_rounds, self.device)
        res = {name[c]: {"train": steady_rate(times[("train", c)], len(self.train_set)),
                         "infer": steady_rate(times[("infer", c)], len(self.plain))} for c in combos}
        auto = resolve_precision("auto", self.device, self.cfg.backbone, mode="train", image_size=self.cfg.image_size,
                                 batch_size=self.cfg.batch_size)  # measured at the setting of the table above
        best = {kind: max(res, key=lambda k: res[k][kind]) for kind in ("train", "infer")}
        base = res["fp32 NCHW"]
        self.log(f"precision x memory format ({self.cfg.backbone}; model only, cached inputs):")
        for k, v in res.items():
            self.log(f"  {k:20s} train {v['train']:7.1f} img/s ({v['train'] / base['train']:4.2f}x)   "
                     f"infer {v['infer']:7.1f} img/s ({v['infer'] / base['infer']:4.2f}x)")
        self.log(f"  fastest: training {best['train']}, inference {best['infer']}; resolve_precision('auto') gives "
                 f"{auto} (BACKBONES[{self.cfg.backbone!r}].cpu_bf16_infer={self.spec.cpu_bf16_infer})")
        return {"variants": res, "auto": auto, "fastest_train": best["train"], "fastest_infer": best["infer"],
                "cpu_bf16_infer_flag": self.spec.cpu_bf16_infer}

    def optimizer(self) -> dict:
        kinds = {"per-parameter loop (torch's default on CPU)": dict(foreach=False), "foreach": dict(foreach=True),
                 "fused (make_optimizer)": dict(fused=True)}
        runs = {}
        for k, kw in kinds.items():
            model = self.model()
            runs[k] = self.epoch(model, torch.optim.Adam(model.parameters(), lr=1e-4, **kw))
        times = race(runs, self.cfg.tune_rounds, self.device)
        return self.show(f"Adam kernel ({self.precision}, channels_last, training epochs):",
                         {k: steady_rate(v, len(self.train_set)) for k, v in times.items()})

    def fold(self) -> dict:
        trained = self.model().eval()
        folded = copy.deepcopy(trained)
        n = fold_batchnorm(folded)
        runs = {"as trained": self.infer(trained),
                "BatchNorm folded": self.infer(folded.to(memory_format=torch.channels_last))}
        times = race(runs, self.cfg.tune_rounds, self.device)
        return self.show(f"inference ({self.precision}, channels_last, model only), {n} BatchNorms folded "
                         "as Predictor does:", {k: steady_rate(v, len(self.plain)) for k, v in times.items()})

    def compile(self) -> dict:
        loader = DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=False, drop_last=True)
        models = {"eager": self.model(), "torch.compile": torch.compile(self.model())}
        runs = {k: self.epoch(m, make_optimizer(m.parameters(), "adam", 1e-4, 0.0, self.device), loader)
                for k, m in models.items()}
        times = race(runs, self.cfg.tune_rounds, self.device)
        n = len(loader) * self.cfg.batch_size
        res = {k: {"first_epoch_s": v[0], "steady": steady_rate(v, n)} for k, v in times.items()}
        self.log(f"torch.compile ({self.precision}, channels_last, training, {n} images per epoch):")
        for k, v in res.items():
            self.log(f"  {k:14s} first epoch {v['first_epoch_s']:7.1f} s   steady {v['steady']:7.1f} img/s")
        eager, comp = res["eager"], res["torch.compile"]
        self.log(f"  compiled/eager steady: {comp['steady'] / eager['steady']:.2f}x; the first epoch takes "
                 f"{comp['first_epoch_s'] - eager['first_epoch_s']:.0f} s longer")
        return res
