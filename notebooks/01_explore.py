# %% [markdown]
# # 01 · Explore the data
#
# A health and label report for one data folder (`labels.txt` plus `images/`), made before any
# training: what is there, what is broken, how the labels are distributed, and what the training
# step will do about it. Every figure is also saved under `reports/figures/`.
#
# Run it on other data with `papermill notebooks/01_explore.ipynb out.ipynb -p data_dir /path/to/data`.

# %% tags=["parameters"]
data_dir: str = "data/sample"  # folder with labels.txt and images/ (relative paths start at the repository root)
val_fraction: float = 0.2  # as in 02_train: share of images held out for validation
seed: int = 0  # as in 02_train: seeds the train/validation split
n_samples: int = 12  # images in the sample grid
workers: int = 2  # threads that decode images for the health check

# %% [markdown]
# ## Setup
#
# Relative paths are taken from the repository root, so this runs the same from `notebooks/`.

# %%
from IPython.display import Markdown

from aimonk import config, plots
from aimonk.explore import dataset_health, mode_summary, size_summary

data_path = config.resolve_path(data_dir)
data_path

# %% [markdown]
# ## Files: rows, images present, missing, unlisted, unreadable
#
# `labels.txt` is matched against `images/`. Rows whose image is missing and images that no row
# mentions are left out of training; every listed image is fully decoded here, with the same
# loader training uses, so an unreadable file shows up now rather than mid-training.

# %%
health = dataset_health(data_path, workers=workers)
health.counts()

# %% [markdown]
# Which files are missing, unlisted or unreadable (at most 20 of each shown):

# %%
{
    "labelled but missing": health.index.missing[:20],
    "unlisted": health.index.unlisted[:20],
    "unreadable": health.unreadable["error"].tolist()[:20],
}

# %% [markdown]
# ## Image modes and sizes
#
# Every image is converted to RGB (transparency composited on white, grayscale and palette images
# expanded) and resized to a square, so modes and aspect ratios tell how much that changes the pixels.

# %%
mode_summary(health.images)

# %%
size_summary(health.images)

# %%
fig = plots.plot_image_sizes(health.images[health.images["width"] > 0])
plots.save(fig, "image_sizes.png");

# %% [markdown]
# ## Byte-identical duplicates
#
# Images with the same sha256 are the same picture. Training keeps each such group on one side of
# the train/validation split, so a copy can never leak into validation. Their labels should agree;
# an NA next to a known label is not a conflict.

# %%
health.duplicates

# %%
Markdown(health.duplicate_message())

# %% [markdown]
# ## Labels per attribute: 1 / 0 / NA
#
# `NA` means unknown. NA labels are masked out of the loss (never treated as negatives), and the
# positive rate is counted over known labels only.

# %%
counts = health.label_counts()
counts

# %%
fig = plots.plot_label_counts(counts)
plots.save(fig, "label_counts.png");

# %% [markdown]
# ## Where the NA labels are
#
# One row per image (black = unknown). Stripes across several attributes would mean whole images are unlabelled.

# %%
fig = plots.plot_na_pattern(health.targets, health.index.attributes)
plots.save(fig, "na_pattern.png");

# %% [markdown]
# ## Co-occurrence of attributes
#
# How often the column attribute is present when the row attribute is, over images where both are known.

# %%
fig = plots.plot_cooccurrence(health.targets, health.index.attributes)
plots.save(fig, "cooccurrence.png");

# %% [markdown]
# ## The `pos_weight` training will use
#
# Each attribute's positives are weighted by `negatives / positives` over the known labels of the
# training part of the split (the same grouped, stratified split 02_train makes with these
# `val_fraction` and `seed` values). A weight far above 1 marks a rare attribute.

# %%
health.training_pos_weight(val_fraction=val_fraction, seed=seed)

# %% [markdown]
# ## Sample images with their labels
#
# Caption: file name, then the attributes labelled 1, then those labelled NA.

# %%
images, titles = health.sample(n=n_samples, seed=seed)
fig = plots.plot_image_grid(images, titles)
plots.save(fig, "sample_grid.png");
