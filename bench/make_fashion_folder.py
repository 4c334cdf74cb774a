"""A 28 x 28 grey 10-class image folder from real Fashion-MNIST (Debian's dataset-fashion-mnist IDX files).

Writes ``<out>/<class name>/<index>.png`` for ``--per-class`` images of each class drawn (seeded) from the
official train split, so ``data.dataset: imagefolder`` runs on a small real folder whose long tail tailforge
makes itself (the held-out command's setting):

    python bench/make_fashion_folder.py /tmp/ffold --per-class 1000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from tailforge.data import DataConfig, load_dataset


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    raw = load_dataset(DataConfig(dataset="fashion-mnist"))
    tr = raw.splits["train"]
    rng = np.random.default_rng(a.seed)
    for c, name in enumerate(raw.class_names):
        d = Path(a.out) / name.replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        idx = np.sort(rng.choice(np.flatnonzero(tr.labels == c), a.per_class, replace=False))
        for k, i in enumerate(idx):
            Image.fromarray(tr.images[i][..., 0]).save(d / f"{k:05d}.png")
    print(f"wrote {a.per_class} images x {len(raw.class_names)} classes to {a.out}")


if __name__ == "__main__":
    main()
