"""Paths and constants. Importing this module creates nothing and configures nothing."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"
# Outputs; the environment variables let tests write elsewhere so they never overwrite a user's model.
REPORTS_DIR = Path(os.environ.get("AIMONK_REPORTS_DIR", PROJECT_ROOT / "reports"))
FIGURES_DIR = REPORTS_DIR / "figures"
MODELS_DIR = Path(os.environ.get("AIMONK_MODELS_DIR", PROJECT_ROOT / "models"))

DEFAULT_MODEL_NAME = "model.pth"
SPLIT_NAME = "split.json"
LOSS_PLOT_NAME = "loss_curve.png"

# Loss-plot labels required by the original specification.
LOSS_PLOT_TITLE = "Aimonk_multilabel_problem"
LOSS_PLOT_XLABEL = "iteration_number"
LOSS_PLOT_YLABEL = "training_loss"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Tokens accepted in labels.txt (compared case-insensitively).
POSITIVE_TOKENS = frozenset({"1"})
NEGATIVE_TOKENS = frozenset({"0"})
NA_TOKENS = frozenset({"na", "nan", "n/a"})

DEFAULT_MODEL = MODELS_DIR / DEFAULT_MODEL_NAME

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Largest upload the UI accepts, in bytes.
MAX_UPLOAD_BYTES = 20 * 2**20

# Decoded-image cache; override with AIMONK_CACHE_DIR.
CACHE_DIR = Path(os.environ.get("AIMONK_CACHE_DIR", Path.home() / ".cache" / "aimonk"))


def resolve_path(path: str | os.PathLike) -> Path:
    """Resolve a user path: absolute paths stay, relative paths are taken from the project root.

    Args:
        path: a file or folder path as given in a notebook parameter.
    Returns:
        An absolute ``Path``.
    """
    p = Path(path).expanduser()
    return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()


def output_dir(out_dir: str | os.PathLike = "") -> Path:
    """The folder for model.pth and split.json: ``out_dir`` resolved, or ``MODELS_DIR`` if empty."""
    return resolve_path(out_dir) if str(out_dir) else MODELS_DIR
