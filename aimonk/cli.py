"""Command line: ``python -m aimonk {train,predict,evaluate,audit,calibrate-int8,export}``. Errors print one line and exit 1."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import fields

import pandas as pd

from aimonk import config, distributed
from aimonk.audit import AUDIT_FOLDS, NEAR_DUPLICATE_BITS, AuditResult, audit
from aimonk.checkpoint import CheckpointMeta
from aimonk.data import shown
from aimonk.evaluate import score_folder
from aimonk.features import DEFAULT_BACKBONES
from aimonk.export import FORMATS, export_model
from aimonk.inference import RUNTIME_ENV, RUNTIMES
from aimonk.int8 import calibrate_checkpoint
from aimonk.metrics import attribute_report, report_to_json, summarize
from aimonk.predict import Predictor, list_images
from aimonk.train import RECIPES, TrainConfig, recipe_config, train

DEFAULT_MODEL = str(config.DEFAULT_MODEL)
PRECISION_HELP = ("inference precision: auto (per backbone and device), fp32, bf16, fp16 (CUDA) or int8 "
                  "(CPU; ResNet18 checkpoints without a probe ensemble)")
LABELS_HELP = "labels file to use instead of DATA/labels.txt, e.g. an audit review's labels.reviewed.txt"
RUNTIME_HELP = (f"what runs the model: torch (the reference), onnxruntime, openvino (optional extra deploy; a "
                f"checkpoint is exported to ONNX on first use, cached), or auto: the fastest installed runtime that "
                f"matches torch fp32 on a few images (within 1e-4, no decision flip), or openvino in bf16 where the "
                f"checkpoint's validation images verify it (macro AP within 0.005, at most 1 %% of decisions "
                f"changed), measured once and printed (default: ${RUNTIME_ENV} if set, else auto)")
RECIPE_HELP = ("preset: 'pretrained' (the best measured recipe: EfficientNet-Lite0 ImageNet fine-tuning, head "
               "first, AdamW + cosine + crops + best epoch kept, averaged with a frozen-feature probe) or 'original' (the seed recipe: ResNet18, "
               "Adam 1e-4, batch 16, 20 epochs; the defaults shown below); explicit flags override it")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Every ``TrainConfig`` field becomes a flag, with its ``help`` metadata as help text."""
    p.add_argument("--recipe", choices=list(RECIPES), default="pretrained", help=RECIPE_HELP)
    # Flags left out stay out of the namespace (SUPPRESS), so a preset can fill them.
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata['help']} (default: {f.default})"
        if f.name == "data_dir":
            p.add_argument("--data", "--data-dir", dest="data_dir", required=True, help=f.metadata["help"])
        elif f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_)
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=typ, default=argparse.SUPPRESS, help=help_)


