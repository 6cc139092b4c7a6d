"""Quality benchmark: recipes against baselines on the same grouped, stratified folds.

``python -m aimonk.benchmark quality --data DIR [--folds 3] [--recipes original,pretrained,frozen_lr]``

For each fold, every recipe trains on the other folds (with its own inner validation split for
threshold tuning and early stopping) and is scored on the held-out fold. The table reports
mean +- std across folds of macro AP, macro ROC-AUC, macro F1 at 0.5 and macro F1 with the
decision rule tuned on the inner validation split, next to the majority-class baseline and the
label-permutation chance reference. ``minutes`` is a recipe's training time (the ``train`` call
as a user runs it: start-up, epochs, validation, probe, decisions); ``fold_minutes`` adds the
benchmark's own scoring of the fold and of the ablation rows. Training caches its decoded images
and frozen features in a folder of the run's own, one per recipe, so each recipe's first fold starts
cold, as a user's first training on a folder does, and its later folds find what its earlier folds
stored, as a retraining after a label change does (``--set cache_dir=PATH`` shares one cache instead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from aimonk import int8
from aimonk.backends import installed_runtimes
from aimonk.benchmark.deployed import deployed_predictor
from aimonk.benchmark.report import run_info
from aimonk.data import file_digest, index_dataset, make_folds
from aimonk.evaluate import score_folder, validation_scores
from aimonk.files import atomic_write_text
from aimonk.metrics import apply_decisions, choose_decisions, macro_average_precision, permutation_auc
from aimonk.predict import Predictor
from aimonk.train import PRETRAINED_12EP_RECIPE, PRETRAINED_RECIPE, RECIPES, TrainConfig, train


def _macro(fn, targets: np.ndarray, values: np.ndarray) -> float:
    out = []
    for j in range(targets.shape[1]):
        m = targets[:, j] >= 0
        y = targets[m, j].astype(int)
        if 0 < y.sum() < len(y):
            out.append(fn(y, values[m, j]))
    return float(np.mean(out)) if out else float("nan")


def _f1(y, pred):
    from sklearn.metrics import f1_score

    return f1_score(y, pred, zero_division=0)


def _auc(y, p):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(y, p)


def fold_scores(targets: np.ndarray, probs: np.ndarray, thresholds, decisions) -> dict:
    """Held-out metrics of one model on one fold."""
    pred_tuned = apply_decisions(probs, thresholds, decisions)
    chance = [permutation_auc(targets[targets[:, j] >= 0, j].astype(int), probs[targets[:, j] >= 0, j], 100)["mean"]
              for j in range(targets.shape[1])]
    return {
        "macro_ap": macro_average_precision(targets, probs),
        "macro_auc": _macro(_auc, targets, probs),
        "macro_f1_at_0.5": _macro(_f1, targets, probs >= 0.5),
        "macro_f1_tuned": _macro(_f1, targets, pred_tuned),
        "chance_auc": float(np.nanmean(chance)),
        "n_fallback": int(sum(d != "threshold" for d in decisions)),
    }


def majority_scores(train_targets: np.ndarray, targets: np.ndarray) -> dict:
    """The majority-class predictor, its majority taken from the training part."""
    f1s, aps = [], []
    for j in range(targets.shape[1]):
        known_tr = train_targets[train_targets[:, j] >= 0, j]
        y = targets[targets[:, j] >= 0, j].astype(int)
        if not (0 < y.sum() < len(y)):
            continue
        present = known_tr.mean() >= 0.5 if len(known_tr) else False
        f1s.append(_f1(y, np.full(len(y), present)))
        aps.append(y.mean())  # AP of a constant score is the positive rate
    return {"macro_ap": float(np.mean(aps)), "macro_auc": 0.5, "macro_f1_at_0.5": float(np.mean(f1s)),
            "macro_f1_tuned": float(np.mean(f1s)), "chance_auc": 0.5, "n_fallback": 0}


FROZEN_LR_RECIPE = {**PRETRAINED_RECIPE, "image_size": 224, "epochs": 0, "freeze_epochs": 0, "head_init": "linear_probe",
                    "tta": False, "keep_best": False, "probe_ensemble": False}
"""A strong cheap reference: logistic regression on frozen EfficientNet-Lite0 ImageNet features
(``train`` fits the head by ``linear_probe_head`` and trains no epoch)."""


PROGRESSIVE_RECIPE = {**PRETRAINED_RECIPE, "progressive_epochs": 3, "progressive_size": 128}
"""The default recipe with its first 3 of 6 epochs on 128 px crops (progressive resizing), a lever weighed."""


TORCH = "torch"  # the trained models are scored in torch here; the exported runtimes in a process of their own
RUNTIME_ROWS = (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))  # deployed runtimes scored


def run(data_dir: str, recipes: list[str], folds: int = 3, seed: int = 0, epochs: int | None = None,
        image_size: int | None = None, workdir: str | None = None, progress: bool = False,
        run_folds: int | None = None, overrides: dict | None = None, only_fold: int | None = None,
        train_seed: int | None = None, runtimes=RUNTIME_ROWS) -> pd.DataFrame:
    """Run every recipe on every fold and return one row per (recipe, fold).

    ``seed`` draws the folds and, unless ``train_seed`` is given, seeds training too; a separate
    ``train_seed`` retrains on the same folds with another initialisation, split and data order.
    ``runtimes`` lists the (runtime, precision) pairs each trained model is also scored on, exported.
    """
    index = index_dataset(data_dir)
    digests = [file_digest(p) for p in index.paths]
    fold_rows = make_folds(index.table.targets, digests, folds, seed)
    names = np.asarray(index.table.names)
    recipes_cfg = {**RECIPES, "frozen_lr": FROZEN_LR_RECIPE, "pretrained_12ep": PRETRAINED_12EP_RECIPE,
                   "pretrained_progressive": PROGRESSIVE_RECIPE}
    rows = []
    with contextlib.ExitStack() as stack:  # without a workdir the checkpoints are removed after the run
        work = Path(workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="aimonk-quality-")))
        work.mkdir(parents=True, exist_ok=True)
        overrides = overrides or {}
        for k, test_rows in enumerate(fold_rows[:run_folds]):
            if only_fold is not None and k != only_fold:
                continue
            train_rows = np.setdiff1d(np.arange(len(names)), test_rows)
            rows.append({"recipe": "majority", "fold": k, "minutes": 0.0,
                         **majority_scores(index.table.targets[train_rows], index.table.targets[test_rows])})
            print(json.dumps(rows[-1]), flush=True)
            for recipe in recipes:
                # each recipe's own training cache (decoded images, frozen features), cold at its first fold:
                # a recipe never finds what the recipe before it stored, so the turns are fair
                own = {"cache_dir": str(work / "cache" / recipe), **overrides}
                cfg = _recipe_config(recipe, recipes_cfg, data_dir, work / f"{recipe}_{k}.pth",
                                     seed if train_seed is None else train_seed, epochs, image_size, own, progress)
                rows.extend(_recipe_rows(recipe, k, cfg, list(names[train_rows]), list(names[test_rows]), runtimes))
    return pd.DataFrame(rows)


def _recipe_rows(recipe: str, k: int, cfg: TrainConfig, train_names: list[str], test_names: list[str],
                 runtimes) -> list[dict]:
    """Train one recipe on fold ``k``'s training part; its held-out row, then its ablation and runtime rows."""
    t0 = time.perf_counter()
    result = train(cfg, names=train_names)
    trained = (time.perf_counter() - t0) / 60  # what a user waits for: start-up, epochs, validation, probe
    data_dir, val_names = cfg.data_dir, result.meta.split["val"]
    t_val, p_val, _, _ = validation_scores(result.checkpoint, data_dir, val_names, runtime=TORCH)
    thresholds, decisions = choose_decisions(t_val, p_val, result.meta.attributes)
    t_te, p_te, _, _ = score_folder(result.checkpoint, data_dir, names=test_names, runtime=TORCH)
    scores = fold_scores(t_te, p_te, thresholds, decisions)
    extra = _ablation_rows(recipe, k, result, cfg.tta, data_dir, train_names, val_names, test_names)
    extra += _runtime_rows(runtimes, recipe, k, result.checkpoint, data_dir, test_names, (thresholds, decisions))
    kept = {"kept_epoch": result.history.get("best_epoch", cfg.epochs),
            "val_ap_by_epoch": [round(a, 4) for a in result.history["val_macro_ap"]],
            "epoch_seconds": [round(t, 1) for t in result.history["epoch_seconds"]],
            "probe_seconds": round(result.meta.probe["seconds"], 1) if result.meta.probe else None,
            "precision": result.meta.precision}
    rows = [{"recipe": recipe, "fold": k, "minutes": trained, **scores, **kept,
             "fold_minutes": (time.perf_counter() - t0) / 60}, *extra]  # + scoring the fold and ablations
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def _recipe_config(recipe: str, recipes_cfg: dict, data_dir: str, out: Path, seed: int, epochs: int | None,
                   image_size: int | None, overrides: dict | None, progress: bool) -> TrainConfig:
    """The training settings of one recipe on one fold: the recipe, then the run's epochs, size and overrides."""
    if recipe not in recipes_cfg:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(recipes_cfg)}")
    params = dict(recipes_cfg[recipe])
    if epochs is not None and recipe != "frozen_lr":
        params["epochs"] = epochs
    if image_size is not None:
        params["image_size"] = image_size
    params.update(overrides or {})
    return TrainConfig(**{**params, "data_dir": str(data_dir), "out": str(out), "loss_plot": "", "seed": seed,
                          "progress": progress})


