"""The Streamlit app: upload an image, see each attribute's confidence and which are present.

Run from the repository root (the model path defaults to ``models/model.pth``)::

    streamlit run aimonk/app.py -- --model models/model.pth

The model is loaded once per server (``st.cache_resource`` around ``aimonk.predict.get_predictor``)
and each upload goes through ``Predictor.predict``, the same code as the CLI.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path

import streamlit as st

from aimonk import config
from aimonk.checkpoint import CheckpointError
from aimonk.data import ImageLoadError, load_image
from aimonk.inference import RUNTIMES
from aimonk.predict import PredictionResult, Predictor, get_predictor
from aimonk.widgets import thumbnail_png

DISPLAY_SIZE = 320  # side in pixels of the square the uploaded image is shown in
TRAIN_HINT = "`make reports` (runs the notebooks) or `python -m aimonk train --data data/sample`"
FORMATS = "JPEG, PNG, BMP, GIF, TIFF or WebP"
PRESENT_COLOR = "#1a7f64"
ABSENT_COLOR = "#b8bec7"

CSS = """
<style>
.aimonk-bars {display: flex; flex-direction: column; gap: 0.55rem; margin: 0.25rem 0 0.75rem 0;}
.aimonk-row {display: grid; grid-template-columns: 7.5rem 1fr 3.5rem 5.5rem; align-items: center;
             gap: 0.75rem; padding: 0.45rem 0.6rem; border-radius: 0.5rem; border: 1px solid transparent;}
