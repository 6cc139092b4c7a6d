"""The ipywidgets upload panel, driven the way the browser drives it: by assigning FileUpload.value."""

import io
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from aimonk import config
from aimonk.widgets import UploadPanel, upload_panel

ATTRIBUTES = ["Attr1", "Attr2", "Attr3", "Attr4"]
PROBS = [0.2, 0.4, 0.6, 0.8]  # what the constant model outputs for any image


def upload_value(data: bytes, name: str = "x.jpg", mime: str = "image/jpeg", size: int | None = None) -> tuple:
    """What ipywidgets 8 puts in FileUpload.value after the user picks one file (last_modified is a datetime)."""
    return ({"name": name, "type": mime, "size": len(data) if size is None else size,
             "content": memoryview(data), "last_modified": datetime(2024, 1, 1, tzinfo=timezone.utc)},)


def jpeg_bytes(mode: str = "RGB", size=(80, 50)) -> bytes:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, make_constant_checkpoint):
    return make_constant_checkpoint(PROBS, tmp_path_factory.mktemp("widgets") / "model.pth")


@pytest.fixture
def panel(model_path):
    return upload_panel(model_path, display_size=128)


def test_panel_starts_empty_with_a_hint(panel):
    assert isinstance(panel, UploadPanel)
    assert panel.upload.accept == "image/*" and not panel.upload.disabled
    assert panel.probs is None and panel.present == []
    assert "Upload" in panel.message.value
    assert panel.body.layout.display == "none"
    assert list(panel.bars) == ATTRIBUTES


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_image_upload_shows_image_bars_and_seed_format(panel, mode):
    panel.upload.value = upload_value(jpeg_bytes(mode), name="cat.jpg")
    assert panel.probs is not None and panel.probs.shape == (4,)
    assert panel.name == "cat.jpg"
    shown = Image.open(io.BytesIO(panel.image.value))
    assert shown.size == (128, 128)  # fixed display size whatever the upload's shape
    for j, a in enumerate(ATTRIBUTES):
        assert panel.bars[a].value == pytest.approx(float(panel.probs[j]))
        assert ("present" in panel.status[a].value) == (a in panel.present)
    assert "Image: cat.jpg" in panel.result.value
    assert f"Attributes present: {panel.present}".replace("'", "&#x27;") in panel.result.value
    assert panel.body.layout.display != "none"
    assert "cat.jpg" in panel.message.value and "Cannot" not in panel.message.value


def test_image_upload_uses_the_tuned_decisions_by_default(panel):
    panel.upload.value = upload_value(jpeg_bytes())
    np.testing.assert_allclose(panel.probs, PROBS, atol=0.01)
    assert panel.tuned.value is True and panel.present == ["Attr3", "Attr4"]
    assert "0.60 &ge; 0.50" in panel.status["Attr3"].value and "0.40 &lt; 0.50" in panel.status["Attr2"].value


def test_slider_redecides_without_running_the_model_again(panel, monkeypatch):
    panel.upload.value = upload_value(jpeg_bytes())
    calls = []
    original = panel.predictor.probabilities
    monkeypatch.setattr(panel.predictor, "probabilities", lambda x: calls.append(1) or original(x))
    panel.slider.value = 0.3
    assert panel.tuned.value is False  # moving the slider switches to one threshold for all
    assert panel.present == ["Attr2", "Attr3", "Attr4"]
    assert "threshold 0.30 for all" in panel.result.value
    panel.slider.value = 0.7
    assert panel.present == ["Attr4"]
    assert panel.bars["Attr4"].style.bar_color == "#2a9d8f" and panel.bars["Attr3"].style.bar_color == "#c8c8c8"
    panel.slider.value = 0.9
    assert panel.present == []
    assert all("absent" in panel.status[a].value for a in ATTRIBUTES)
    panel.slider.value = 0.0
    assert panel.present == ATTRIBUTES
    assert calls == []  # the model ran once, for the upload, before the patch


def test_tuned_decisions_apply_majority_rules(tmp_path, make_constant_checkpoint):
    path = make_constant_checkpoint(PROBS, tmp_path / "tuned.pth", thresholds=[0.1, 0.5, 0.5, 0.9],
                                    decision=["threshold", "majority_absent", "majority_present", "threshold"])
    panel = upload_panel(path)
    assert panel.tuned.value is True and panel.threshold is None
    panel.upload.value = upload_value(jpeg_bytes())
    assert panel.present == ["Attr1", "Attr3"]
    assert "majority rule" in panel.status["Attr2"].value and "majority rule" in panel.status["Attr3"].value
    panel.slider.value = 0.55  # a manual threshold overrides the tuned thresholds and majority rules
    assert panel.present == ["Attr3", "Attr4"]
    panel.tuned.value = True
    assert panel.present == ["Attr1", "Attr3"]


def test_default_threshold_starts_in_manual_mode(model_path):
    panel = upload_panel(model_path, default_threshold=0.7)
    assert panel.tuned.value is False and panel.threshold == 0.7
    panel.upload.value = upload_value(jpeg_bytes())
    assert panel.present == ["Attr4"]


@pytest.mark.parametrize("data, name", [
    (b"this is not an image\n" * 10, "notes.txt"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "truncated.jpg"),
])
def test_non_image_shows_a_message_and_clears_the_result(panel, data, name):
    panel.upload.value = upload_value(jpeg_bytes(), name="good.jpg")
    assert panel.probs is not None
    panel.upload.value = upload_value(data, name=name, mime="text/plain")
    assert f"Cannot read {name} as an image" in panel.message.value
    assert panel.probs is None and panel.present == [] and panel.image.value == b""
    assert panel.body.layout.display == "none"


def test_too_large_upload_is_refused_before_decoding(model_path):
    panel = upload_panel(model_path, max_bytes=1000)
    data = jpeg_bytes(size=(200, 200))
    assert len(data) > 1000
    panel.upload.value = upload_value(data, name="big.jpg")
    assert "big.jpg" in panel.message.value and "limit" in panel.message.value
    assert panel.probs is None


def test_declared_size_over_the_default_limit_is_refused(panel):
    panel.upload.value = upload_value(jpeg_bytes(), name="huge.jpg", size=config.MAX_UPLOAD_BYTES + 1)
    assert "limit is 20.0 MiB" in panel.message.value and panel.probs is None


def test_empty_upload_is_refused(panel):
    panel.upload.value = upload_value(b"", name="empty.png")
    assert "empty" in panel.message.value and panel.probs is None


def test_user_supplied_name_is_escaped(panel):
    panel.upload.value = upload_value(b"nope", name="<script>x</script>.jpg")
    assert "<script>" not in panel.message.value and "&lt;script&gt;" in panel.message.value


def test_missing_model_gives_a_disabled_panel_with_the_reason(tmp_path):
    panel = upload_panel(tmp_path / "absent.pth")
    assert panel.upload.disabled
    assert "model file not found" in panel.message.value and "Train a model first" in panel.message.value