def _ablation_rows(recipe: str, k: int, result, tta: bool, data_dir: str, train_names: list[str],
                   val_names: list[str], test_names: list[str]) -> list[dict]:
    """Rows for the trained model scored again without flip TTA and in int8 (calibrated here, on the fold's
    training part, where the model supports it); no training time of their own."""
    attrs, extra = result.meta.attributes, []
    # A free ablation: the same model scored with the flip TTA switched the other way. A cross-fitted probe
    # without TTA stores no out-of-fold flipped validation scores: that row keeps the model's own decisions.
    t_te, p_te, _, _ = score_folder(result.checkpoint, data_dir, names=test_names, tta=not tta, runtime=TORCH)
    if tta or not result.meta.validation_scores:
        t_val, p_val, _, _ = validation_scores(result.checkpoint, data_dir, val_names, tta=not tta, runtime=TORCH)
        decided = choose_decisions(t_val, p_val, attrs)
    else:
        decided = (result.meta.thresholds, result.meta.decisions)
    extra.append({"recipe": f"{recipe} {'without' if tta else 'with'} flip TTA", "fold": k, "minutes": 0.0,
                  **fold_scores(t_te, p_te, *decided)})
    if not result.meta.int8 and int8.available() and not int8.unsupported(result.meta.backbone, result.meta.probe):
        result.meta.int8 = int8.calibrate_checkpoint(result.checkpoint, data_dir, names=train_names)
    if result.meta.int8:  # the same model in int8 (CPU inference), thresholds tuned in int8 too
        int8_model = Predictor(result.checkpoint, device="cpu", precision="int8")
        t_val, p_val, _, _ = score_folder(int8_model, data_dir, names=val_names)
        t_te, p_te, _, _ = score_folder(int8_model, data_dir, names=test_names)
        extra.append({"recipe": f"{recipe} in int8", "fold": k, "minutes": 0.0,
                      **fold_scores(t_te, p_te, *choose_decisions(t_val, p_val, attrs))})
    return extra


