"""The self-describing checkpoint: round trip, atomic save, and refusing damaged or malicious files."""

from __future__ import annotations

import builtins
import os
import pickle

import pytest
import torch

import aimonk
from aimonk import config
from aimonk.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, update_checkpoint
from aimonk.files import WriteError
from aimonk.model import ProbeEnsemble, build_model

ATTRIBUTES = ["blue", "light", "striped", "red_square"]


def make_meta(**changes) -> dict:
    meta = {
        "backbone": "resnet18",
        "attributes": ATTRIBUTES,
        "image_size": 48,
        "mean": list(config.IMAGENET_MEAN),
        "std": list(config.IMAGENET_STD),
        "thresholds": [0.5, 0.4, 0.3, 0.2],
        "decision": ["threshold", "threshold", "majority_present", "majority_absent"],
        "config": {"epochs": 3, "lr": 1e-4, "data_dir": "data/sample"},
        "history": {"loss": [0.9, 0.7, 0.6], "epoch_loss": [0.73], "val_macro_ap": [0.61]},
    }
    meta.update(changes)
    return meta


def fresh_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet18", len(ATTRIBUTES), weights="none")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the buffers are checked too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "model.pth")


def test_round_trip_gives_the_same_outputs_and_metadata(tmp_path):
    model = fresh_model()
    meta = make_meta()
    path = save_checkpoint(tmp_path / "model.pth", model, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for key, value in meta.items():
        assert getattr(loaded_meta, key) == value, key
    assert loaded_meta.aimonk_version == aimonk.__version__
    assert loaded_meta.format == "aimonk-checkpoint"
    assert not hasattr(loaded_meta, "state_dict")


def test_a_probe_ensemble_round_trips_and_averages_its_members_probabilities(tmp_path):
    from aimonk.predict import Predictor

    ensemble = ProbeEnsemble(fresh_model(0), fresh_model(1)).eval()
    path = save_checkpoint(tmp_path / "model.pth", ensemble, make_meta(probe={"C": 0.01}))
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, ProbeEnsemble) and meta.probe == {"C": 0.01}
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = (torch.sigmoid(ensemble.finetuned(x)) + torch.sigmoid(ensemble.probe(x))) / 2
        torch.testing.assert_close(torch.sigmoid(loaded(x)), expected)
        assert not torch.allclose(torch.sigmoid(ensemble.finetuned(x)), expected, atol=1e-3)  # both members count
        folded = Predictor(path, precision="fp32")  # BatchNorms folded into both members' convolutions
        torch.testing.assert_close(torch.sigmoid(folded.model(x)), expected, rtol=1e-4, atol=1e-5)


def test_a_probe_on_several_frozen_networks_round_trips(tmp_path):
    from aimonk.model import FeatureProbe, feature_probe, head_module
    from aimonk.predict import Predictor

    torch.manual_seed(0)
    probe = feature_probe(["resnet18", "resnet18"], len(ATTRIBUTES), weights=None)  # two trunks, features concatenated
    assert head_module(probe) is probe.fc and probe.fc.in_features == 2 * 512
    ensemble = ProbeEnsemble(fresh_model(0), probe).eval()
    info = {"C": 0.01, "backbones": ["resnet18", "resnet18"]}
    path = save_checkpoint(tmp_path / "model.pth", ensemble, make_meta(probe=info))
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded.probe, FeatureProbe) and meta.probe == info
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ensemble(x))
        features = torch.cat([trunk(x) for trunk in ensemble.probe.trunks], 1)
        torch.testing.assert_close(ensemble.probe(x), ensemble.probe.fc(features))
        torch.testing.assert_close(Predictor(path, precision="fp32").model(x), ensemble(x), rtol=1e-4, atol=1e-4)


def test_a_probe_refuses_unknown_or_differently_normalised_backbones():
    from aimonk.model import feature_probe

    with pytest.raises(ValueError, match="unknown probe backbone"):
        feature_probe(["resnet19"], 4, weights=None)
    with pytest.raises(ValueError, match="normalise their inputs differently"):
        feature_probe(["resnet18", "efficientnet_lite0"], 4, weights=None)


def test_save_accepts_a_channels_last_model_and_leaves_it_untouched(tmp_path):
    model = fresh_model().to(memory_format=torch.channels_last)
    path = save_checkpoint(tmp_path / "sub" / "dir" / "model.pth", model, make_meta())
    loaded, _ = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_trained_checkpoint_describes_itself(trained):
    model, meta = load_checkpoint(trained.checkpoint)
    assert meta.backbone == "resnet18"
    assert meta.attributes == ["Attr1", "Attr2", "Attr3", "Attr4"]
    assert meta.image_size == 32
    assert meta.mean == list(config.IMAGENET_MEAN) and meta.std == list(config.IMAGENET_STD)
    assert len(meta.thresholds) == 4 and all(0 < t < 1 for t in meta.thresholds)  # tuned on validation
    assert set(meta.decisions) <= {"threshold", "majority_present", "majority_absent"}
    assert meta.config["epochs"] == 1 and meta.config["weights"] == "none"
    assert meta.config["lr"] == 1e-4 and meta.config["optimizer"] == "adam"
    assert meta.history["loss"] == trained.history["loss"] and len(meta.history["loss"]) > 1
    assert meta.aimonk_version == aimonk.__version__
    assert model.fc.out_features == 4
    assert torch.load(trained.checkpoint, map_location="cpu", weights_only=True)["format"] == "aimonk-checkpoint"


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), Interrupted("killed"), KeyboardInterrupt()],
                         ids=["disk full", "exception", "ctrl-c"])
