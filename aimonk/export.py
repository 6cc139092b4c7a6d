"""Export: the whole model a checkpoint describes as one self-describing file that inference servers,
mobile apps and other languages can run, with a model card beside it.

``export_model`` writes the artifact (``aimonk.artifact``: normalisation, probe ensemble and flip TTA
inside, metadata sealed) as ONNX or as OpenVINO IR, in fp32 or int8. int8 is static post-training
quantization with ONNX Runtime's quantizer, calibrated on the checkpoint's training images only; it
quantizes the fine-tuned network's convolutions and keeps the heads, the ensemble's averaging and a
probe ensemble's frozen probe in fp32, because the probe's head turns small feature errors into large
logit changes. Export then measures parity with
torch fp32 in every installed runtime and writes ``MODEL_CARD.md`` in Hugging Face's model card sections.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aimonk import __version__, config
from aimonk.artifact import (
    ARTIFACT_FORMAT,
    INPUT_NAME,
    IR_WEIGHTS_KEY,
    artifact_metadata,
    export_onnx,
    parity,
    probe_images,
    read_artifact,
    require_onnx,
    seal,
)
from aimonk.backends import installed_runtimes
from aimonk.checkpoint import CheckpointMeta, load_checkpoint
from aimonk.data import DatasetIndex, decode_uint8, index_dataset
from aimonk.evaluate import validation_scores
from aimonk.files import atomic_write_bytes, atomic_write_text, file_sha256
from aimonk.inference import PARITY_TOLERANCE, Predictor, fold_batchnorm
from aimonk.metrics import attribute_report, has_signal, summarize

FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "int8")
CARD_NAME = "MODEL_CARD.md"
PARITY_IMAGES = 16  # images that parity with torch is measured on at export
CALIBRATION_IMAGES = 64  # training images that int8 calibration sees
INT8_OP_TYPES = ("Conv",)  # what int8 quantizes: convolutions; heads and averaging stay fp32
PROBE_WEIGHTS = "model.probe."  # weight names of a probe ensemble's frozen probe in the export: kept fp32


@dataclass
class ExportResult:
    """What ``export_model`` wrote and measured."""

    path: Path  # the artifact (.onnx, or the .xml of OpenVINO IR with its .bin beside it)
    card: Path  # MODEL_CARD.md beside it
    format: str  # onnx or openvino
    precision: str  # fp32 or int8
    parity: dict = field(default_factory=dict)  # "runtime precision" -> parity() figures against torch fp32
    parity_source: str = ""  # which images parity was measured on
    calibration_images: int = 0  # training images int8 calibration saw (0 for fp32)


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, format: str = "onnx",
                 precision: str = "fp32", data_dir: str | os.PathLike | None = None,
                 parity_images: int = PARITY_IMAGES, calibration_images: int = CALIBRATION_IMAGES) -> ExportResult:
    """Export the whole model of ``checkpoint`` (probe ensemble and flip TTA included) and write its model card.

    Args:
        checkpoint: a checkpoint written by training.
        out: the artifact to write (default: beside the checkpoint, ``model.onnx``, ``model-int8.onnx``,
            ``model.xml``).
        format: ``"onnx"`` or ``"openvino"`` (IR: ``.xml`` plus ``.bin``).
        precision: ``"fp32"`` or ``"int8"`` (calibrated on the checkpoint's training images).
        data_dir: the training data folder (default: the one the checkpoint records), for the card's
            data summary and validation report, the parity images and int8 calibration.
        parity_images: how many images parity with torch fp32 is measured on.
        calibration_images: how many training images int8 calibration sees.
    Returns:
        An ``ExportResult``.
    Raises:
        ValueError: for an unknown format or precision, int8 without the training images, or an fp32
            export that does not match torch (nothing is written then).
        ImportError: without the optional extra ``deploy``.
    """
    if format not in FORMATS or precision not in PRECISIONS:
        raise ValueError(f"format must be one of {list(FORMATS)} and precision one of {list(PRECISIONS)}, "
                         f"got {format!r} and {precision!r}")
    checkpoint = Path(checkpoint)
    model, meta = load_checkpoint(checkpoint)
    fold_batchnorm(model)  # fewer nodes, and int8 quantizes the folded weights
    sha = file_sha256(checkpoint)
    out = Path(out) if out else default_output(checkpoint, format, precision)
    data = find_data(meta, data_dir)
    with tempfile.TemporaryDirectory(prefix="aimonk-export-") as tmp:
        files = {"fp32": export_onnx(model, meta, Path(tmp) / "fp32.onnx", sha)}
        if precision == "int8":
            calibration = training_images(data, meta, calibration_images)
            files["int8"] = quantize_int8(files["fp32"], Path(tmp) / "int8.onnx", meta, sha, calibration)
        images, source = parity_set(data, meta, parity_images)
        figures = measure_parity(checkpoint, files, images)
        check_fp32_parity(figures, out, source)
        written = write_artifact(files[precision], out, format)
    result = ExportResult(written, out.parent / CARD_NAME, format, precision, figures, source,
                          len(calibration) if precision == "int8" else 0)
    atomic_write_text(result.card, model_card(checkpoint, sha, meta, data, result))
    return result


def default_output(checkpoint: Path, format: str, precision: str) -> Path:
    """Where an export goes by default: beside the checkpoint, named after it."""
    suffix = ".onnx" if format == "onnx" else ".xml"
    return checkpoint.with_name(checkpoint.stem + ("-int8" if precision == "int8" else "") + suffix)


def find_data(meta: CheckpointMeta, data_dir: str | os.PathLike | None) -> DatasetIndex | None:
    """The training data folder's index: ``data_dir``, else the folder the checkpoint records, or None if absent."""
    recorded, labels = (meta.data or {}).get("dir"), (meta.data or {}).get("labels")
    labels = labels if labels and Path(labels).is_file() else None  # e.g. an audit review's labels.reviewed.txt
    for candidate in ([data_dir] if data_dir else [recorded, recorded and config.resolve_path(recorded)]):
        if candidate and (Path(candidate) / "labels.txt").is_file():
            return index_dataset(candidate, warn=False, labels_file=labels)
    if data_dir:
        raise FileNotFoundError(f"{data_dir}: data folder not found (expected labels.txt and images/ inside)")
    return None


def _validation_names(meta: CheckpointMeta) -> list[str]:
    return list((meta.split or {}).get("val") or [])


def training_rows(data: DatasetIndex, meta: CheckpointMeta, n: int) -> list[int]:
    """Up to ``n`` rows of ``data`` drawn at random (seed 0) from the checkpoint's training images, never
    from its validation images."""
    held_out = set(_validation_names(meta))
    rows = [i for i, name in enumerate(data.table.names) if name not in held_out]
    return sorted(np.random.default_rng(0).permutation(rows)[:n].tolist())


def training_images(data: DatasetIndex | None, meta: CheckpointMeta, n: int) -> torch.Tensor:
    """Up to ``n`` of the checkpoint's training images (``training_rows``), decoded: (n, 3, S, S)."""
    if data is None:
        raise ValueError("int8 export calibrates on the checkpoint's training images, and its data folder "
                         f"{(meta.data or {}).get('dir')!r} is not there; pass the folder (--data DIR)")
    return torch.stack([decode_uint8(data.paths[i], meta.image_size) for i in training_rows(data, meta, n)])


def parity_set(data: DatasetIndex | None, meta: CheckpointMeta, n: int) -> tuple[torch.Tensor, str]:
    """``(images, description)``: up to ``n`` validation images of the data folder (any of its images
    without a split), or synthetic images where the folder is absent."""
    if data is None:
        return probe_images(n, meta.image_size), f"{n} synthetic images (smooth noise; the data folder was not found)"
    names = set(_validation_names(meta))
    rows = [i for i, name in enumerate(data.table.names) if name in names] or list(range(len(data.table)))
    which = "validation images" if names else "images"
    return (torch.stack([decode_uint8(data.paths[i], meta.image_size) for i in rows[:n]]),
            f"{min(n, len(rows))} {which} of {data.root}")


def quantize_int8(fp32: Path, out: Path, meta: CheckpointMeta, sha: str, calibration: torch.Tensor) -> Path:
    """Static post-training int8 quantization of the fp32 export ``fp32`` (QDQ, per-channel weights,
    MinMax-calibrated activations on ``calibration``), sealed as an int8 artifact at ``out``.

    Only the convolutions of ``int8_nodes`` are quantized: those of the fine-tuned network. A probe
    ensemble's frozen trunks stay fp32, like the heads, the normalisation and the averaging: the probe's
    head, fitted on standardised features, multiplies a small error in a low-variance feature into a
    large logit change (on the default recipe, quantizing the probe's trunks moved probabilities by up to
    0.5 and flipped decisions; docs/speed.md).
    """
    onnx = require_onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantized = out.with_name("quantized.onnx")
    proto = onnx.load(str(fp32))
    logging.disable(logging.WARNING)  # its advice to pre-process: the export has its BatchNorms folded already
    try:
        quantize_static(str(fp32), str(quantized), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=int8_excluded(proto),
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        logging.disable(logging.NOTSET)
    data = seal(onnx.load(str(quantized)), artifact_metadata(meta, sha, "int8"))
    return atomic_write_bytes(out, data)


def int8_excluded(proto) -> list[str]:
    """The nodes int8 leaves in fp32 among ``INT8_OP_TYPES``: those of a probe ensemble's frozen probe
    (their weights are named ``model.probe.*`` in the export)."""
    return [n.name for n in proto.graph.node
            if n.op_type in INT8_OP_TYPES and len(n.input) > 1 and n.input[1].startswith(PROBE_WEIGHTS)]


class _Calibration:
    """ONNX Runtime's ``CalibrationDataReader``: the calibration images in batches of 8."""

    def __init__(self, images: torch.Tensor, batch_size: int = 8):
        self.batches = iter([{INPUT_NAME: b.numpy()} for b in images.split(batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def measure_parity(checkpoint: Path, files: dict[str, Path], images: torch.Tensor) -> dict[str, dict]:
    """Parity of each export (``files``: precision -> .onnx) in each installed runtime with torch fp32.

    Returns:
        ``{"onnxruntime fp32": {"images", "max_abs_diff", "decision_flips", "decisions", "seconds"}, ...}``.
    """
    reference_predictor = Predictor(checkpoint, device="cpu", precision="fp32", runtime="torch")  # the reference
    reference = reference_predictor.probabilities(images)
    meta, out = reference_predictor.meta, {}
    for precision, path in files.items():
        for runtime in installed_runtimes():
            predictor = Predictor(path, runtime=runtime)
            start = time.perf_counter()
            probs = predictor.probabilities(images)
            figures = parity(reference, probs, meta.thresholds, meta.decisions)
            out[f"{runtime} {precision}"] = {**figures, "decisions": int(probs.size), "seconds": time.perf_counter() - start}
    return out


def check_fp32_parity(figures: dict[str, dict], out: Path, source: str) -> None:
    """Refuse an fp32 export that differs from torch fp32 by more than ``PARITY_TOLERANCE`` or flips a decision.

    Raises:
        ValueError: naming ``out``, the runtime and the figures.
    """
    for key, p in figures.items():
        if key.endswith(" fp32") and (p["max_abs_diff"] > PARITY_TOLERANCE or p["decision_flips"]):
            raise ValueError(f"{out}: not written: the export does not match torch fp32 on {key.split()[0]} "
                             f"(max |dp| {p['max_abs_diff']:.2e} > {PARITY_TOLERANCE:g} or {p['decision_flips']} "
                             f"decision flips, on {source})")


def write_artifact(onnx_file: Path, out: Path, format: str) -> Path:
    """Write the verified export ``onnx_file`` to ``out`` as ONNX, or as OpenVINO IR (``.xml`` + ``.bin``:
    the aimonk metadata, plus the ``.bin``'s sha256, in the IR's ``rt_info``), atomically file by file."""
    art = read_artifact(onnx_file)
    if format == "onnx":
        return atomic_write_bytes(out, art.data)
    import openvino as ov

    model = ov.Core().read_model(art.data)
    for key, value in art.props.items():
        model.set_rt_info(value, ["aimonk", key])
    with tempfile.TemporaryDirectory(prefix="aimonk-ir-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        weights = xml.with_suffix(".bin").read_bytes()
        model.set_rt_info(hashlib.sha256(weights).hexdigest(), ["aimonk", IR_WEIGHTS_KEY])
        ov.save_model(model, str(xml), compress_to_fp16=False)  # the same weights, the rt_info now with their digest
        atomic_write_bytes(out.with_suffix(".bin"), xml.with_suffix(".bin").read_bytes())
        written = atomic_write_bytes(out.with_suffix(".xml"), xml.read_bytes())  # it reads the .bin of its own name
    read_artifact(written, art.checkpoint_sha256)  # as a reader will see it
    return written


# --------------------------------------------------------------------------- the model card


def model_card(checkpoint: Path, sha: str, meta: CheckpointMeta, data: DatasetIndex | None,
               result: ExportResult) -> str:
    """The text of ``MODEL_CARD.md``, in Hugging Face's model card sections.

    Returns:
        Markdown.
    """
    sections = [
        _card_details(checkpoint, sha, meta, result),
        _card_uses(meta),
        _card_limits(meta, data),
        _card_start(result),
        _card_training(meta, data),
        _card_evaluation(checkpoint, meta, data),
        _card_decisions(meta),
        _card_parity(result),
    ]
    return "\n\n".join(sections) + "\n"


def _architecture_text(meta: CheckpointMeta) -> str:
    text = f"{meta.backbone} fine-tuned on {len(meta.attributes)} attributes"
    if meta.probe:
        probed = " + ".join(meta.probe.get("backbones") or [meta.backbone])
        text += (f", averaged (probabilities) with a logistic-regression probe on frozen {probed} ImageNet features "
                 f"(C {meta.probe.get('C')})")
    return text + (", predictions averaged over a horizontal flip (TTA)" if meta.tta else "")


def _card_details(checkpoint: Path, sha: str, meta: CheckpointMeta, result: ExportResult) -> str:
    sha_out = file_sha256(result.path)
    return "\n".join([
        f"# Model card: {result.path.name}",
        "",
        "## Model details",
        "",
        f"- **Model type:** multilabel image attribute classifier; {_architecture_text(meta)}.",
        f"- **Attributes (output order):** {', '.join(meta.attributes)}",
        f"- **Artifact:** `{result.path.name}` ({result.format}, {result.precision}), sha256 `{sha_out}`; "
        f"metadata format `{ARTIFACT_FORMAT}`, written by aimonk {__version__}.",
        f"- **Source checkpoint:** `{checkpoint.name}`, sha256 `{sha}` (trained with aimonk {meta.aimonk_version}).",
        f"- **Input:** uint8 RGB images, shape (batch, 3, {meta.image_size}, {meta.image_size}), resized with "
        f"bilinear antialiasing; normalisation inside the graph (mean {list(meta.mean)}, std {list(meta.std)}).",
        "- **Output:** `probabilities`, float32 (batch, n_attributes), in the order above.",
        *([f"- **int8:** static post-training quantization of the fine-tuned network's convolutions (QDQ, "
           f"per-channel weights), calibrated on {result.calibration_images} training images; the frozen probe, "
           "the heads and the averaging stay fp32."] if result.precision == "int8" else []),
        "- **Licence:** the code that made it is Apache-2.0; the ImageNet weights it starts from carry their own "
        "licences (docs/offline-weights.md).",
    ])


def _card_uses(meta: CheckpointMeta) -> str:
    return "\n".join([
        "## Uses",
        "",
        "### Direct use",
        "",
        f"Tagging images of the kind it was trained on with the attributes {', '.join(meta.attributes)}, "
        "using the decision rules below, or ranking images by an attribute's probability.",
        "",
        "### Out-of-scope use",
        "",
        "Images unlike the training images (another domain, other cameras or renderings); decisions about "
        "people; any attribute marked below as having no evidence of signal, whose output means nothing.",
    ])


def _card_limits(meta: CheckpointMeta, data: DatasetIndex | None) -> str:
    n = len(data.table) if data is not None else None
    lines = ["## Bias, risks, and limitations", ""]
    lines.append(f"- It was trained on {n} labelled images" if n else "- It was trained on a small labelled folder")
    lines[-1] += "; the validation figures below come from a small split and carry wide intervals."
    lines.append("- Labels marked NA were left out of training and evaluation, so the model was never told what "
                 "an ambiguous image is.")
    lines.append("- Probabilities are not calibrated across attributes; compare an attribute's probability with "
                 "its own threshold only.")
    if meta.decision and any(d != "threshold" for d in meta.decisions):
        lines.append("- Some attributes use the majority rule: their prediction does not depend on the image.")
    return "\n".join(lines)


def _card_start(result: ExportResult) -> str:
    name = result.path.name
    return "\n".join([
        "## How to get started with the model",
        "",
        "```bash",
        f"python -m aimonk predict IMAGES --model {name}            # ONNX Runtime or OpenVINO, whichever is faster",
        "```",
        "",
        "```python",
        "import onnxruntime as ort  # any ONNX runtime, any language: the file describes itself",
        f"session = ort.InferenceSession('{name}')",
        "meta = session.get_modelmeta().custom_metadata_map  # aimonk.attributes, aimonk.thresholds, ...",
        "probs = session.run(None, {'images': images_uint8_nchw})[0]",
        "```",
    ]) if result.format == "onnx" else "\n".join([
        "## How to get started with the model",
        "",
        "```python",
        "import openvino as ov",
        f"compiled = ov.Core().compile_model('{name}', 'CPU')",
        "probs = compiled({0: images_uint8_nchw})[0]",
        "```",
    ])


def label_counts(data: DatasetIndex) -> list[dict]:
    """Per attribute, the positive, negative and NA labels of the folder's rows with an image."""
    t = data.table.targets
    return [{"attribute": a, "positive": int((t[:, j] == 1).sum()), "negative": int((t[:, j] == 0).sum()),
             "na": int((t[:, j] < 0).sum())} for j, a in enumerate(data.attributes)]


def _card_training(meta: CheckpointMeta, data: DatasetIndex | None) -> str:
    lines = ["## Training details", "", "### Training data", ""]
    recorded = (meta.data or {}).get("dir", "not recorded")
    if data is None:
        lines.append(f"Folder `{recorded}` (recorded in the checkpoint; not found at export, so it is not described here).")
    else:
        labels, trained_on = data.table.source, (meta.data or {}).get("labels_sha256")
        now = file_sha256(labels)
        n_val = len(_validation_names(meta))
        lines += [f"- **Folder:** `{recorded}` (read at export from `{data.root}`)",
                  f"- **Images:** {len(data.table)} labelled images with a file ({n_val} held out for validation, "
                  f"{len(data.table) - n_val} for training); {len(data.missing)} listed without a file",
                  f"- **Labels:** `{labels.name}`, sha256 `{now}` " + (
                      "(as recorded at training)" if now == trained_on else
                      f"(**changed since training**, which read `{trained_on}`)" if trained_on else
                      "(the file as found at export; the checkpoint does not record it)"),
                  "", "| attribute | positive | negative | NA |", "|---|---|---|---|"]
        lines += [f"| {c['attribute']} | {c['positive']} | {c['negative']} | {c['na']} |" for c in label_counts(data)]
    lines += ["", "### Training procedure", ""]
    keys = ("backbone", "weights", "epochs", "batch_size", "lr", "optimizer", "schedule", "image_size", "augment",
            "head_init", "freeze_epochs", "tta", "probe_ensemble", "probe_backbones", "probe_cross_fit", "keep_best",
            "val_fraction", "seed")
    recipe = ", ".join(f"{k} {meta.config[k]!r}" for k in keys if k in meta.config)
    lines.append(f"Recipe: {recipe or 'not recorded'}. Trained in {meta.precision}.")
    return "\n".join(lines)


def _card_evaluation(checkpoint: Path, meta: CheckpointMeta, data: DatasetIndex | None) -> str:
    lines = ["## Evaluation", ""]
    names = _validation_names(meta)
    if data is None or not names:
        why = "the data folder was not found at export" if data is None else "the checkpoint has no validation split"
        return "\n".join(lines + [f"No validation report: {why}."])
    with warnings.catch_warnings():  # the folder's missing images were reported when it was indexed
        warnings.simplefilter("ignore", UserWarning)
        targets, probs, _, _ = validation_scores(checkpoint, data.root, names, runtime="torch")
    report = attribute_report(targets, probs, meta.attributes, meta.thresholds, meta.decisions)
    honest = "out-of-fold scores stored in the checkpoint" if meta.validation_scores else "the saved model"
    lines += [f"Validation split: {len(targets)} images held out from training, scored by {honest}. AP and ROC-AUC "
              "with a 95 % bootstrap interval; the verdict asks whether the interval clears chance (0.5).", "",
              "| attribute | known labels | positive rate | AP | ROC-AUC (95 % CI) | verdict |", "|---|---|---|---|---|---|"]
    for a, row in report.iterrows():
        lines.append(f"| {a} | {row['n_known']} | {row['pos_rate']:.2f} | {row['ap']:.3f} | {row['roc_auc']:.3f} "
                     f"({row['auc_lo']:.2f}-{row['auc_hi']:.2f}) | {short_verdict(row['auc_lo'], row['auc_hi'], row['roc_auc'])} |")
    s = summarize(report)
    lines += ["", f"Macro AP {s['macro_ap']:.3f} (chance: the positive rate, {s['macro_pos_rate']:.3f})."]
    return "\n".join(lines)


def short_verdict(lo: float, hi: float, auc: float) -> str:
    """One phrase for the card: learned signal, no evidence of signal, worse than chance, or cannot tell."""
    if np.isnan(auc):
        return "cannot tell (one class in validation)"
    if has_signal(lo):
        return "learned signal"
    return "worse than chance" if hi < 0.5 else "no evidence of signal"


def _card_decisions(meta: CheckpointMeta) -> str:
    lines = ["## Decision rules", "",
             "Chosen when training ended, on the validation split: a tuned threshold where the model beats chance "
             "and the majority rule there, else the majority rule. Stored in the artifact's metadata "
             "(`aimonk.decisions`, `aimonk.thresholds`).", ""]
    for a, t, d in zip(meta.attributes, meta.thresholds, meta.decisions):
        rule = f"present if p >= {t:.2f}" if d == "threshold" else f"always {d.split('_')[1]} (majority rule)"
        lines.append(f"- **{a}:** {rule}")
    return "\n".join(lines)


def _card_parity(result: ExportResult) -> str:
    lines = ["## Export parity", "",
             f"Measured at export on {result.parity_source}: each runtime's probabilities against torch fp32 "
             "(the reference), and the decisions (image x attribute) that differ under the rules above.", "",
             "| runtime | precision | max abs probability difference | decision flips |", "|---|---|---|---|"]
    for key, p in result.parity.items():
        runtime, precision = key.split()
        lines.append(f"| {runtime} | {precision} | {p['max_abs_diff']:.2e} | {p['decision_flips']} of {p['decisions']} |")
    if not result.parity:
        lines.append("| (no runtime installed: pip install -e '.[deploy]') | | | |")
    return "\n".join(lines)

