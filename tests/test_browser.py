"""Both web apps in a real browser: Debian's chromium driven by Playwright.

Each app is served on 127.0.0.1 at a free port by a subprocess that is always stopped (with the
Jupyter kernels Voila starts). The tests upload a sample image, move the threshold, upload a
non-image and save screenshots to ``config.FIGURES_DIR`` (``reports/figures/`` unless
``AIMONK_REPORTS_DIR`` says otherwise). Playwright's own browser download is not used.
"""

from __future__ import annotations

import ast
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from aimonk import config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
READY_TIMEOUT = 120  # s for a server to answer
UI_TIMEOUT = 120_000  # ms for the page to show something (a Voila kernel imports torch first)
ROOT = config.PROJECT_ROOT
IMAGE = config.SAMPLE_DIR / "images" / "image_0.jpg"
NOT_AN_IMAGE = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"these are not pixels"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not found: install Debian's chromium "
                                                      "(apt-get install -y chromium; .ci/run does)"),
]


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (Voila then shuts its kernels down), SIGKILL what is left."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(family, timeout=15)
    for p in alive:  # kernels live in their own sessions, so kill them one by one
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    proc.wait(timeout=5)


@contextmanager
def serve(cmd: list[str], ready_url: str, log: Path, env: dict[str, str]):
    """Run a server until the block ends; ready when ``ready_url`` answers 200."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[2:4]} exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{ready_url} not ready after {READY_TIMEOUT} s:\n{_log_tail(log)}")
            time.sleep(0.5)
        yield
    finally:
        _stop(proc)
        print(f"--- {log.name}\n{_log_tail(log)}")  # shown when a test fails


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AIMONK_MODEL"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def model_path(trained) -> Path:
    """The session's trained checkpoint; ``split.json`` lies next to it (notebook 04 reads it)."""
    return Path(trained.checkpoint)


@pytest.fixture(scope="module")
def attributes(trained) -> list[str]:
    return list(trained.meta.attributes)


@pytest.fixture(scope="module")
def streamlit_url(model_path, tmp_path_factory):
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", "aimonk/app.py", "--server.headless=true",
           "--server.address=127.0.0.1", f"--server.port={port}", "--browser.gatherUsageStats=false",
           "--server.fileWatcherType=none", "--client.toolbarMode=minimal", "--", "--model", str(model_path)]
    url = f"http://127.0.0.1:{port}"
    with serve(cmd, f"{url}/_stcore/health", tmp_path_factory.mktemp("logs") / "streamlit.log", server_env()):
        yield url


def _voila(models_dir: Path, log: Path):
    """``voila notebooks/04_infer.ipynb`` from the repository root, so ``voila.json`` applies."""
    port = free_port()
    cmd = [sys.executable, "-m", "voila", "notebooks/04_infer.ipynb", "--no-browser",
           "--Voila.ip=127.0.0.1", f"--port={port}"]
    url = f"http://127.0.0.1:{port}"
    # A static file: asking for the page itself would start a kernel.
    return url, serve(cmd, f"{url}/voila/static/voila.js", log, server_env(AIMONK_MODELS_DIR=str(models_dir)))


@pytest.fixture(scope="module")
def voila_url(model_path, tmp_path_factory):
    url, server = _voila(model_path.parent, tmp_path_factory.mktemp("logs") / "voila.log")
    with server:
        yield url


# --------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT)
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT)
    try:
        yield page
    finally:
        context.close()


def screenshot(page, name: str) -> Path:
    path = config.FIGURES_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def consistent(probs: dict[str, float], present: list[str], threshold: float, slack: float = 0.006) -> bool:
    """Whether ``present`` is exactly the attributes with probability >= ``threshold``.

    Probabilities within ``slack`` of the threshold are not judged (the page shows them rounded).
    """
    return all(abs(p - threshold) < slack or (p >= threshold) == (a in present) for a, p in probs.items())


def split_threshold(probs: dict[str, float]) -> float:
    """A threshold (2 decimals) in the widest gap between the probabilities, so some attributes are
    present and some absent; the outer gaps (to 0 and 1) only when the inner ones are too narrow."""
    values = sorted(probs.values())
    inner = [(b - a, (a + b) / 2) for a, b in zip(values, values[1:])]
    outer = [(values[0], values[0] / 2), (1 - values[-1], (1 + values[-1]) / 2)]
    width, middle = max(inner) if inner and max(inner)[0] >= 0.03 else max(outer)
    return round(middle, 2)


