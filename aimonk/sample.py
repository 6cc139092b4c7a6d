"""Generate the embedded sample dataset in ``data/sample/`` (seed format: images/ + labels.txt).

Four visual attributes a CNN can learn, with label statistics like the real data:

* Attr1 (common, ~85 %): the main shape is blue.
* Attr2 (common, ~75 %): the background is light.
* Attr3 (balanced, ~50 %): the image has horizontal stripes.
* Attr4 (rare, ~8 %): a small red square sits in a corner.

About 9 % of labels per attribute are NA, greyscale images get NA for the colour attribute,
a few files are PNG (RGBA, palette) or greyscale JPEG, one labelled image is missing, one image
is unlisted, and one byte-identical pair carries conflicting labels: the mess 01_explore reports.

Run ``python -m aimonk.sample`` to rebuild it; the output is deterministic.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from aimonk import config
from aimonk.files import atomic_write_text

RATES = (0.85, 0.75, 0.5, 0.08)
NA_RATE = 0.09


def _draw(rng: np.random.Generator, labels: np.ndarray, size: int) -> Image.Image:
    blue, light, stripes, red_square = (bool(v) for v in labels)
    bg = rng.integers(185, 245, 3) if light else rng.integers(15, 80, 3)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(img)
    if stripes:
        step = int(rng.integers(8, 14))
        shade = tuple(int(v) for v in (bg * 0.55 if light else np.minimum(bg + 90, 255)))
        for y in range(int(rng.integers(0, step)), size, step):
            d.rectangle([0, y, size, y + step // 3], fill=shade)
    if blue:
        color = (int(rng.integers(0, 60)), int(rng.integers(40, 120)), int(rng.integers(190, 256)))
    else:
        color = tuple(int(v) for v in rng.choice([[230, 190, 30], [40, 170, 60], [150, 80, 40], [200, 90, 200]]))
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r + 4, size - r - 4, 2))
    if rng.random() < 0.5:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
    if red_square:
        s = size // 6
        x0, y0 = [(2, 2), (size - s - 2, 2), (2, size - s - 2), (size - s - 2, size - s - 2)][int(rng.integers(4))]
        d.rectangle([x0, y0, x0 + s, y0 + s], fill=(225, 20, 20))
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def generate(out_dir: str | Path = config.SAMPLE_DIR, n: int = 200, size: int = 128, seed: int = 0) -> Path:
    """Write ``n`` images and ``labels.txt`` to ``out_dir`` (replacing what is there).

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    (out / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, 4)) < np.asarray(RATES)).astype(int)
    truth[:4, 3] = 1  # the rare attribute always has a few positives
    labels = truth.astype(object)
    labels[rng.random((n, 4)) < NA_RATE] = "NA"
    lines = []
    for i in range(n):
        name = f"image_{i}.jpg"
        img = _draw(rng, truth[i], size)
        path = out / "images" / name
        if i % 40 == 7:  # greyscale: the colour attribute cannot be seen
            img.convert("L").save(path, "JPEG", quality=88)
            labels[i, 0] = "NA"
        elif i % 40 == 19:  # an RGBA PNG with a .jpg name, as in the real data
            rgba = img.convert("RGBA")
            rgba.putalpha(255)
            rgba.save(path, "PNG")
        elif i % 40 == 29:  # a palette image
            img.convert("P", palette=Image.ADAPTIVE, colors=64).save(path, "PNG")
        else:
            img.save(path, "JPEG", quality=88)
        lines.append(" ".join([name, *map(str, labels[i])]))
    # A byte-identical duplicate whose labels conflict with the original's.
    shutil.copyfile(out / "images" / "image_1.jpg", out / "images" / f"image_{n}.jpg")
    dup = ["NA" if v == "NA" else str(1 - int(v)) for v in labels[1]]
    lines.append(" ".join([f"image_{n}.jpg", *dup]))
    # A labelled image that does not exist, and an image no row mentions.
    lines.append(f"image_{n + 1}.jpg 1 0 NA 0")
    _draw(rng, np.array([1, 1, 0, 0]), size).save(out / "images" / "unlisted_0.jpg", "JPEG", quality=88)
    atomic_write_text(out / "labels.txt", "\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(config.SAMPLE_DIR), help="output folder")
    parser.add_argument("-n", type=int, default=200, help="number of images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    a = parser.parse_args()
    print(generate(a.out, a.n, a.size, a.seed))


if __name__ == "__main__":
    main()
