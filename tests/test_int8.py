"""int8 inference: calibration stored in the checkpoint, the rebuilt int8 model, and clear refusals."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from aimonk import config, int8
from aimonk.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint, update_checkpoint
from aimonk.data import index_dataset
from aimonk.inference import int8_problem
from aimonk.model import build_model
from aimonk.predict import Predictor

pytestmark = pytest.mark.skipif(not int8.available(), reason="this torch has no x86 int8 engine")


class _Images(torch.utils.data.Dataset):
    """Smooth random uint8 images (blurred noise, like photos rather than static)."""

    def __init__(self, n: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        low = torch.randint(0, 256, (n, 3, size // 4, size // 4), generator=g).float()
        self.x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").round().to(torch.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], torch.zeros(4)


def _float_logits(model, images):
    from aimonk.data import normalize_batch

    with torch.inference_mode():
        return model(normalize_batch(images, torch.device("cpu"), config.IMAGENET_MEAN, config.IMAGENET_STD, False))


def test_int8_model_follows_the_float_model():
    torch.manual_seed(0)
    model = build_model("resnet18", 4, weights="none").eval()
    calib, test = _Images(48, 64, seed=0), _Images(32, 64, seed=1)
    calibration = int8.calibrate(model, calib, 64, config.IMAGENET_MEAN, config.IMAGENET_STD, images=32)
    assert calibration["engine"] == "x86" and calibration["images"] == 32
    q = int8.quantize(model, calibration, 64)
    ref, out = _float_logits(model, test.x), _float_logits(q, test.x)  # (32, 4) each
    assert out.shape == (32, 4) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # it really is another model
    # int8 keeps how the images rank on every attribute: what AP and the thresholds depend on
    corr = [np.corrcoef(ref[:, j], out[:, j])[0, 1] for j in range(4)]
    assert min(corr) > 0.9, corr
    assert (out - ref).abs().mean() < 0.25 * ref.std(0).mean()
    # the float model is untouched, and its BatchNorms are fused away only in the int8 copy
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in q.modules())


def test_calibration_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 4, weights="none").eval()
    calibration = int8.calibrate(model, _Images(16, 32), 32, config.IMAGENET_MEAN, config.IMAGENET_STD)
    path = save_checkpoint(tmp_path / "m.pth", model, {
        "backbone": "resnet18", "attributes": [f"Attr{j}" for j in range(1, 5)], "image_size": 32,
        "mean": list(config.IMAGENET_MEAN), "std": list(config.IMAGENET_STD), "thresholds": [0.5] * 4,
        "int8": calibration})
    predictor = Predictor(path, precision="int8")  # loaded with weights_only=True
    assert predictor.precision == "int8"
    images = _Images(8, 32, seed=3).x
    expected = torch.sigmoid(_float_logits(int8.quantize(model, calibration, 32), images)).numpy()
    np.testing.assert_array_equal(predictor.probabilities(images), expected)


def test_training_calibrates_a_resnet18_checkpoint(trained, sample_dir):
    _, meta = load_checkpoint(trained.checkpoint)
    n_train = len(index_dataset(sample_dir, warn=False).table) - len(meta.split["val"])
    assert meta.int8["images"] == trained.meta.int8["images"] == min(int8.CALIBRATION_IMAGES, n_train)
    fp32 = Predictor(trained.checkpoint, precision="fp32")
    q = Predictor(trained.checkpoint, precision="int8")
    images = _Images(8, 32, seed=5).x
    p32, p8 = fp32.probabilities(images), q.probabilities(images)
    assert p8.shape == p32.shape == (8, 4)
    assert np.abs(p8 - p32).max() < 0.05
    result = q.predict(sample_dir / "images" / "image_0.jpg")
    assert str(result).startswith("Image: image_0.jpg\nAttributes present: [")


def test_training_calibrates_int8_only_when_asked(tmp_path):
    from helpers import sample_subset, tiny_config

    from aimonk.train import train

    data = sample_subset(tmp_path / "data", 24)
    result = train(tiny_config(data, tmp_path / "model.pth", tmp_path / "cache", batch_size=8))
    assert result.meta.int8 is None  # int8 is opt-in: the default run does not pay for its calibration
    with pytest.raises(ValueError, match=r"model\.pth: int8 inference needs calibration.*calibrate-int8"):
        Predictor(result.checkpoint, precision="int8")


def test_int8_is_refused_clearly(constant_checkpoint, tmp_path):
    path = constant_checkpoint([0.3, 0.7])  # no calibration in it
    with pytest.raises(ValueError, match=r"constant\.pth: int8 inference needs calibration.*calibrate-int8"):
        Predictor(path, precision="int8")
    def meta(**values):
        return CheckpointMeta(attributes=["a"], image_size=32, mean=[0.5] * 3, std=[0.5] * 3, thresholds=[0.5], **values)

    calibrated = meta(backbone="resnet18", int8={"engine": "x86"})
    assert "CPU only" in int8_problem(calibrated, torch.device("cuda"))
    assert int8_problem(calibrated, torch.device("cpu")) is None
    assert "efficientnet_lite0" in int8_problem(meta(backbone="efficientnet_lite0"), torch.device("cpu"))
    assert "probe ensemble" in int8_problem(meta(backbone="efficientnet_lite0", probe={"C": 1}), torch.device("cpu"))
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16 or int8"):
        Predictor(path, precision="int4")


def test_calibration_of_another_architecture_is_refused():
    calibration = int8.calibrate(build_model("resnet18", 4, weights="none").eval(), _Images(4, 32), 32,
                                 config.IMAGENET_MEAN, config.IMAGENET_STD)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten()).eval()
    with pytest.raises(ValueError, match="does not match"):
        int8.quantize(other, calibration, 32)
    with pytest.raises(ValueError, match="engine"):
        int8.quantize(other, {**calibration, "engine": "qnnpack"}, 32)


def test_cli_calibrates_an_older_checkpoint(trained, sample_dir, tmp_path, capsys):
    from aimonk.cli import main

    path = shutil.copy(trained.checkpoint, tmp_path / "model.pth")
    update_checkpoint(path, int8=None)  # as written before training calibrated
    assert main(["predict", str(sample_dir / "images" / "image_0.jpg"), "--model", str(path), "--precision", "int8"]) == 1
    assert "calibrate-int8" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="not found"):  # the sample's one missing image
        assert main(["calibrate-int8", "--model", str(path), "--data", str(sample_dir)]) == 0
    _, meta = load_checkpoint(path)
    n_train = len(index_dataset(sample_dir, warn=False).table) - len(meta.split["val"])  # validation left out
    assert f"int8 calibration from {n_train} images" in capsys.readouterr().out
    assert meta.int8["images"] == n_train
    assert main(["predict", str(sample_dir / "images" / "image_0.jpg"), "--model", str(path), "--precision", "int8"]) == 0
    assert capsys.readouterr().out.startswith("Image: image_0.jpg\nAttributes present: [")


def test_a_failed_calibration_never_costs_the_trained_model(sample_dir, tmp_path, monkeypatch):
    from aimonk.train import TrainConfig, train

    def broken(*args, **kwargs):
        raise RuntimeError("observer exploded")

    monkeypatch.setattr(int8, "calibrate", broken)
    cfg = TrainConfig(data_dir=str(sample_dir), epochs=1, image_size=32, batch_size=24, weights="none",
                      int8_calibration=True, out=str(tmp_path / "model.pth"), loss_plot="", progress=False)
    with pytest.warns(UserWarning) as caught:
        result = train(cfg)
    assert any("int8 calibration failed (observer exploded)" in str(w.message) for w in caught)
    _, meta = load_checkpoint(result.checkpoint)
    assert meta.int8 is None and len(meta.history["loss"]) > 0


def test_calibrating_a_backbone_that_does_not_quantize_is_refused(sample_dir, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    model = build_model("efficientnet_lite0", 4, weights="none").eval()
    path = save_checkpoint(tmp_path / "lite.pth", model, {
        "backbone": "efficientnet_lite0", "attributes": [f"Attr{j}" for j in range(1, 5)], "image_size": 32,
        "mean": [0.5] * 3, "std": [0.5] * 3, "thresholds": [0.5] * 4})
    with pytest.raises(ValueError, match=r"lite\.pth: int8 inference is not available for backbone 'efficientnet_lite0'"):
        int8.calibrate_checkpoint(path, sample_dir)
    _, meta = load_checkpoint(path)
    assert meta.int8 is None  # the checkpoint is left as it was
