"""The Streamlit app (aimonk/app.py) driven headless with ``streamlit.testing.v1.AppTest``.

The checkpoints here output known probabilities whatever the image (``constant_checkpoint``), so
which attributes are present at each threshold is known in advance.
"""

from __future__ import annotations

import re
import sys

import pytest

pytest.importorskip("streamlit", reason="the Streamlit app needs the 'app' extra: pip install -e '.[app]'")
from streamlit.testing.v1 import AppTest  # noqa: E402

from aimonk import config  # noqa: E402
from aimonk.app import bars_html, model_path_from_args  # noqa: E402
from aimonk.predict import PredictionResult  # noqa: E402

pytestmark = pytest.mark.timeout(300)

APP = config.PROJECT_ROOT / "aimonk" / "app.py"
PROBS = [0.9, 0.3, 0.7, 0.1]  # what the constant checkpoint outputs for Attr1..Attr4
TUNED = [0.95, 0.2, 0.5, 0.5]  # its stored per-attribute thresholds -> Attr2, Attr3 present


@pytest.fixture
def image_bytes(sample_dir) -> bytes:
    return (sample_dir / "images" / "image_0.jpg").read_bytes()


@pytest.fixture
def model(constant_checkpoint, monkeypatch):
    """A constant checkpoint, served to the app through ``$AIMONK_MODEL``."""
    path = constant_checkpoint(PROBS, thresholds=TUNED)
    monkeypatch.setenv("AIMONK_MODEL", str(path))
    return path


@pytest.fixture
def app(monkeypatch) -> AppTest:
    monkeypatch.setattr(sys, "argv", ["app.py"])  # not pytest's own arguments
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def present(at: AppTest) -> list[str]:
    """The attributes the page reports as present, read from the highlighted bar rows."""
    bars = next(m.value for m in at.markdown if "aimonk-bars" in m.value)
    return re.findall(r'class="aimonk-row present" data-attribute="([^"]+)"', bars)


def upload(at: AppTest, name: str, data: bytes, mime: str = "image/jpeg") -> AppTest:
    at.file_uploader[0].set_value((name, data, mime)).run()
    assert not at.exception, at.exception
    return at


def test_no_model_names_the_command_that_makes_one(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMONK_MODEL", str(tmp_path / "missing.pth"))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception
    (warning,) = at.warning
    assert "missing.pth" in warning.value
    assert "make reports" in warning.value and "python -m aimonk train --data data/sample" in warning.value
    assert len(at.file_uploader) == 0


def test_damaged_model_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setenv("AIMONK_MODEL", str(bad))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception
    (error,) = at.error
    assert "Cannot load the model" in error.value and "make reports" in error.value


def test_before_upload_the_page_asks_for_an_image(model, app):
    assert app.title[0].value == "Image attributes"
    assert "Upload a JPEG" in app.info[0].value
    assert app.toggle(key="tuned").value is True
    assert "Attr1, Attr2, Attr3, Attr4" in "".join(m.value for m in app.sidebar.markdown)


def test_upload_shows_bars_image_and_seed_format(model, app, image_bytes):
    upload(app, "image_0.jpg", image_bytes)
    assert not app.error
    assert present(app) == ["Attr2", "Attr3"]  # the tuned thresholds by default
    assert app.code[0].value == "Image: image_0.jpg\nAttributes present: ['Attr2', 'Attr3']"
    bars = next(m.value for m in app.markdown if "aimonk-bars" in m.value)
    shown = dict(re.findall(r'data-attribute="([^"]+)" data-probability="([0-9.]+)"', bars))
    assert [float(shown[a]) for a in ["Attr1", "Attr2", "Attr3", "Attr4"]] == pytest.approx(PROBS, abs=0.02)
    (image,) = app.image  # its fixed display size is checked in the browser test
    assert image.captions[0].startswith("image_0.jpg (")


@pytest.mark.parametrize("threshold, expected", [(0.05, ["Attr1", "Attr2", "Attr3", "Attr4"]),
                                                 (0.6, ["Attr1", "Attr3"]),
                                                 (0.8, ["Attr1"]),
                                                 (0.95, [])])
def test_threshold_slider_redecides(model, app, image_bytes, threshold, expected):
    upload(app, "image_0.jpg", image_bytes)
    app.slider(key="threshold").set_value(threshold).run()
    assert app.toggle(key="tuned").value is False  # moving the slider switches to one threshold
    assert present(app) == expected
    assert any(f"threshold {threshold:.2f} for every attribute" in c.value for c in app.caption)
    app.toggle(key="tuned").set_value(True).run()
    assert present(app) == ["Attr2", "Attr3"]


def test_non_image_is_a_clear_error_and_the_next_upload_works(model, app, image_bytes):
    upload(app, "notes.txt", b"these are not pixels", "text/plain")
    (error,) = app.error
    assert "Cannot read notes.txt as an image" in error.value and "JPEG" in error.value
    upload(app, "image_0.jpg", image_bytes)
    assert not app.error
    assert present(app) == ["Attr2", "Attr3"]


def test_too_large_upload_is_refused_with_the_limit(model, app):
    upload(app, "huge.jpg", b"\xff" * (config.MAX_UPLOAD_BYTES + 1))
    (error,) = app.error
    assert "huge.jpg" in error.value and f"limit is {config.MAX_UPLOAD_BYTES // 2**20} MB" in error.value


def test_model_is_loaded_once_per_server(model, app, image_bytes, monkeypatch):
    import aimonk.predict

    calls = []
    real = aimonk.predict.get_predictor
    monkeypatch.setattr(aimonk.predict, "get_predictor", lambda *a, **k: calls.append(a) or real(*a, **k))
    app.run()
    upload(app, "image_0.jpg", image_bytes)
    app.slider(key="threshold").set_value(0.6).run()
    upload(app, "image_1.jpg", image_bytes)
    assert calls == []  # loaded by the first run (before the patch), then served from st.cache_resource
    assert present(app) == ["Attr1", "Attr3"]


def test_model_path_argument(monkeypatch, tmp_path):
    monkeypatch.delenv("AIMONK_MODEL", raising=False)
    assert model_path_from_args([]) == config.DEFAULT_MODEL
    assert model_path_from_args(["--model", "models/other.pth"]) == config.PROJECT_ROOT / "models" / "other.pth"
    assert model_path_from_args(["--model", str(tmp_path / "m.pth"), "--unrelated"]) == tmp_path / "m.pth"
    monkeypatch.setenv("AIMONK_MODEL", str(tmp_path / "env.pth"))
    assert model_path_from_args([]) == tmp_path / "env.pth"


def test_bars_highlight_present_and_escape_names():
    result = PredictionResult("x.jpg", present=["<b>"], probabilities={"<b>": 0.75, "plain": 0.25},
                              thresholds={"<b>": 0.5, "plain": 0.5})
    out = bars_html(result)
    assert '<div class="aimonk-row present" data-attribute="&lt;b&gt;" data-probability="0.7500"' in out
    assert '<div class="aimonk-row absent" data-attribute="plain"' in out
    assert "width:75.0%" in out and "left:calc(50.0% - 1px)" in out