def train_config(a: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``train`` flags: the recipe, then the flags given."""
    values = {k: v for k, v in vars(a).items() if k not in ("command", "func", "recipe")}
    return recipe_config(a.recipe, **values)


def cmd_train(a: argparse.Namespace) -> int:
    result = train(train_config(a))
    if not distributed.is_main():
        return 0  # under torchrun, rank 0 reports
    h = result.history
    print(f"Saved {result.checkpoint} ({len(h['loss'])} iterations, final epoch loss {h['epoch_loss'][-1]:.4f}, "
          f"{result.seconds:.0f}s)")
    if h.get("val_macro_ap"):
        best = h.get("best_epoch")
        kept = f"kept epoch {best} of {len(h['val_macro_ap'])}" if best else "last epoch"
        print(f"Validation macro AP ({kept}): {h['val_macro_ap'][(best or 0) - 1]:.3f}")
    probe = result.meta.probe
    if probe and probe["val_macro_ap"] is not None:
        how = "out of fold; the saved probe was refitted on training + validation" if probe.get("cross_fit") else "saved"
        on = " + ".join(probe.get("backbones") or [result.meta.backbone])
        print(f"Validation macro AP averaged with the frozen-feature probe on {on} ({how}; C {probe['C']:g}): "
              f"{probe['val_macro_ap']:.3f}")
    print(f"Decisions: {decisions_text(result.meta)}")
    if result.loss_plot:
        print(f"Loss plot: {result.loss_plot}")
    return 0


def decisions_text(meta: CheckpointMeta) -> str:
    """One line: each attribute's decision rule, e.g. ``Attr1 p >= 0.42, Attr2 always absent (majority)``."""
    rules = [f"{a} p >= {t:.2f}" if d == "threshold" else f"{a} always {d.split('_')[1]} (majority)"
             for a, t, d in zip(meta.attributes, meta.thresholds, meta.decisions)]
    return ", ".join(rules)


def cmd_predict(a: argparse.Namespace) -> int:
    """Predict every image given or found in the folders given, each reported on its own.

    A path that cannot be read (not an image, missing, a broken symbolic link, permission denied, a
    FIFO, a folder that cannot be listed) becomes one error entry (``Image: NAME`` / ``Error: ...``,
    or ``"error"`` in the JSON) and the others are still predicted.

    Returns:
        0 when every image was predicted, 1 when at least one could not be (all results are still
        printed). A failure of the whole run (no model, no images) is an ``error:`` line and 1 too.
    """
    predictor = Predictor(a.model, precision=a.precision, runtime=a.runtime)
    paths = list_images(a.images)
    if not paths:
        raise ValueError("no images found in " + ", ".join(shown(p) for p in a.images))
    results = predictor.predict_many(paths, threshold=a.threshold, batch_size=a.batch_size)
    if a.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        print("\n".join(str(r) for r in results))
    return 1 if any(r.error for r in results) else 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    targets, probs, names, predictor = score_folder(Predictor(a.model, precision=a.precision, runtime=a.runtime),
                                                    a.data, labels=a.labels)
    report = attribute_report(targets, probs, predictor.attributes, predictor.meta.thresholds,
                              predictor.meta.decisions)
    if a.json:
        print(json.dumps({"model": a.model, "data": a.data, "n_images": len(names), **report_to_json(report)}, indent=1))
        return 0
    cols = ["n_known", "pos_rate", "ap", "roc_auc", "auc_lo", "auc_hi", "precision", "recall", "f1", "majority_f1"]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(report[cols].round(3).to_string())
    print()
    for attr, row in report.iterrows():
        print(f"{attr}: {row['verdict']}")
    s = summarize(report)
    print(f"\nmacro AP {s['macro_ap']:.3f} (chance {s['macro_pos_rate']:.3f}) | macro F1 {s['macro_f1']:.3f} "
          f"(majority baseline {s['macro_majority_f1']:.3f})")
    return 0


def cmd_audit(a: argparse.Namespace) -> int:
    backbones = [b.strip() for b in a.backbones.split(",") if b.strip()]
    result = audit(a.data, a.labels, backbones, a.image_size, a.folds, seed=a.seed, near_bits=a.near_bits,
                   method=a.method, recipe=a.recipe)
    if a.json:
        print(json.dumps(result.to_json(a.top), indent=1))
        return 0
    print(audit_text(result, a.top))
    return 0


def audit_text(result: AuditResult, top: int) -> str:
    """The audit for a terminal: the signal gate, the conflicting duplicates and the top suspects."""
    s = result.settings
    known = int((result.targets >= 0).sum())
    source = (f"a probe on frozen {' + '.join(s['backbones'])} features" if s["method"] == "probe"
              else f"the fine-tuned {s['recipe']} recipe")
    lines = [f"Label audit of {s['labels']}: {len(result.names)} images, {known} known labels; out-of-sample "
             f"scores from {source}, {s['folds']}-fold cross-fitted",
             "", "Signal gate (out-of-sample AUC; audited only where its 95% interval is above 0.5):",
             result.signal[["n_known", "n_positive", "auc", "auc_lo", "auc_hi", "signal", "n_flagged"]]
             .round(3).to_string(), "", result.summary(), ""]
    for g in result.duplicates:
        copies = "; ".join(f"{n} ({' '.join(t)})" for n, t in g["labels"].items())
        lines.append(f"{g['kind']} copies disagree on {', '.join(g['conflicting'])}: {copies}")
    suspects = result.suspects(top)
    if len(suspects):
        lines += ["", f"Top {len(suspects)} suspects (score: higher = more likely wrong; duplicates first):",
                  suspects[["image", "attribute", "label", "probability", "score", "flagged", "duplicate"]]
                  .round(3).to_string()]
    return "\n".join(lines)


def cmd_calibrate_int8(a: argparse.Namespace) -> int:
    calibration = calibrate_checkpoint(a.model, a.data)
    print(f"{a.model}: int8 calibration from {calibration['images']} images of {a.data} "
          f"(predict with --precision int8)")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    result = export_model(a.model, a.out, format=a.format, precision=a.precision, data_dir=a.data)
    print(f"Saved {result.path} ({result.format}, {result.precision}) and {result.card}")
    for key, p in result.parity.items():
        print(f"parity with torch fp32, {key}: max |dp| {p['max_abs_diff']:.2e}, decision flips {p['decision_flips']} "
              f"of {p['decisions']} ({result.parity_source})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aimonk", description="Multilabel image attribute classification.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model on a folder with labels.txt and images/")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)
    p = sub.add_parser("predict", help="predict attributes for images or folders")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint, or a model exported from one (.onnx) "
                   "(default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None, help="one threshold for all attributes "
                   "(default: the checkpoint's tuned per-attribute decisions)")
    p.add_argument("--batch-size", type=int, default=32, help="images per inference batch")
    p.add_argument("--json", action="store_true", help="print JSON with probabilities")
    p.add_argument("--precision", default="auto", help=PRECISION_HELP)
    p.add_argument("--runtime", default=None, choices=RUNTIMES, help=RUNTIME_HELP)
    p.set_defaults(func=cmd_predict)
    e = sub.add_parser("evaluate", help="per-attribute metrics on a labelled folder")
    e.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint (default: %(default)s)")
    e.add_argument("--data", required=True, help="folder with labels.txt and images/")
    e.add_argument("--labels", default=None, help=LABELS_HELP)
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--precision", default="auto", help=PRECISION_HELP)
    e.add_argument("--runtime", default=None, choices=RUNTIMES, help=RUNTIME_HELP)
    e.set_defaults(func=cmd_evaluate)
    u = sub.add_parser("audit", help="find the labels that the images dispute (NA-aware), gated on signal")
    u.add_argument("--data", required=True, help="folder with labels.txt and images/")
    u.add_argument("--labels", default=None, help="labels file to audit instead of DATA/labels.txt")
    u.add_argument("--top", type=int, default=20, help="suspects to list (default: %(default)s)")
    u.add_argument("--json", action="store_true", help="print the whole audit as JSON (see docs/audit.md)")
    u.add_argument("--method", choices=["probe", "finetune"], default="probe",
                   help="probe: logistic regression on cached frozen features, seconds per fold (default); "
                        "finetune: one training of --recipe per fold, the slow option")
    u.add_argument("--recipe", choices=list(RECIPES), default="pretrained", help="the recipe of --method finetune")
    u.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES),
                   help="frozen networks whose features the probe reads (default: %(default)s)")
    u.add_argument("--image-size", type=int, default=224, help="network input size (default: %(default)s)")
    u.add_argument("--folds", type=int, default=AUDIT_FOLDS, help="cross-fitting folds (default: %(default)s)")
    u.add_argument("--near-bits", type=int, default=NEAR_DUPLICATE_BITS,
                   help="perceptual-hash bits within which images count as near-identical (default: %(default)s)")
    u.add_argument("--seed", type=int, default=0, help="fold seed")
    u.set_defaults(func=cmd_audit)
    c = sub.add_parser("calibrate-int8", help="add int8 calibration to a checkpoint trained before training did it")
    c.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint, updated in place (default: %(default)s)")
    c.add_argument("--data", required=True, help="folder with labels.txt and images/; its validation images are left out")
    c.set_defaults(func=cmd_calibrate_int8)
    x = sub.add_parser("export", help="export the whole model (ensemble, preprocessing, TTA) to ONNX or OpenVINO, "
                       "with MODEL_CARD.md beside it")
    x.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint (default: %(default)s)")
    x.add_argument("--format", default="onnx", choices=FORMATS, help="onnx, or openvino (IR .xml + .bin) "
                   "(default: %(default)s)")
    x.add_argument("--precision", default="fp32", choices=("fp32", "int8"), help="fp32, or int8: static "
                   "quantization of the fine-tuned network's convolutions, calibrated on the training images "
                   "(default: %(default)s)")
    x.add_argument("--out", default=None, help="the file to write (default: beside the checkpoint, e.g. model.onnx)")
    x.add_argument("--data", default=None, help="the training data folder, if not where the checkpoint says "
                   "(for the card, the parity images and int8 calibration)")
    x.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *_: f"warning: {msg}\n"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