def _runtime_rows(runtimes, recipe: str, k: int, checkpoint: str, data_dir: str, test_names: list[str],
                  decisions: tuple) -> list[dict]:
    """Rows for the trained model exported and run on each installed runtime of ``runtimes``: its held-out
    scores under the model's own decisions (what a deployed model applies), and how far its probabilities
    and decisions are from torch fp32 on the held-out fold.

    The runtimes run in a spawned process of their own: ONNX Runtime and OpenVINO loaded here would
    share this process with the next fold's forked DataLoader workers, which can then crash it.
    """
    wanted = [(r, p) for r, p in runtimes if r in installed_runtimes()]
    if not wanted:
        return []
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        targets, p_fp32, scored = pool.apply(_score_on_runtimes, (wanted, str(checkpoint), str(data_dir), test_names))
    rows = []
    for (runtime, precision), probs in zip(wanted, scored):
        if isinstance(probs, str):
            print(f"{recipe} on {runtime} {precision}, fold {k}: skipped, {probs}")
            continue
        flips = apply_decisions(probs, *decisions) != apply_decisions(p_fp32, *decisions)
        rows.append({"recipe": f"{recipe} on {runtime} {precision}", "fold": k, "minutes": 0.0,
                     **fold_scores(targets, probs, *decisions),
                     "max_abs_diff_vs_torch": float(np.abs(probs - p_fp32).max()),
                     "decision_flips_vs_torch": int(flips.sum())})
    return rows


