"""The progress bar every loop uses: ``tqdm.auto`` (a widget in Jupyter), or plain text when asked.

``AIMONK_PROGRESS=text`` selects the text bar even inside a kernel. The notebook runner sets it:
a papermill run then streams the bar to the terminal while it runs, and the executed notebook
stores the bar's final state instead of a widget that shows 0 % once its kernel is gone.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm as _text_tqdm

PROGRESS_ENV = "AIMONK_PROGRESS"  # "text" forces the plain-text bar; anything else: tqdm.auto


def tqdm(*args, **kwargs):
    """A tqdm bar: ``tqdm.auto``'s, or the plain-text one when ``AIMONK_PROGRESS=text``."""
    cls = _text_tqdm if os.environ.get(PROGRESS_ENV, "").lower() == "text" else _auto_tqdm
    return cls(*args, **kwargs)
