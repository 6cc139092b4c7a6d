"""The public one-call API: ``predict("images/image_0.jpg")`` prints the seed's two lines.

``Predictor`` (load once, predict many) lives in ``aimonk.inference`` and is re-exported here.
"""

from __future__ import annotations

import os

from aimonk import config
from aimonk.data import ImageSource
from aimonk.inference import PredictionResult, Predictor, get_predictor, list_images

__all__ = ["PredictionResult", "Predictor", "get_predictor", "list_images", "predict"]


def predict(image: ImageSource, model: str | os.PathLike | Predictor = config.DEFAULT_MODEL,
            threshold: float | None = None, show: bool = True, runtime: str | None = None) -> PredictionResult:
    """Predict one image and print it in the seed format.

    Args:
        image: a path, PIL image or bytes.
        model: a checkpoint path, or a model exported from one (``.onnx``), loaded once and cached; or a ``Predictor``.
        threshold: one threshold for all attributes; ``None`` uses the checkpoint's tuned decisions.
        show: print ``Image: ...`` / ``Attributes present: [...]``.
        runtime: torch, onnxruntime, openvino or auto; None: $AIMONK_RUNTIME if set, else auto
            (see ``Predictor``). Ignored for a ``Predictor``.
    Returns:
        A ``PredictionResult``.
    """
    predictor = model if isinstance(model, Predictor) else get_predictor(model, runtime)
    result = predictor.predict(image, threshold)
    if show:
        print(result)
    return result
