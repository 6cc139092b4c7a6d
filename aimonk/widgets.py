"""The ipywidgets 8 upload panel of ``04_infer``: upload an image, see per-attribute confidences.

The model runs once per upload; moving the threshold slider only re-decides from the stored
probabilities. Everything a browser would do can be driven from Python, for tests::

    panel = upload_panel("models/model.pth")
    panel.upload.value = ({"name": "x.jpg", "type": "image/jpeg", "size": n,
                           "content": memoryview(data), "last_modified": datetime.now(timezone.utc)},)
    panel.present          # ['Attr1', ...]
    panel.slider.value = 0.9
"""

from __future__ import annotations

import html
import io
import os

import ipywidgets as widgets
import numpy as np
from PIL import Image, ImageOps

from aimonk import config
from aimonk.checkpoint import CheckpointError
from aimonk.data import ImageLoadError, decode_uint8, load_image
from aimonk.predict import Predictor, get_predictor

PRESENT_COLOR = "#2a9d8f"
ABSENT_COLOR = "#c8c8c8"
ERROR_COLOR = "#c0392b"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def thumbnail_png(img: Image.Image, size: int) -> bytes:
    """``img`` fitted into a ``size`` x ``size`` square (aspect kept, light padding), as PNG bytes."""
    boxed = ImageOps.pad(img.convert("RGB"), (size, size), color=(245, 245, 245))
    buf = io.BytesIO()
    boxed.save(buf, format="PNG")
    return buf.getvalue()


class UploadPanel(widgets.VBox):
    """The upload panel; a ``VBox`` whose parts are attributes so tests can reach them.

    Args:
        predictor: a loaded ``Predictor`` (``None`` shows ``error`` and disables the upload).
        default_threshold: one threshold for every attribute, or ``None`` to start with the
            checkpoint's tuned per-attribute decisions.
        display_size: side in pixels of the square the uploaded image is shown in.
        max_bytes: largest accepted upload.
        error: message shown when there is no predictor.

    Parts: ``upload`` (FileUpload), ``slider`` (threshold), ``tuned`` (Checkbox: use the
    checkpoint's decisions), ``message`` (errors and hints), ``image``, ``result`` (seed-format
    text), ``bars`` and ``status`` (per attribute). State: ``name``, ``probs``, ``present``.
    """

    def __init__(self, predictor: Predictor | None, default_threshold: float | None = None,
                 display_size: int = 256, max_bytes: int = config.MAX_UPLOAD_BYTES, error: str = ""):
        self.predictor = predictor
        self.display_size = int(display_size)
        self.max_bytes = int(max_bytes)
        self.name: str | None = None
        self.probs: np.ndarray | None = None  # (n_attributes,) for the current image
        self.present: list[str] = []
        attributes = predictor.attributes if predictor is not None else []
        tuned_available = predictor is not None and (
            any(t != 0.5 for t in predictor.meta.thresholds)
            or any(d != "threshold" for d in predictor.meta.decisions)
        )

        self.title = widgets.HTML(self._title_html())
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="Upload image",
                                         button_style="primary", disabled=predictor is None)
        self.slider = widgets.FloatSlider(
            value=0.5 if default_threshold is None else float(default_threshold), min=0.0, max=1.0, step=0.01,
            description="threshold", readout_format=".2f", continuous_update=True,
            layout=widgets.Layout(width="320px"),
        )
        self.tuned = widgets.Checkbox(
            value=default_threshold is None,
            description="per-attribute tuned decisions" + ("" if tuned_available else " (none tuned yet: 0.5)"),
            indent=False, layout=widgets.Layout(width="auto"),
        )
        self.message = widgets.HTML(self._hint_html(error))
        self.image = widgets.Image(format="png", width=self.display_size, height=self.display_size,
                                   layout=widgets.Layout(width=f"{self.display_size}px",
                                                         height=f"{self.display_size}px",
                                                         border="1px solid #ddd"))
        self.result = widgets.HTML("")
        self.bars = {a: widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description=a,
                                              style={"bar_color": ABSENT_COLOR, "description_width": "80px"},
                                              layout=widgets.Layout(width="300px"))
                     for a in attributes}
        self.status = {a: widgets.HTML("") for a in attributes}
        rows = [widgets.HBox([self.bars[a], self.status[a]]) for a in attributes]
        self.results_box = widgets.VBox([self.result, *rows], layout=widgets.Layout(padding="0 0 0 16px"))
        self.body = widgets.HBox([self.image, self.results_box], layout=widgets.Layout(display="none"))

        super().__init__([self.title, widgets.HBox([self.upload]), widgets.HBox([self.slider, self.tuned]),
                          self.message, self.body], layout=widgets.Layout(padding="8px"))
        self.upload.observe(self._on_upload, names="value")
        self.slider.observe(self._on_slider, names="value")
        self.tuned.observe(lambda _: self.redecide(), names="value")

    # ------------------------------------------------------------------ text

    def _title_html(self) -> str:
        if self.predictor is None:
            return "<h3 style='margin:0'>Image attributes</h3>"
        m = self.predictor.meta
        return (f"<h3 style='margin:0'>Image attributes</h3><span style='color:#666'>model "
                f"<code>{html.escape(self.predictor.path.name)}</code>: {html.escape(str(m.backbone))}, "
                f"{m.image_size} px, {len(self.predictor.attributes)} attributes</span>")

    def _hint_html(self, error: str = "") -> str:
        if error:
            return f"<span style='color:{ERROR_COLOR}'>{html.escape(error)}</span>"
        return (f"<span style='color:#666'>Upload a JPEG, PNG or other image (at most "
                f"{_size(self.max_bytes)}).</span>")

    def _error(self, text: str) -> None:
        self.name, self.probs, self.present = None, None, []
        self.image.value = b""
        self.result.value = ""
        self.body.layout.display = "none"
        self.message.value = f"<span style='color:{ERROR_COLOR}'><b>{html.escape(text)}</b></span>"

    # ------------------------------------------------------------------ handlers

    @property
    def threshold(self) -> float | None:
        """The threshold in force: the slider's value, or ``None`` for the tuned decisions."""
        return None if self.tuned.value else float(self.slider.value)

    def _on_upload(self, change: dict) -> None:
        if change["new"]:
            self.handle_upload(change["new"][-1])

    def _on_slider(self, change: dict) -> None:
        if self.tuned.value:
            self.tuned.value = False  # moving the slider means: one threshold for all (re-decides)
        else:
            self.redecide()

    def handle_upload(self, item: dict) -> None:
        """Check, decode and score one ``FileUpload`` entry (dict with name, size, content)."""
        name = str(item.get("name") or "upload")
        content = item.get("content", b"")
        size = max(int(item.get("size") or 0), len(content))
        if size > self.max_bytes:
            self._error(f"{name} is {_size(size)}; the limit is {_size(self.max_bytes)}. Please upload a smaller image.")
            return
        if size == 0:
            self._error(f"{name} is empty (0 bytes).")
            return
        try:
            img = load_image(bytes(content), name=name)
        except ImageLoadError as e:
            self._error(f"Cannot read {name} as an image: {str(e).split(': ', 1)[-1]}. "
                        "Upload a JPEG, PNG, BMP, GIF, TIFF or WebP file.")
            return
        x = decode_uint8(img, self.predictor.image_size, name=name)[None]  # (1, 3, S, S)
        self.probs = self.predictor.probabilities(x)[0]  # (n_attributes,); the only model call
        self.name = name
        self.image.value = thumbnail_png(img, self.display_size)
        self.message.value = (f"<span style='color:#666'>{html.escape(name)}: {img.width} x {img.height} px, "
                              f"{_size(size)}</span>")
        self.body.layout.display = "flex"
        self.redecide()

    def redecide(self) -> None:
        """Re-apply the decision rule to the stored probabilities (no model call) and redraw."""
        if self.probs is None or self.predictor is None:
            return
        threshold = self.threshold
        self.present = self.predictor.decide(self.probs, threshold)[0]
        meta = self.predictor.meta
        rules = meta.decisions
        for j, a in enumerate(self.predictor.attributes):
            p, on = float(self.probs[j]), a in self.present
            t = threshold if threshold is not None else float(meta.thresholds[j])
            rule = "threshold" if threshold is not None else rules[j]
            self.bars[a].value = p
            self.bars[a].style.bar_color = PRESENT_COLOR if on else ABSENT_COLOR
            word = (f"<b style='color:{PRESENT_COLOR}'>present</b>" if on
                    else "<span style='color:#888'>absent</span>")
            if rule == "threshold":
                why = f"{p:.2f} {'&ge;' if on else '&lt;'} {t:.2f}"
            else:
                why = f"{p:.2f}; majority rule (validation showed no signal)"
            self.status[a].value = f"&nbsp;{word} <span style='color:#666'>{why}</span>"
        mode = "tuned per-attribute decisions" if threshold is None else f"threshold {threshold:.2f} for all"
        self.result.value = (f"<pre style='margin:0 0 6px 0'>Image: {html.escape(self.name or '')}\n"
                             f"Attributes present: {html.escape(str(self.present))}</pre>"
                             f"<span style='color:#666'>{mode}</span>")


