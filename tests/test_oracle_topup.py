"""bench/oracle_topup.py: the 'perfect generator' pool is exactly the raw images the long tail dropped."""
import sys
from pathlib import Path

import numpy as np

from conftest import make_image_tree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import oracle_topup  # noqa: E402

from tailforge.data import DataConfig, RunDir, build_manifest, load_dataset, read_manifest  # noqa: E402


def test_unused_pool_of_an_array_dataset_is_the_dropped_rows(digits_run):
    df = read_manifest(digits_run.real)
    images, labels, free = oracle_topup.unused_pool(digits_run, df, digits_run.dataset_info())
    raw = load_dataset(DataConfig(dataset="digits")).splits["all"]
    used = df["uri"].str.split("#").str[1].astype(int).to_numpy()
    assert len(set(used)) == len(df)                       # train, val and test rows, each once
    assert set(free).isdisjoint(used) and len(free) + len(df) == len(raw)
    # the index mapping is right: the manifest's labels are the raw labels of the rows it names
    assert (labels[used] == df["label"].to_numpy()).all()
    # the long tail dropped train rows of every class but the largest
    tr = np.bincount(df[df["split"] == "train"]["label"], minlength=10)
    pool = np.bincount(labels[free], minlength=10)
    assert pool[np.argmax(tr)] == 0 and (pool[tr < tr.max()] > 0).all()
    x = images(free[:5])
    assert x.dtype == np.uint8 and (x == raw.images[free[:5]][..., 0]).all()


def test_unused_pool_of_an_image_folder_is_the_files_in_no_split(tmp_path):
    root = make_image_tree(tmp_path / "tree", {"a": 40, "b": 40, "c": 40}, size=(12, 12))
    run = RunDir(tmp_path / "run")
    build_manifest(DataConfig(dataset="imagefolder", root=root, imbalance=8, image_size=12), run)
    df = read_manifest(run.real)
    images, labels, free = oracle_topup.unused_pool(run, df, run.dataset_info())
    files = sorted(str(p) for p in root.rglob("*.png"))
    assert len(free) + len(df) == len(files)
    names = run.dataset_info()["class_names"]
    tr = np.bincount(df[df["split"] == "train"]["label"], minlength=3)
    assert (np.bincount(labels[free], minlength=3) == tr.max() - tr).all()  # what the tail dropped
    assert images(free[:2]).shape[1:3] == (12, 12) and names == ["a", "b", "c"]
