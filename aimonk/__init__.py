"""aimonk: multilabel image attribute classification with NA-aware training.

The notebooks in ``notebooks/`` and the CLI (``python -m aimonk``) both call this package.
"""

__version__ = "0.1.0"
