"""bench/make_font_folder.py: the offline held-out image folder is seeded, 28 x 28 grey, one folder per
class, and tailforge reads it as an image-folder dataset."""
import hashlib
import sys
from pathlib import Path

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import make_font_folder  # noqa: E402


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_font_folder_is_seeded_grey_28px_and_loads(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_font_folder.main([str(a), "--per-class", "4"])
    make_font_folder.main([str(b), "--per-class", "4"])
    make_font_folder.main([str(c), "--per-class", "4", "--seed", "1"])
    assert sorted(p.name for p in a.iterdir()) == sorted(make_font_folder.LETTERS)
    assert digest(a) == digest(b) != digest(c)
    ims = [Image.open(p) for p in sorted(a.rglob("*.png"))]
    assert len(ims) == 40 and {(im.mode, im.size) for im in ims} == {("L", (28, 28))}
    arr = np.stack([np.asarray(im, np.float32) for im in ims])
    # a white glyph on a dark background, not blank and not noise: the centre is brighter than the border
    assert arr[:, 8:20, 8:20].mean() > 3 * arr[:, :3, :].mean()
    # classes differ: the mean image of 'o' is not that of 'x'
    o = arr[[i for i, p in enumerate(sorted(a.rglob("*.png"))) if p.parent.name == "o"]].mean(0)
    x = arr[[i for i, p in enumerate(sorted(a.rglob("*.png"))) if p.parent.name == "x"]].mean(0)
    assert np.abs(o - x).mean() > 5

    from tailforge.data.config import DataConfig
    from tailforge.data.datasets import load_dataset

    ds = load_dataset(DataConfig(dataset="imagefolder", root=str(a)))
    assert ds.class_names == sorted(make_font_folder.LETTERS) and ds.channels == 1
