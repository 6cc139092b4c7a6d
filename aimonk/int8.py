"""int8 inference on x86 CPUs: post-training static quantization with calibration stored in the checkpoint.

On CPUs with AVX512-VNNI, int8 convolutions run faster than bf16 ones. ``calibrate``
runs the float model over training images with an observer after every activation (torch.ao
FX graph mode, x86 engine: per-channel int8 weights, histogram-calibrated uint8 activations)
and returns the observers' state. Training stores it in the checkpoint (``CheckpointMeta.int8``), and
``quantize`` rebuilds the int8 model from the float weights plus that state, so the checkpoint
keeps one set of weights.

Only backbones whose ``BackboneSpec.cpu_int8`` is set are quantized: ResNet18 by measurement.
The EfficientNet-Lite implementation does not quantize into int8 kernels with this API (a
converted Lite0 ran slower than in fp32, with logit errors larger than the logits' spread; docs/speed.md).

torch.ao's FX quantization is deprecated upstream in favour of torchao's PT2E flow, which
needs ``torch.compile``; it works in the pinned torch, and ``available()`` reports whether it
is still there: with a torch that lacks it, training saves no calibration and ``Predictor``
refuses precision int8 with a message.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch
from torch import nn

from aimonk.cache import DecodedCache
from aimonk.checkpoint import load_checkpoint, update_checkpoint
from aimonk.data import ImageDataset, index_dataset, normalize_batch
from aimonk.model import BACKBONES

ENGINE = "x86"
CALIBRATION_IMAGES = 256  # training images the observers see; enough for stable histograms at 224 px


def available() -> bool:
    """True where torch has the FX quantization API and the x86 int8 engine."""
    try:
        import torch.ao.quantization.quantize_fx  # noqa: F401
    except ImportError:
        return False
    return ENGINE in torch.backends.quantized.supported_engines


def unsupported(backbone: str, probe: dict | None = None) -> str | None:
    """Why a ``backbone`` model (with a probe ensemble if ``probe``) cannot run in int8 here, or None if it can."""
    if not available():
        return f"needs torch.ao's FX quantization and the {ENGINE!r} engine, which this torch lacks"
    if probe:
        return "is not available for a model with a probe ensemble (train with --no-probe-ensemble)"
    if not BACKBONES[backbone].cpu_int8:
        return f"is not available for backbone {backbone!r} (it does not quantize to fast int8 kernels)"
    return None


@contextmanager
def _quiet():
    """Silence torch.ao's deprecation and observer notices, which say nothing about this use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*(deprecated|reduce_range|quant_min).*")
        yield


def _prepare(model: nn.Module, image_size: int) -> torch.fx.GraphModule:
    """A copy of the float model with conv-BN-ReLU fused and an observer after every activation."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = ENGINE
    with _quiet():
        return prepare_fx(copy.deepcopy(model).cpu().eval(), get_default_qconfig_mapping(ENGINE),
                          example_inputs=(torch.zeros(1, 3, image_size, image_size),))


@torch.no_grad()  # not inference_mode: the stored observer state must stay loadable outside it
def calibrate(model: nn.Module, dataset, image_size: int, mean: Sequence[float], std: Sequence[float],
              images: int = CALIBRATION_IMAGES, batch_size: int = 32) -> dict:
    """Observe the activations of ``model`` on up to ``images`` items of ``dataset`` (evenly spaced).

    Args:
        model: the trained float model (not changed).
        dataset: items ``(uint8 image (3, S, S), ...)``, unaugmented, e.g. the training images.
    Returns:
        Plain data for ``CheckpointMeta.int8``: the engine, the number of images seen and the observers' state.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("int8 calibration needs at least one image")
    prepared = _prepare(model, image_size)
    index = np.unique(np.linspace(0, n - 1, min(images, n)).round().astype(int)).tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, index), batch_size=batch_size)
    with _quiet():
        for batch in loader:
            prepared(normalize_batch(batch[0], torch.device("cpu"), mean, std, False))  # (B, n_attributes)
    observers = {k: v.clone() for k, v in prepared.state_dict().items() if "activation_post_process" in k}
    return {"engine": ENGINE, "images": len(index), "observers": observers}


def quantize(model: nn.Module, calibration: dict, image_size: int) -> nn.Module:
    """The int8 version of ``model`` (float, eval mode, BatchNorms not folded) from ``calibrate``'s output.

    Raises:
        ValueError: if the calibration was made for another engine or another architecture.
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    if calibration.get("engine") != ENGINE:
        raise ValueError(f"int8 calibration is for engine {calibration.get('engine')!r}, not {ENGINE!r}")
    prepared = _prepare(model, image_size)
    result = prepared.load_state_dict(calibration["observers"], strict=False)
    observed = [k for k in prepared.state_dict() if "activation_post_process" in k]
    if result.unexpected_keys or set(observed) - set(calibration["observers"]):
        raise ValueError("int8 calibration does not match this model's architecture")
    with _quiet():
        return convert_fx(prepared).eval()


def calibrate_checkpoint(model_path, data_dir, images: int = CALIBRATION_IMAGES, cache_dir: str | None = None,
                         names: Sequence[str] | None = None) -> dict:
    """Add int8 calibration to an existing checkpoint, from the labelled images of ``data_dir`` (those in
    ``names`` if given, e.g. a benchmark fold's training part) that were not its validation images.

    Returns:
        The calibration written into the checkpoint's ``CheckpointMeta.int8``.
    Raises:
        ValueError: if the checkpoint's model cannot run in int8, or no image is left to calibrate on.
    """
    model, meta = load_checkpoint(model_path)
    problem = unsupported(meta.backbone, meta.probe)
    if problem:
        raise ValueError(f"{model_path}: int8 inference {problem}")
    index = index_dataset(data_dir)
    val = set((meta.split or {}).get("val") or [])
    allowed = set(names) if names is not None else None
    paths = [p for n, p in zip(index.table.names, index.paths) if n not in val and (allowed is None or n in allowed)]
    cache = DecodedCache(paths, meta.image_size, cache_dir)
    if not cache.ok:
        raise ValueError(f"{data_dir}: no readable image outside the checkpoint's validation split to calibrate on")
    dataset = ImageDataset(torch.utils.data.Subset(cache, cache.ok), np.zeros((len(cache.ok), 1), np.float32))
    calibration = calibrate(model, dataset, meta.image_size, meta.mean, meta.std, images)
    update_checkpoint(model_path, int8=calibration)
    return calibration