def big_bmp(mib: float) -> bytes:
    """A valid BMP image of about ``mib`` MiB."""
    from PIL import Image

    side = int((mib * 2**20 / 3) ** 0.5)
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (40, 120, 200)).save(buf, format="BMP")
    return buf.getvalue()


# --------------------------------------------------------------------------- Streamlit


def st_upload(page, files) -> None:
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(files)


def st_rows(page, attributes) -> tuple[dict[str, float], list[str]]:
    """Probabilities and present attributes as the bars show them."""
    from playwright.sync_api import expect

    rows = page.locator(".aimonk-row")
    expect(rows).to_have_count(len(attributes))
    probs = {r.get_attribute("data-attribute"): float(r.get_attribute("data-probability")) for r in rows.all()}
    present = [r.get_attribute("data-attribute") for r in rows.all() if r.get_attribute("data-present") == "1"]
    return probs, present


def st_wait_idle(page) -> None:
    """Wait for Streamlit's rerun to finish (the "Running..." indicator disappears)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached")


def test_streamlit_upload_threshold_and_screenshot(streamlit_url, page, attributes):
    from playwright.sync_api import expect

    page.goto(streamlit_url)
    expect(page.get_by_text("Upload a JPEG")).to_be_visible()
    st_upload(page, IMAGE)
    expect(page.locator("code").get_by_text("Image: image_0.jpg")).to_be_visible()
    probs, present = st_rows(page, attributes)
    assert list(probs) == attributes and all(0 <= p <= 1 for p in probs.values())
    box = page.locator('[data-testid="stImage"] img').bounding_box()
    assert (round(box["width"]), round(box["height"])) == (320, 320)  # the fixed display size

    slider = page.locator('[data-testid="stSidebar"]').get_by_role("slider")
    slider.focus()
    page.keyboard.press("Home")  # threshold 0: every attribute present
    expect(page.locator('.aimonk-row[data-present="1"]')).to_have_count(len(attributes))
    expect(page.get_by_role("switch")).not_to_be_checked()  # the slider switched off the tuned thresholds
    page.keyboard.press("End")  # threshold 1: none present
    expect(page.locator('.aimonk-row[data-present="1"]')).to_have_count(0)
    expect(page.get_by_text("No attribute is present at this threshold.")).to_be_visible()

    # A threshold between the probabilities: present must be exactly those at or above it.
    target = split_threshold(probs)
    for _ in range(round((1 - target) / 0.01)):
        page.keyboard.press("ArrowLeft")
    st_wait_idle(page)
    shown = float(page.locator('[data-testid="stSliderThumbValue"]').inner_text())
    assert shown == pytest.approx(target, abs=0.011)
    expect(page.get_by_text(f"threshold {shown:.2f} for every attribute")).to_be_visible()
    _, present = st_rows(page, attributes)
    assert consistent(probs, present, shown), (probs, present, shown)
    screenshot(page, "app_streamlit.png")

    page.get_by_text("Use tuned thresholds").click()  # back to the checkpoint's decisions
    expect(page.get_by_text("tuned thresholds per attribute")).to_be_visible()


def test_streamlit_non_image_then_image(streamlit_url, page, attributes):
    from playwright.sync_api import expect

    page.goto(streamlit_url)
    expect(page.get_by_text("Upload a JPEG")).to_be_visible()
    st_upload(page, NOT_AN_IMAGE)
    expect(page.get_by_text("Cannot read notes.txt as an image: not a recognised image file")).to_be_visible()
    expect(page.locator(".aimonk-row")).to_have_count(0)
    screenshot(page, "app_streamlit_error.png")
    st_upload(page, IMAGE)  # the app keeps working
    expect(page.locator("code").get_by_text("Image: image_0.jpg")).to_be_visible()
    st_rows(page, attributes)
    expect(page.get_by_text("Cannot read notes.txt")).to_have_count(0)


def test_streamlit_refuses_too_large_upload(streamlit_url, page):
    from playwright.sync_api import expect

    page.goto(streamlit_url)
    expect(page.get_by_text("Upload a JPEG")).to_be_visible()
    st_upload(page, {"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": b"\0" * (config.MAX_UPLOAD_BYTES + 1)})
    expect(page.get_by_text(re.compile(r"must be 20(\.0)? ?MB or smaller"))).to_be_visible()


# --------------------------------------------------------------------------- Voila


def voila_open(page, url: str) -> None:
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1280, "height": 1600})
    page.goto(url)
    expect(page.locator(".widget-upload")).to_be_visible()


def voila_upload(page, files) -> None:
    # ipywidgets' FileUpload keeps its <input type=file> outside the page, so go through the chooser.
    with page.expect_file_chooser() as chooser:
        page.locator(".widget-upload").click()
    chooser.value.set_files(files)


def voila_present(page) -> list[str]:
    text = page.locator(".widget-html pre").inner_text()
    return ast.literal_eval(re.search(r"Attributes present: (\[.*\])", text).group(1))


def voila_probs(page, attributes) -> dict[str, float]:
    """Probabilities from the per-attribute status lines ("present 0.63 >= 0.50")."""
    from playwright.sync_api import expect

    status = page.locator(".widget-html").filter(has_text=re.compile(r"^\s*(present|absent) \d"))
    expect(status).to_have_count(len(attributes))
    values = [float(re.search(r"(present|absent) ([0-9.]+)", t).group(2)) for t in status.all_inner_texts()]
    return dict(zip(attributes, values))


def voila_threshold(page, value: float) -> None:
    readout = page.locator(".widget-readout").first
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(f"{value:.2f}")
    page.keyboard.press("Enter")


def test_voila_upload_threshold_and_screenshot(voila_url, page, attributes):
    from playwright.sync_api import expect

    voila_open(page, voila_url)
    expect(page.get_by_text("upload_panel(")).to_have_count(0)  # no code cells shown
    expect(page.get_by_text("from aimonk")).to_have_count(0)
    voila_upload(page, str(IMAGE))
    expect(page.locator(".widget-html pre")).to_contain_text("Image: image_0.jpg")
    probs = voila_probs(page, attributes)
    img = page.locator(".widget-image").first
    expect(img).to_be_visible()
    assert img.bounding_box()["width"] == pytest.approx(256, abs=3)  # the notebook's display_size

    voila_threshold(page, 0.0)
    expect(page.locator(".widget-html pre")).to_contain_text(f"Attributes present: {attributes}")
    voila_threshold(page, 1.0)
    expect(page.locator(".widget-html pre")).to_contain_text("Attributes present: []")
    target = split_threshold(probs)
    voila_threshold(page, target)
    expect(page.locator(".widget-html").filter(has=page.locator("pre"))).to_contain_text(
        f"threshold {target:.2f} for all")
    assert consistent(probs, voila_present(page), target, slack=0.011), (probs, voila_present(page), target)
    page.mouse.click(1270, 10)  # blur the threshold readout before the picture
    screenshot(page, "app_voila.png")


def test_voila_non_image_and_upload_sizes(voila_url, page, attributes):
    from playwright.sync_api import expect

    voila_open(page, voila_url)
    voila_upload(page, NOT_AN_IMAGE)
    expect(page.get_by_text("Cannot read notes.txt as an image: not a recognised image file")).to_be_visible()
    # Bigger than tornado's default 10 MiB websocket message: arrives only thanks to voila.json.
    limit = config.MAX_UPLOAD_BYTES / 2**20
    voila_upload(page, {"name": "big.bmp", "mimeType": "image/bmp", "buffer": big_bmp(limit - 1)})
    expect(page.locator(".widget-html pre")).to_contain_text("Image: big.bmp")
    voila_probs(page, attributes)
    voila_upload(page, {"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": b"\0" * (config.MAX_UPLOAD_BYTES + 1)})
    expect(page.get_by_text(f"the limit is {limit:.1f} MiB")).to_be_visible()
    voila_upload(page, str(IMAGE))  # still working
    expect(page.locator(".widget-html pre")).to_contain_text("Image: image_0.jpg")


def test_voila_without_model_names_the_command(page, tmp_path):
    from playwright.sync_api import expect

    url, server = _voila(tmp_path, tmp_path / "voila.log")
    hint = re.compile(r"make reports|python -m aimonk train")
    with server:
        page.goto(url)
        expect(page.get_by_text(re.compile(hint.pattern + "|There was an error")).first).to_be_visible()
        expect(page.get_by_text("There was an error")).to_have_count(0)
        expect(page.get_by_text(hint).first).to_be_visible()
