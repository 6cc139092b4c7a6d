"""The training configuration: ``TrainConfig`` (every choice, with its help text) and the named recipes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from aimonk import config


def _field(default, help: str):
    """A dataclass field whose help text the CLI shows (``--help``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every training choice in one place; the 02 notebook parameters and the CLI flags both fill it."""

    data_dir: str = _field(str(config.SAMPLE_DIR), "folder with labels.txt and images/")
    labels: str = _field("", 'labels file ("" = data_dir/labels.txt), e.g. an audit review\'s labels.reviewed.txt')
    out: str = _field(str(config.DEFAULT_MODEL), "where the trained checkpoint goes")
    loss_plot: str = _field(str(config.FIGURES_DIR / config.LOSS_PLOT_NAME), 'loss curve PNG ("" to skip)')
    epochs: int = _field(20, "passes over the training set")
    batch_size: int = _field(16, "images per optimisation step")
    lr: float = _field(1e-4, "peak learning rate (of the head; the backbone gets lr * backbone_lr_mult)")
    backbone_lr_mult: float = _field(1.0, "backbone lr as a share of lr (< 1 keeps pretrained features closer)")
    optimizer: str = _field("adam", '"adam" or "adamw"')
    weight_decay: float = _field(0.0, "decoupled for adamw, L2 for adam")
    schedule: str = _field("constant", '"constant" or "cosine" (per-iteration, with warmup)')
    warmup_epochs: float = _field(0.0, "linear warmup length for the cosine schedule")
    freeze_epochs: int = _field(0, "train only the head for this many epochs first")
    head_init: str = _field("random", '"random" or "linear_probe" (fit the head on frozen features first: LP-FT)')
    image_size: int = _field(224, "images are resized to image_size x image_size")
    progressive_epochs: int = _field(0, "train the first N epochs on progressive_size px images, then image_size "
                                        "(progressive resizing, fastai's small images first; validation stays at image_size)")
    progressive_size: int = _field(128, "the image size of the first progressive_epochs epochs (below image_size)")
    backbone: str = _field("resnet18", '"resnet18", "efficientnet_lite0" (or _lite1, _lite2 with their weight package)')
    weights: str = _field("imagenet", '"imagenet", "none" (random init) or a path to a state dict')
    on_missing_weights: str = _field("warn", '"warn": random init + loud warning; "error": stop')
    augment: str = _field("flip", '"none", "flip", "crop" (RandomResizedCrop + flip) or "trivial" (crop + TrivialAugmentWide)')
    loss_normalization: str = _field("known", '"known" (mean over known labels) or "partial" (partial-BCE)')
    ema_decay: float = _field(0.0, "exponential moving average of weights (0 = off)")
    tta: bool = _field(False, "average predictions over a horizontal flip at evaluation/inference")
    probe_ensemble: bool = _field(False, "average with a logistic-regression probe on the frozen pretrained network")
    probe_cross_fit: bool = _field(False, "refit the probe on training + validation images, scoring validation out of fold")
    probe_feature_cache: bool = _field(True, "read the probe's frozen features from the on-disk cache in cache_dir "
                                             "(keyed by image digest, network and size); only new images are computed")
    probe_backbones: str = _field("", 'comma-separated frozen networks whose concatenated features the probe reads ("" = backbone)')
    int8_calibration: bool = _field(False, "end by calibrating int8 inference into the checkpoint (ResNet18, about "
                                           "10 s; `python -m aimonk calibrate-int8` adds it later)")
    keep_best: bool = _field(False, "keep the epoch with the best validation macro AP (early stopping)")
    val_fraction: float = _field(0.2, "share of images held out for validation (0 = none)")
    seed: int = _field(0, "seeds the split, initialisation, shuffling and augmentation")
    precision: str = _field("auto", '"auto" (measured on the CPU, with the memory format), "fp32", "bf16" or "fp16" (CUDA)')
    channels_last: bool = _field(True, 'NHWC memory format, where precision is not "auto" (auto measures it)')
    num_workers: int = _field(0, "DataLoader workers; cached uint8 reads are cheap, so 0 is fastest on 2 cores")
    device: str = _field("auto", '"auto" (cuda, then mps, then cpu) or an explicit torch device')
    cache_dir: str = _field("", 'decoded-image cache ("" = ~/.cache/aimonk or $AIMONK_CACHE_DIR)')
    resume: bool = _field(False, "continue from the resumable checkpoint next to `out`")
    progress: bool = _field(True, "show tqdm progress bars")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict of field values.

        Raises:
            ValueError: for a key that is not a field, listing the fields (a misspelt name is never ignored).
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; the settings are: {', '.join(names)}")
        return cls(**values)


ORIGINAL_RECIPE = dict(
    backbone="resnet18", optimizer="adam", lr=1e-4, batch_size=16, epochs=20, schedule="constant",
    augment="flip", freeze_epochs=0, ema_decay=0.0, tta=False, keep_best=False, loss_normalization="known",
    probe_ensemble=False, probe_cross_fit=False,
)  # the seed project's recipe, kept reproducible



PRETRAINED_RECIPE = dict(
    backbone="efficientnet_lite0", weights="imagenet", optimizer="adamw", lr=1e-3, backbone_lr_mult=0.3,
    weight_decay=0.01, batch_size=32, epochs=6, schedule="cosine", warmup_epochs=0.3, freeze_epochs=1,
    head_init="random", augment="crop", ema_decay=0.0, tta=False, keep_best=True, loss_normalization="known",
    image_size=192, probe_ensemble=True, probe_cross_fit=True, probe_backbones="efficientnet_lite0,efficientnet_lite1",
)  # ImageNet fine-tuning that runs offline, the 02 default: PRETRAINED_12EP_RECIPE cut to 6 epochs at 192 px
# (reports/benchmarks/quality_clipart.md measures both in turns).
PRETRAINED_12EP_RECIPE = {**PRETRAINED_RECIPE, "epochs": 12, "warmup_epochs": 0.5, "freeze_epochs": 2,
                          "image_size": 224, "precision": "fp32", "probe_feature_cache": False}
# the previous default as it ran: 12 epochs at 224 px, in fp32 (precision auto did not measure bf16 for the Lite
# backbones then), its probe computing every frozen feature on each run; about 3x the time
# Flip TTA is off: on the clipart folds it added 0.003 held-out macro AP to the 12-epoch recipe (0.854 against
# 0.851) for twice the inference cost of three networks (docs/quality.md); --tta turns it back on.



RECIPES = {"pretrained": PRETRAINED_RECIPE, "original": ORIGINAL_RECIPE}  # name -> preset; "pretrained" is the default



def recipe_config(recipe: str = "pretrained", **values) -> TrainConfig:
    """A ``TrainConfig`` from a named preset in ``RECIPES``, with ``values`` (e.g. data_dir, epochs) on top."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return TrainConfig.from_dict({**RECIPES[recipe], **values})