def upload_panel(model_path: str | os.PathLike | Predictor = config.DEFAULT_MODEL,
                 default_threshold: float | None = None, display_size: int = 256,
                 max_bytes: int = config.MAX_UPLOAD_BYTES, runtime: str | None = None) -> UploadPanel:
    """Build the upload panel for a checkpoint; the model is loaded once, here.

    Args:
        model_path: a checkpoint written by training (or a loaded ``Predictor``).
        default_threshold: start with one threshold for all attributes instead of the
            checkpoint's tuned decisions (``None``).
        display_size: side in pixels of the square the uploaded image is shown in.
        max_bytes: largest accepted upload (default ``config.MAX_UPLOAD_BYTES``).
        runtime: what runs the model: torch, onnxruntime, openvino or auto (``None``: ``$AIMONK_RUNTIME``
            if set, else auto; see ``Predictor``).
    Returns:
        An ``UploadPanel`` (an ipywidgets ``VBox``). If the model cannot be loaded, the panel
        says why and its upload button is disabled.
    """
    if isinstance(model_path, Predictor):
        return UploadPanel(model_path, default_threshold, display_size, max_bytes)
    try:
        predictor = get_predictor(model_path, runtime)
    except (CheckpointError, OSError, ValueError, RuntimeError, ImportError) as e:  # said in the panel, never a traceback
        return UploadPanel(None, default_threshold, display_size, max_bytes,
                           error=f"{e}. Train a model first: make reports (or python -m aimonk train --data data/sample).")
    return UploadPanel(predictor, default_threshold, display_size, max_bytes)
