# %% [markdown]
# # 03 · Evaluate
#
# Scores the model from 02_train on its saved validation split, one attribute at a time, with NA
# labels excluded. Every number sits next to a reference that says what it is worth: the
# majority-class baseline, the AP of chance (the positive rate), a bootstrap confidence interval for
# ROC-AUC and the AUC that shuffled labels reach. Training already chose per-attribute decisions on
# these validation images and saved them; here the choice is made again in the open, with the plotted
# sweep and this notebook's `n_boot` and `seed`, and written back into the checkpoint for 04_infer.
#
# **Read with care.** The validation set is small, so intervals are wide. Metrics of *tuned*
# thresholds are measured on the very images they were tuned on and are **optimistic**; the
# threshold-0.5 numbers and the ranking metrics (AP, ROC-AUC) are the fair ones. A truly held-out
# test set is the only unbiased check.

# %% tags=["parameters"]
data_dir: str = "data/sample"  # the folder 02_train trained on (labels.txt and images/)
out_dir: str = ""  # where 02_train wrote model.pth and split.json ("" means models/)
labels: str = ""  # the labels file 02_train read ("" for the one split.json records, else data_dir/labels.txt)
n_boot: int = 1000  # bootstrap resamples for the ROC-AUC confidence interval
n_perm: int = 200  # label shuffles for the chance reference
seed: int = 0  # seeds the bootstrap and the shuffles

# %% [markdown]
# ## Model and validation split

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Markdown

from aimonk import config, plots
from aimonk.data import load_split
from aimonk.evaluate import validation_scores
from aimonk.checkpoint import update_checkpoint
from aimonk.metrics import apply_decisions, attribute_report, choose_decisions, summarize, threshold_sweep

data_path = config.resolve_path(data_dir)
model_path = config.output_dir(out_dir) / config.DEFAULT_MODEL_NAME
split = load_split(model_path.with_name(config.SPLIT_NAME))
if Path(split["data_dir"]).resolve() != data_path:
    raise ValueError(f"{model_path} was trained on {split['data_dir']}, not {data_path}: pass -p data_dir accordingly")
pd.Series({"model": str(model_path), "data": str(data_path), "validation images": len(split["val"])}, name="").to_frame()

# %% [markdown]
# ## Scores on the validation images
#
# One probability per image and attribute. Every decision below is chosen on these scores, so they
# must come from a model that did not see these images. With the probe's cross-fitting (the
# `pretrained` recipe), the saved probe was refitted on the validation images too; its scores here are
# then the out-of-fold ones stored at training time, from probes fitted without the image scored.

# %%
labels_path = config.resolve_path(labels) if labels else (split.get("labels") or None)
targets, probs, names, predictor = validation_scores(model_path, data_path, split["val"], labels=labels_path)
attributes = predictor.attributes
pd.DataFrame(probs, index=pd.Index(names, name="image"), columns=attributes).describe().round(3)

# %% [markdown]
# ## The decisions training saved

# %%
saved = pd.DataFrame({"threshold": predictor.meta.thresholds, "decision": predictor.meta.decisions},
                     index=pd.Index(attributes, name="attribute"))
saved.round(2)

# %% [markdown]
# ## Per-attribute metrics at threshold 0.5
#
# - `ap`: average precision; compare with `pos_rate`, the AP of a random ranking.
# - `roc_auc` with its 95 % bootstrap interval `auc_lo`-`auc_hi`; `chance_auc_lo`-`chance_auc_hi` is
#   the range shuffled labels reach, `perm_p` the share of shuffles that do as well as the model.
# - `precision`, `recall`, `f1` of the positive class next to `majority_f1`, the F1 of always
#   predicting the majority class.

# %%
report_05 = attribute_report(targets, probs, attributes, n_boot=n_boot, n_perm=n_perm, seed=seed)
report_05.drop(columns=["verdict", "decision", "threshold"]).round(3)

# %% [markdown]
# ## Verdicts
#
# Does the model beat chance on each attribute? "Learned signal" needs the whole 95 % AUC interval above 0.5.

# %%
Markdown("\n".join(f"- **{a}**: {v}" for a, v in report_05["verdict"].items()))

# %%
fig = plots.plot_metric_bars(report_05)
plots.save(fig, "metrics_vs_baseline.png");

# %% [markdown]
# ## Precision-recall curves
#
# The dashed line is chance: the positive rate among known labels.

# %%
fig = plots.plot_pr_curves(targets, probs, attributes)
plots.save(fig, "pr_curves.png");

# %% [markdown]
# ## Choosing decisions: a threshold sweep on validation
#
# For each attribute, precision, recall and F1 over thresholds from 0.02 to 0.98. Where the AUC
# interval shows signal, the threshold with the best F1 is chosen (dashed line). Where it does not,
# a threshold would only fit noise, so the attribute falls back to its majority decision
# (always present, or always absent; no dashed line), stated openly below.

# %%
thresholds, decisions = choose_decisions(targets, probs, attributes, n_boot=n_boot, seed=seed)
sweep = threshold_sweep(targets, probs, attributes)
chosen = {a: t for a, t, d in zip(attributes, thresholds, decisions) if d == "threshold"}
fig = plots.plot_threshold_sweep(sweep, chosen=chosen)
plots.save(fig, "threshold_sweep.png");

# %%
pd.DataFrame({"threshold": thresholds, "decision": decisions}, index=pd.Index(attributes, name="attribute"))

# %% [markdown]
# ## Confusion matrices with the chosen decisions
#
# NA labels excluded; rows are the truth.

# %%
fig = plots.plot_confusion_matrices(targets, apply_decisions(probs, thresholds, decisions), attributes)
plots.save(fig, "confusion_matrices.png");

# %% [markdown]
# ## Write the decisions into the checkpoint
#
# `predict()`, the command line and the upload panel in 04_infer use these from now on.

# %%
meta = update_checkpoint(model_path, thresholds=thresholds, decision=decisions)
pd.DataFrame({"threshold": meta.thresholds, "decision": meta.decisions, "saved by training": saved["decision"]},
             index=pd.Index(meta.attributes, name="attribute")).round(2)

# %% [markdown]
# ## Per-attribute metrics with the chosen decisions
#
# Optimistic: the thresholds were picked on these very images. Compare `f1` with `majority_f1`.

# %%
report_tuned = attribute_report(targets, probs, attributes, thresholds, decisions, n_boot=n_boot, n_perm=n_perm, seed=seed)
report_tuned[["decision", "threshold", "precision", "recall", "f1", "majority_f1"]].round(3)

# %% [markdown]
# ## Summary
#
# Macro means over attributes. The tuned row is optimistic: it was tuned and measured on the same validation images.

# %%
at_05, tuned = summarize(report_05), summarize(report_tuned)
summary = pd.DataFrame({
    "macro AP": [at_05["macro_ap"], tuned["macro_ap"], at_05["macro_pos_rate"]],
    "macro F1": [at_05["macro_f1"], tuned["macro_f1"], at_05["macro_majority_f1"]],
}, index=["model, threshold 0.5", "model, tuned decisions (optimistic)", "majority baseline (AP = positive rate)"])
print(summary.round(3).to_string())
summary.round(3)