def _score_on_runtimes(wanted, checkpoint: str, data_dir: str, test_names: list[str]):
    """Targets, torch fp32 probabilities and one probability array per (runtime, precision) on the named images
    (or why that pair cannot run here)."""
    targets, p_fp32, _, _ = score_folder(Predictor(checkpoint, device="cpu", precision="fp32", runtime=TORCH), data_dir,
                                         names=test_names)
    scored = []
    with tempfile.TemporaryDirectory(prefix="aimonk-quality-int8-") as tmp:  # int8 exports, calibrated on training
        for runtime, precision in wanted:
            predictor = deployed_predictor(checkpoint, runtime, precision, data_dir, Path(tmp))
            scored.append(predictor if isinstance(predictor, str) else
                          score_folder(predictor, data_dir, names=test_names)[1])
    return targets, p_fp32, scored


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """mean +- std across folds per recipe."""
    metrics = ["macro_ap", "macro_auc", "macro_f1_at_0.5", "macro_f1_tuned", "chance_auc", "minutes"]
    g = df.groupby("recipe", sort=False)[metrics]
    mean, std = g.mean(), g.std(ddof=0)
    return pd.DataFrame({m: [f"{a:.3f} ± {b:.3f}" for a, b in zip(mean[m], std[m])] for m in metrics}, index=mean.index)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aimonk.benchmark quality", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with labels.txt and images/")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds")
    p.add_argument("--recipes", default="original,pretrained,frozen_lr",
                   help="comma-separated: original, pretrained, frozen_lr, pretrained_12ep (the previous default), "
                        "pretrained_progressive (the default with progressive resizing)")
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs (smoke runs)")
    p.add_argument("--image-size", type=int, default=None, help="override every recipe's image size (smoke runs)")
    p.add_argument("--seed", type=int, default=0, help="fold and training seed")
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed training with this instead of --seed, on the same folds (run-to-run noise)")
    p.add_argument("--run-folds", type=int, default=None, help="score only the first N folds (screening)")
    p.add_argument("--fold", type=int, default=None,
                   help="score only fold K (0-based), e.g. to run the folds in parallel processes; the folds are the same")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field of every recipe run, e.g. --recipes pretrained --set lr=1e-3 "
                        "(screening)")
    p.add_argument("--workdir", default=None,
                   help="keep the trained checkpoints here as RECIPE_FOLD.pth (default: a new temporary folder)")
    p.add_argument("--json", default=None, help="also write the per-fold rows to this JSON file")
    p.add_argument("--runtimes", default=",".join(f"{r}:{q}" for r, q in RUNTIME_ROWS), type=_runtime_pairs,
                   help="comma-separated RUNTIME:PRECISION each trained model is also exported to and scored on "
                        "(those installed), or 'none' (default: %(default)s)")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    start, info = time.perf_counter(), run_info("quality", argv)
    overrides = {}
    for item in a.set:
        key, _, value = item.partition("=")
        if key not in TrainConfig.__dataclass_fields__:
            p.error(f"--set {item}: {key!r} is not a TrainConfig field")
        default = getattr(TrainConfig, key)
        overrides[key] = (value.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)(value)
    df = run(a.data, [r.strip() for r in a.recipes.split(",") if r.strip()], a.folds, a.seed, a.epochs, a.image_size,
             run_folds=a.run_folds, overrides=overrides, only_fold=a.fold,
             train_seed=a.train_seed, workdir=a.workdir, runtimes=a.runtimes)
    table = summary_table(df)
    print(f"\nQuality on {a.data}: {a.folds} folds, mean ± std across folds (held-out fold scores)")
    print(table.to_markdown() if _has_tabulate() else table.to_string())
    print(f"\nwall time {(time.perf_counter() - start) / 60:.1f} min")
    if a.json:  # the run (machine, versions, command, date), then one row per (recipe, fold)
        rows = json.loads(df.to_json(orient="records"))
        info["wall_minutes"] = round((time.perf_counter() - start) / 60, 1)
        cache = "shared" if "cache_dir" in overrides else "recipe"  # "recipe": one per recipe, empty at the start
        record = {"benchmark": "quality", "run": info, "data": a.data, "folds": a.folds, "cache": cache, "rows": rows}
        atomic_write_text(a.json, json.dumps(record, indent=1))
    return 0


def _runtime_pairs(text: str) -> list[tuple[str, str]]:
    """``onnxruntime:fp32,openvino:bf16`` as pairs; ``none`` (or nothing) as no pair."""
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item == "none":
            continue
        runtime, sep, precision = item.partition(":")
        if not sep or runtime not in ("onnxruntime", "openvino") or precision not in ("fp32", "bf16", "int8"):
            raise argparse.ArgumentTypeError(f"{item!r}: expected RUNTIME:PRECISION, RUNTIME onnxruntime or "
                                             f"openvino, PRECISION fp32, bf16 or int8")
        pairs.append((runtime, precision))
    return pairs


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
