# %% [markdown]
# # 05 · Audit the labels
#
# Which labels do the images dispute? This step closes the loop of 01 to 04: it scores every known
# label (NA is never scored), says per attribute whether there is enough signal to judge labels at
# all, lists copies of an image whose labels disagree, and offers the suspects for review. The review
# writes `labels.reviewed.txt` and a log beside it; `labels.txt` is never changed. Retrain on the
# reviewed file with `-p labels reports/audit/labels.reviewed.txt` (02 and 03) or
# `python -m aimonk train --labels ...`.
#
# Run it on other data with `papermill notebooks/05_audit.ipynb out.ipynb -p data_dir /path/to/data`;
# the same audit runs from the command line as `python -m aimonk audit --data DIR`.

# %% tags=["parameters"]
data_dir: str = "data/sample"  # folder with labels.txt and images/ (relative paths start at the repository root)
labels: str = ""  # labels file to audit instead of data_dir/labels.txt (e.g. an earlier review's output)
review_dir: str = ""  # where labels.reviewed.txt and review_log.jsonl go ("" means reports/audit/)
backbones: str = "efficientnet_lite0,efficientnet_lite1"  # frozen networks whose features the probe reads
folds: int = 5  # cross-fitting folds: each image is scored by probes that never saw it
top: int = 50  # suspects offered for review
reviewer: str = ""  # name recorded in the review log ("" for the login name)
seed: int = 0  # seeds the folds

# %% [markdown]
# ## Setup

# %%
import pandas as pd
from IPython.display import Markdown

from aimonk import config, plots
from aimonk.audit import audit
from aimonk.data import load_image
from aimonk.review_panel import review_panel

data_path = config.resolve_path(data_dir)
out_path = config.resolve_path(review_dir) if review_dir else config.REPORTS_DIR / "audit"
labels_path = config.resolve_path(labels) if labels else None
{"data": str(data_path), "labels": str(labels_path or data_path / "labels.txt"), "review output": str(out_path)}

# %% [markdown]
# ## Out-of-sample scores
#
# Frozen ImageNet features of every image are computed once and cached (keyed by the image bytes, the
# network and the size), so a second audit computes none. A logistic-regression probe on them is
# cross-fitted over folds grouped by image content: each image is scored by probes that never saw it
# or a copy of it, and each probe is fitted without the labels its own training images dispute.

# %%
result = audit(data_path, labels_path, [b.strip() for b in backbones.split(",") if b.strip()], n_folds=folds,
               seed=seed)
f"{len(result.names)} images, {int((result.targets >= 0).sum())} known labels scored"

# %% [markdown]
# ## The signal gate
#
# An attribute is audited only where the probe's out-of-sample ROC-AUC has a 95 % bootstrap interval
# above 0.5. Elsewhere the model has no signal, so it cannot tell a wrong label from a right one, and
# the audit says so instead of ranking noise. `n_flagged` counts the labels confident learning flags
# (the other class is confidently predicted).

# %%
result.signal[["n_known", "n_positive", "auc", "auc_lo", "auc_hi", "signal", "n_flagged", "verdict"]].round(3)

# %%
Markdown("\n\n".join(result.summary().splitlines()))

# %% [markdown]
# ## Copies that disagree
#
# Byte-identical images, and images whose perceptual hashes differ in a few bits, are copies; where
# their known labels differ, one of them is certainly wrong. These come first in the review.

# %%
pd.DataFrame([{"kind": g["kind"], "images": ", ".join(g["images"]), "disagree on": ", ".join(g["conflicting"]),
               "labels": "; ".join(f"{n}: {' '.join(t)}" for n, t in g["labels"].items())}
              for g in result.duplicates], columns=["kind", "images", "disagree on", "labels"])

# %% [markdown]
# ## The suspects
#
# Conflicting copies first, then the labels of audited attributes by issue score (one minus the
# probability the probe gives the label as written).

# %%
suspects = result.suspects(top)
suspects.head(20).round(3)

# %%
shown = suspects.head(12)
fig = plots.plot_image_grid([load_image(data_path / "images" / n) for n in shown["image"]],
                            [f"{n}\n{a} labelled {lab}, p {p:.2f}" for n, a, lab, p in
                             zip(shown["image"], shown["attribute"], shown["label"], shown["probability"])])
plots.save(fig, "audit_suspects.png")
fig

# %% [markdown]
# ## Review
#
# Keep, flip, set NA or drop the image. Every click is saved at once to `labels.reviewed.txt` and
# `review_log.jsonl` (who, when, what) in the review folder; reopening the notebook resumes where the
# log ends. Run interactively in JupyterLab (under papermill the panel is only drawn).

# %%
panel = review_panel(result, data_path, out_path, top=top, reviewer=reviewer or None)
panel

# %% [markdown]
# ## Next
#
# Retrain on the reviewed labels and compare the held-out report of 03 with the one before:
#
# ```
# python -m aimonk.run_notebooks --data DATA -p labels reports/audit/labels.reviewed.txt 02_train 03_evaluate
# ```
