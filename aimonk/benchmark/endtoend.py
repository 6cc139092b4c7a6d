"""Training end to end, as a user runs it: ``python -m aimonk train`` against the seed's training script.

``python -m aimonk.benchmark endtoend --data DIR [--recipe original] [--epochs 8] [--limit 320] [--rounds 1]``

Both sides are fresh processes on the same folder (``--limit`` labelled images, evenly spaced, copied
into a temporary folder), timed by the wall clock from start to exit, in turns. Each round runs:

- ``original``: the seed's script (``python -m aimonk.benchmark.original``: ResNet18, Adam 1e-4, batch
  16, fp32 NCHW, PIL decode on every access, every image trained on, no validation);
- ``cli cold``: ``python -m aimonk train --recipe R --epochs E`` with a new, empty ``AIMONK_CACHE_DIR``,
  as on a first run: images decoded, precision ``auto`` measured, validation, decisions, plot, checkpoint;
- ``cli warm``: the same command on the cache the cold run filled, as a retraining after a label change.

The ratios are the seed's seconds over the CLI's, from the medians over rounds. The CLI keeps its
validation split (``val_fraction``), so it trains on fewer images than the seed's script, which has
none; both counts are recorded. Each CLI run's own epoch times (its checkpoint's ``history``) give the
ceiling: the ratio the CLI would reach if start-up, decoding, validation and writing cost nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aimonk import config
from aimonk.benchmark.report import run_info
from aimonk.benchmark.workload import select_rows
from aimonk.checkpoint import load_checkpoint
from aimonk.data import index_dataset, load_split
from aimonk.files import atomic_write_text
from aimonk.review import format_labels
from aimonk.train import recipe_config

SIDES = ("original", "cli cold", "cli warm")


def subset_folder(data_dir: str | Path, limit: int, out: Path) -> int:
    """``limit`` labelled images of ``data_dir`` (evenly spaced; 0 = all) as a folder at ``out``: their
    labels in ``labels.txt`` and copies of the image files in ``images/`` (the data loader refuses links
    that point outside the folder). Returns the image count."""
    index = index_dataset(data_dir, warn=False)
    rows = select_rows(len(index.paths), limit).tolist()
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in rows:
        shutil.copyfile(index.paths[i], out / "images" / index.table.names[i])
    atomic_write_text(out / "labels.txt", format_labels(index.table.subset(rows)))
    return len(rows)


def commands(data: Path, work: Path, recipe: str, epochs: int, image_size: int) -> dict[str, list[str]]:
    """The command line of each side."""
    cli = [sys.executable, "-m", "aimonk", "train", "--recipe", recipe, "--data", str(data), "--epochs", str(epochs),
           "--image-size", str(image_size), "--out", str(work / "cli" / "model.pth"),
           "--loss-plot", str(work / "cli" / "loss.png"), "--no-progress"]
    return {"original": [sys.executable, "-m", "aimonk.benchmark.original", "--data", str(data), "--epochs",
                         str(epochs), "--image-size", str(image_size), "--out", str(work / "original.pth")],
            "cli cold": cli, "cli warm": cli}


def run_side(command: list[str], env: dict) -> float:
    """Wall seconds of one process from start to exit; a failure stops the benchmark with its output."""
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return seconds


def run(data_dir: str, recipe: str = "original", epochs: int = 8, limit: int = 320, rounds: int = 1,
        image_size: int | None = None, log=print) -> dict:
    """Every side of every round in turns; ``{"seconds": {side: [per round]}, "median", "ratios", ...}``.

    ``image_size`` (both sides; default: the recipe's) is for smoke runs.
    """
    cfg = recipe_config(recipe, epochs=epochs, **({"image_size": image_size} if image_size else {}))
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    epochs_seconds: dict[str, list[float]] = {side: [] for side in SIDES[1:]}  # the CLI's training epochs alone
    with tempfile.TemporaryDirectory(prefix="aimonk-endtoend-") as tmp:
        work = Path(tmp)
        n_images = subset_folder(data_dir, limit, work / "data")
        cmds = commands(work / "data", work, recipe, epochs, cfg.image_size)
        for r in range(rounds):
            env = {**os.environ, "AIMONK_CACHE_DIR": str(work / f"cache{r}")}  # empty at the round's cold run
            for side in SIDES:
                seconds[side].append(run_side(cmds[side], env))
                if side in epochs_seconds:
                    epochs_seconds[side].append(sum(load_checkpoint(work / "cli" / "model.pth")[1].history["epoch_seconds"]))
                log(f"round {r + 1}/{rounds}: {side} {seconds[side][-1]:.1f} s")
        cli_train_images = len(load_split(work / "cli" / config.SPLIT_NAME)["train"])  # the split the CLI wrote
    median = {side: statistics.median(t) for side, t in seconds.items()}
    epochs_median = {side: statistics.median(t) for side, t in epochs_seconds.items()}
    return {"data": str(data_dir), "recipe": recipe, "epochs": epochs, "n_images": n_images,
            "cli_train_images": cli_train_images, "cli_val_fraction": cfg.val_fraction,
            "backbone": cfg.backbone, "image_size": cfg.image_size, "rounds": rounds, "seconds": seconds,
            "median": median, "ratios": {side: median["original"] / median[side] for side in SIDES[1:]},
            "epochs_seconds": epochs_seconds, "epochs_median": epochs_median,
            "ceiling": {side: median["original"] / t for side, t in epochs_median.items()},
            "commands": {side: " ".join(c[1:]) for side, c in cmds.items()}}


def format_report(res: dict) -> str:
    lines = [f"{res['n_images']} images of {res['data']}, {res['epochs']} epochs, recipe {res['recipe']} "
             f"({res['backbone']}, {res['image_size']} px); median of {res['rounds']} round(s), in turns:"]
    for side in SIDES:
        ratio = f"  {res['ratios'][side]:.2f}x faster than the seed's script" if side in res["ratios"] else ""
        lines.append(f"  {side:9s} {res['median'][side]:7.1f} s{ratio}")
    for side, t in res["epochs_median"].items():
        lines.append(f"  {side}: its epochs alone {t:.1f} s, so at most {res['ceiling'][side]:.2f}x if nothing else cost time")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aimonk.benchmark endtoend", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with labels.txt and images/")
    p.add_argument("--recipe", default="original", help="the CLI's recipe (original: ResNet18, as the seed's script)")
    p.add_argument("--epochs", type=int, default=8, help="epochs, both sides")
    p.add_argument("--limit", type=int, default=320, help="labelled images, evenly spaced (0 = all)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the three runs; medians over rounds")
    p.add_argument("--image-size", type=int, default=None, help="both sides' image size (default: the recipe's; smoke runs)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    info = run_info("endtoend", argv)
    res = run(a.data, a.recipe, a.epochs, a.limit, a.rounds, a.image_size)
    print(format_report(res))
    if a.json:
        atomic_write_text(a.json, json.dumps({"benchmark": "endtoend", "run": info, **res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
