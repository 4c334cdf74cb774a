"""A 28 x 28 grey 10-class image folder nobody tuned on: lowercase letters rendered offline.

Each image is one of ten look-alike lowercase letters (a c e n o r s u v x) drawn in a random font of the
machine's TrueType fonts (DejaVu and matplotlib's STIX/Computer Modern), at a random size, stroke
weight, rotation, shear and position, then blurred and given sensor noise, white on black like MNIST.
Used as a held-out check of settings chosen on Fashion-MNIST and digits:

    python bench/make_font_folder.py /tmp/letters --per-class 1300
    tailforge run --config flows/recipes/small-images.yaml --run runs/letters-s0 \\
        --set data.dataset=imagefolder --set data.root=/tmp/letters --set data.imbalance=50 \\
        --set data.image_size=28 --set data.seed=0 --set train.seed=0 --set generate.seed=0

Seeded: the same arguments write the same bytes. Writes <out>/<letter>/<index>.png.
"""
from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LETTERS = "acenorsuvx"


def fonts() -> list[str]:
    import matplotlib

    found = glob.glob("/usr/share/fonts/truetype/**/*.ttf", recursive=True)
    found += glob.glob(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/fonts/ttf/*.ttf"))
    keep = []
    for f in sorted(set(found)):
        name = os.path.basename(f)
        if any(s in name for s in ("Siz", "Math", "cmex", "cmsy", "cmmi", "LastResort", "Display", "NonUni")):
            continue  # symbol-only fonts: no plain Latin letters
        keep.append(f)
    return keep


def render(letter: str, font: str, rng: np.random.Generator) -> np.ndarray:
    big = 112
    im = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(im)
    f = ImageFont.truetype(font, int(rng.integers(56, 84)))
    stroke = int(rng.integers(0, 4))
    x0, y0, x1, y1 = d.textbbox((0, 0), letter, font=f, stroke_width=stroke)
    pos = ((big - (x1 - x0)) / 2 - x0 + rng.normal(0, 5), (big - (y1 - y0)) / 2 - y0 + rng.normal(0, 5))
    d.text(pos, letter, fill=255, font=f, stroke_width=stroke, stroke_fill=255)
    shear = rng.normal(0, 0.15)
    im = im.transform((big, big), Image.Transform.AFFINE, (1, shear, -shear * big / 2, 0, 1, 0),
                      resample=Image.Resampling.BILINEAR)
    im = im.rotate(float(rng.normal(0, 12)), resample=Image.Resampling.BILINEAR)
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
    im = im.resize((28, 28), Image.Resampling.LANCZOS)
    a = np.asarray(im, np.float32) * rng.uniform(0.7, 1.0) + rng.normal(0, 8, (28, 28))
    return np.clip(a, 0, 255).astype(np.uint8)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=1300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--letters", default=LETTERS, help="the classes, one letter each (default: ten look-alikes; "
                    "abcdefghijklmnopqrstuvwxyz for a 26-class folder)")
    a = ap.parse_args(argv)
    fs = fonts()
    if not fs:
        raise SystemExit("no TrueType fonts found: apt-get install fonts-dejavu-core (or pip install matplotlib)")
    out = Path(a.out)
    if len(set(a.letters)) != len(a.letters) or not a.letters.isalpha():
        raise SystemExit(f"--letters {a.letters!r}: give distinct letters, e.g. abcdefghijklmnopqrstuvwxyz")
    for c, letter in enumerate(a.letters):
        rng = np.random.default_rng([a.seed, c])
        d = out / letter
        d.mkdir(parents=True, exist_ok=True)
        for i in range(a.per_class):
            Image.fromarray(render(letter, fs[int(rng.integers(len(fs)))], rng)).save(d / f"{i:05d}.png")
    print(f"{len(a.letters)} classes x {a.per_class} images from {len(fs)} fonts -> {out}")


if __name__ == "__main__":
    main()