.aimonk-row.present {background: rgba(26, 127, 100, 0.08); border-color: rgba(26, 127, 100, 0.35);}
.aimonk-name {font-weight: 500; overflow: hidden; text-overflow: ellipsis; white-space: nowrap;}
.aimonk-row.present .aimonk-name {font-weight: 700;}
.aimonk-track {position: relative; height: 0.8rem; border-radius: 0.4rem; background: rgba(128, 128, 128, 0.15);}
.aimonk-fill {position: absolute; left: 0; top: 0; bottom: 0; border-radius: 0.4rem;}
.aimonk-tick {position: absolute; top: -0.25rem; bottom: -0.25rem; width: 2px; background: #333;}
.aimonk-value {font-variant-numeric: tabular-nums; text-align: right;}
.aimonk-badge {font-size: 0.8rem; text-align: center; border-radius: 1rem; padding: 0.1rem 0.5rem;}
.aimonk-row.present .aimonk-badge {background: #1a7f64; color: white; font-weight: 600;}
.aimonk-row.absent .aimonk-badge {color: #6b7280; border: 1px solid rgba(128, 128, 128, 0.35);}
</style>
"""


def model_path_from_args(argv: list[str]) -> Path:
    """The checkpoint to serve: ``--model`` after ``--``, else ``$AIMONK_MODEL``, else the default.

    Args:
        argv: the script's arguments (``sys.argv[1:]`` under ``streamlit run``).
    Returns:
        An absolute path; relative paths are taken from the repository root.
    """
    parser = argparse.ArgumentParser(prog="streamlit run aimonk/app.py --", allow_abbrev=False)
    parser.add_argument("--model", default=os.environ.get("AIMONK_MODEL") or str(config.DEFAULT_MODEL),
                        help="checkpoint written by training, or an exported .onnx (default: models/model.pth)")
    args, _ = parser.parse_known_args(argv)
    return config.resolve_path(args.model)


def runtime_from_args(argv: list[str]) -> str | None:
    """What runs the model: ``--runtime`` after ``--``, else ``$AIMONK_RUNTIME``, else None (``Predictor``'s default)."""
    parser = argparse.ArgumentParser(prog="streamlit run aimonk/app.py --", allow_abbrev=False)
    parser.add_argument("--runtime", default=os.environ.get("AIMONK_RUNTIME") or None, choices=RUNTIMES)
    args, _ = parser.parse_known_args(argv)
    return args.runtime


@st.cache_resource(show_spinner="Loading the model...")
def load_predictor(path: str, mtime_ns: int, runtime: str | None = None) -> Predictor:
    """The shared ``Predictor`` for ``path`` on ``runtime``: loaded once per server, again only if the file changes."""
    return get_predictor(path, runtime)


def bars_html(result: PredictionResult) -> str:
    """One row per attribute: name, a confidence bar with the threshold tick, the value, present/absent.

    Rows carry ``data-attribute``, ``data-probability`` and ``data-present`` for tests.
    """
    rows = []
    for a, p in result.probabilities.items():
        on = a in result.present
        t = result.thresholds.get(a, 0.5)
        rows.append(
            f'<div class="aimonk-row {"present" if on else "absent"}" data-attribute="{html.escape(a)}" '
            f'data-probability="{p:.4f}" data-present="{int(on)}">'
            f'<span class="aimonk-name" title="{html.escape(a)}">{html.escape(a)}</span>'
            f'<div class="aimonk-track" title="probability {p:.3f}, threshold {t:.2f}">'
            f'<div class="aimonk-fill" style="width:{100 * p:.1f}%;background:{PRESENT_COLOR if on else ABSENT_COLOR}">'
            f'</div><div class="aimonk-tick" style="left:calc({100 * t:.1f}% - 1px)"></div></div>'
            f'<span class="aimonk-value">{p:.2f}</span>'
            f'<span class="aimonk-badge">{"present" if on else "absent"}</span></div>'
        )
    return CSS + '<div class="aimonk-bars">' + "".join(rows) + "</div>"


def _use_slider() -> None:
    st.session_state["tuned"] = False  # moving the slider means: one threshold for every attribute


def sidebar() -> float | None:
    """The threshold controls; returns the threshold in force (``None``: the checkpoint's tuned rules)."""
    with st.sidebar:
        st.header("Decision threshold")
        st.session_state.setdefault("tuned", True)  # set here, not by value=, as _use_slider also sets it
        tuned = st.toggle("Use tuned thresholds", key="tuned",
                          help="Per-attribute thresholds tuned on validation data and stored in the checkpoint.")
        threshold = st.slider("Threshold for every attribute", 0.0, 1.0, 0.5, 0.01, key="threshold",
                              on_change=_use_slider,
                              help="An attribute is present when its probability is at least this value. "
                                   "Moving the slider switches off the tuned thresholds.")
    return None if tuned else float(threshold)


def model_info(predictor: Predictor) -> None:
    """A short description of the loaded checkpoint, in the sidebar."""
    m = predictor.meta
    tuned = [f"{a} {t:.2f}" if rule == "threshold" else f"{a} ({rule.replace('_', ' ')})"
             for a, t, rule in zip(predictor.attributes, m.thresholds, m.decisions)]
    with st.sidebar:
        st.divider()
        st.subheader("Model")
        st.caption(f"`{predictor.path}`")
        st.markdown(f"- backbone: **{m.backbone}**, input {m.image_size} px, runtime {predictor.runtime}\n"
                    f"- attributes: {', '.join(predictor.attributes)}\n"
                    f"- tuned: {', '.join(tuned)}")


def show_result(result: PredictionResult, image_png: bytes, caption: str, threshold: float | None) -> None:
    """The image at a fixed size beside the per-attribute bars and the seed-format summary."""
    left, right = st.columns([1, 1.6], gap="large")
    with left:
        st.image(image_png, caption=caption, width=DISPLAY_SIZE)
    with right:
        st.subheader("Attributes")
        if result.present:
            st.markdown("Present: " + ", ".join(f"**{a}**" for a in result.present))
        else:
            st.markdown("No attribute is present at this threshold.")
        st.markdown(bars_html(result), unsafe_allow_html=True)
        rule = "tuned thresholds per attribute" if threshold is None else f"threshold {threshold:.2f} for every attribute"
        st.caption(f"Bars show each attribute's probability; the tick marks its threshold ({rule}).")
        st.code(str(result), language=None)


def main(argv: list[str] | None = None) -> None:
    """Lay out the page; Streamlit reruns this on every interaction."""
    st.set_page_config(page_title="aimonk: image attributes", layout="wide")
    model_path = model_path_from_args(sys.argv[1:] if argv is None else argv)
    threshold = sidebar()
    st.title("Image attributes")
    st.caption("Upload an image to see the model's confidence for each attribute and which ones are present.")

    if not model_path.is_file():
        st.warning(f"No model at `{model_path}`. Make one with {TRAIN_HINT}, then reload this page.")
        st.stop()
    mtime = model_path.stat().st_mtime_ns
    try:
        predictor = load_predictor(str(model_path), mtime, runtime_from_args(sys.argv[1:] if argv is None else argv))
    except (CheckpointError, OSError, ValueError, RuntimeError, ImportError) as e:  # said on the page, never a traceback
        st.error(f"Cannot load the model: {e}. Make a new one with {TRAIN_HINT}.")
        st.stop()
    model_info(predictor)

    limit_mb = config.MAX_UPLOAD_BYTES // 2**20
    upload = st.file_uploader("Image", max_upload_size=limit_mb,
                              help=f"A {FORMATS} file of at most {limit_mb} MB.")
    if upload is None:
        st.info(f"Upload a {FORMATS} image (at most {limit_mb} MB) to see its attributes.")
        return
    data = upload.getvalue()
    if len(data) > config.MAX_UPLOAD_BYTES:
        st.error(f"{upload.name} is {len(data) / 2**20:.1f} MB; the limit is {limit_mb} MB. "
                 "Please upload a smaller image.")
        return
    try:
        result = predictor.predict(data, threshold=threshold, name=upload.name)
        img = load_image(data, name=upload.name)
    except ImageLoadError as e:
        st.error(f"Cannot read {upload.name} as an image: {str(e).split(': ', 1)[-1]}. "
                 f"Upload a {FORMATS} file.")
        return
    caption = f"{upload.name} ({img.width} x {img.height} px)"
    show_result(result, thumbnail_png(img, DISPLAY_SIZE), caption, threshold)


if __name__ == "__main__":
    main()