def test_an_interrupted_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch, error):
    path = save_checkpoint(tmp_path / "model.pth", fresh_model(0), make_meta(thresholds=[0.1] * 4))
    before = path.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()  # half a file is on disk
        raise error

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(type(error)):
        save_checkpoint(path, fresh_model(1), make_meta(thresholds=[0.9] * 4))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)[1].thresholds == [0.1] * 4
    assert leftovers(tmp_path) == []


def test_a_failed_rename_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "model.pth", fresh_model(0), make_meta())
    before = path.read_bytes()

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteError, match=r"model\.pth: cannot write it: permission denied \(EACCES\)$"):
        save_checkpoint(path, fresh_model(1), make_meta())
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_first_save_interrupted_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise Interrupted("killed")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(Interrupted):
        save_checkpoint(tmp_path / "model.pth", fresh_model(), make_meta())
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- refusing bad files


def test_a_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    path = save_checkpoint(tmp_path / "model.pth", fresh_model(), make_meta())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"^{path}: .*truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", "empty file"),
        (b"Image: image_0.jpg\nAttributes present: []\n", "not a readable aimonk checkpoint"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "not a readable aimonk checkpoint"),
    ],
    ids=["empty", "text", "png"],
)
def test_non_checkpoint_files_are_checkpoint_errors(tmp_path, content, pattern):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [{"weights": torch.zeros(2)}, [1, 2, 3], {"format": "something-else", "state_dict": {}}],
    ids=["plain state dict", "list", "other format"],
)
def test_torch_files_that_are_not_aimonk_checkpoints_are_refused(tmp_path, payload):
    path = tmp_path / "model.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="not an aimonk checkpoint"):
        load_checkpoint(path)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="model file not found"):
        load_checkpoint(tmp_path / "model.pth")


class Malicious:
    """Unpickling this calls open(marker, "w"): code execution that must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.parametrize("container", ["torch.save", "bare pickle", "inside a checkpoint"])
def test_a_malicious_pickle_is_refused_and_never_executed(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    if container == "torch.save":
        torch.save(Malicious(marker), path)
    elif container == "bare pickle":
        path.write_bytes(pickle.dumps(Malicious(marker)))
    else:
        save_checkpoint(path, fresh_model(), make_meta(config={"evil": Malicious(marker)}))
    with pytest.raises(CheckpointError, match="refused for safety") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        build_model("resnet18", 4, weights=path)
    assert not marker.exists()


def test_the_malicious_payload_is_real(tmp_path):
    """Guard for the test above: an unrestricted unpickle really would create the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Malicious(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"thresholds": [0.5] * 3}, "3 thresholds for 4 attributes"),
        ({"attributes": ATTRIBUTES + ["extra"], "thresholds": [0.5] * 5, "decision": ["threshold"] * 5},
         "do not fit backbone 'resnet18' with 5 attributes"),
        ({"backbone": "vgg16"}, "unknown backbone 'vgg16'"),
    ],
    ids=["thresholds", "attribute count", "backbone"],
)
def test_inconsistent_checkpoints_are_refused(tmp_path, changes, pattern):
    path = save_checkpoint(tmp_path / "model.pth", fresh_model(), make_meta(**changes))
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path)


def test_a_checkpoint_without_required_keys_is_refused(tmp_path):
    meta = make_meta()
    del meta["image_size"]
    path = save_checkpoint(tmp_path / "model.pth", fresh_model(), meta)
    with pytest.raises(CheckpointError, match=r"lacks \['image_size'\]"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- update_checkpoint


def test_update_checkpoint_changes_thresholds_and_keeps_the_rest(tmp_path):
    model = fresh_model()
    path = save_checkpoint(tmp_path / "model.pth", model, make_meta())
    new = update_checkpoint(path, thresholds=[0.2, 0.3, 0.4, 0.6], decision=["threshold"] * 4)
    assert new.thresholds == [0.2, 0.3, 0.4, 0.6]
    loaded, meta = load_checkpoint(path)
    assert meta.thresholds == [0.2, 0.3, 0.4, 0.6]
    assert meta.decision == ["threshold"] * 4
    assert meta.history == make_meta()["history"] and meta.attributes == ATTRIBUTES
    assert meta.aimonk_version == aimonk.__version__
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert leftovers(tmp_path) == []
