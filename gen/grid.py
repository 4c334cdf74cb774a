"""Sample grids: one PNG per class (at most ``MAX_CLASSES``, the rarest), real train exemplars (top row)
above synthetic samples."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tailforge.data import RunDir, atomic_path, load_images, read_manifest

MAX_CLASSES = 48  # grids per generator, at most (the rarest classes)


def tile(images: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
    """uint8 N x H x W x C -> one grid image, ``cols`` wide, white padding."""
    n, h, w, c = images.shape
    rows = max(1, -(-n // cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    return out


def write_sample_grids(run: RunDir, generator: str = "ddpm", per_class: int = 24, cols: int = 8,
                       scale: int | None = None, max_classes: int | None = MAX_CLASSES) -> list[Path]:
    """Write ``synthetic/<gen>/grids/c<label>-<name>.png`` for every class with image candidates; past
    ``max_classes`` classes, for the ``max_classes`` with the fewest real train images (the tail, where
    synthetic images matter). Feature candidates have no picture: nothing is written."""
    from PIL import Image

    from tailforge.data.manifest import is_feature

    info = run.dataset_info()
    ch, size = int(info["channels"]), tuple(info["image_size"])
    scale = scale or max(1, 64 // max(size))
    real = read_manifest(run.require(run.real, "measure"))
    real = real[(real["split"] == "train") & (real["source"] == "real")]
    cand = read_manifest(run.require(run.candidates, "generate"))
    cand = cand[(cand["generator"] == generator)]
    cand = cand[~is_feature(cand)]
    have = real.groupby("label").size()
    labels = sorted(set(cand["label"].astype(int)))
    if max_classes is not None and len(labels) > max_classes:
        labels = sorted(sorted(labels, key=lambda c: (int(have.get(c, 0)), c))[:max_classes])
    real_uris = real.groupby("label")["uri"]
    out_dir = run.synthetic(generator) / "grids"
    paths = []
    for label, rows in cand[cand["label"].isin(labels)].groupby("label"):
        syn = load_images(rows["uri"].head(per_class), run.root, ch, size)
        ex_uris = real_uris.get_group(label).head(cols) if label in have.index else []
        ex = load_images(ex_uris, run.root, ch, size) if len(ex_uris) else syn[:0]
        blank = np.full((cols - len(ex), *syn.shape[1:]), 255, dtype=np.uint8)
        grid = tile(np.concatenate([ex, blank, syn]), cols, pad=1)
        im = Image.fromarray(grid[..., 0] if ch == 1 else grid)
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
        name = str(rows["class_name"].iloc[0]).replace("/", "_").replace(" ", "_")[:40]
        path = out_dir / f"c{int(label):04d}-{name}.png"
        with atomic_path(path) as tmp:
            im.save(tmp)
        paths.append(path)
    return paths
