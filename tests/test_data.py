"""The data stage: datasets, long-tail construction, splits, manifests, measure, bad input."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_image_tree
from tailforge.data import (ClassStats, DataConfig, MeasureConfig, RunDir, TailforgeError, build_manifest, load_images,
                  lt_counts, measure, measure_run, read_manifest, stratified_split)
from tailforge.data.measure import assign_groups, gini
from tailforge.flows.cli import main


# ----------------------------------------------------------------------------- long-tail profile
def test_cifar10_if100_counts_match_cao_et_al():
    counts = lt_counts(5000, 10, 100, "exp")
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406


def test_cifar100_if100_profile_ends():
    counts = lt_counts(500, 100, 100, "exp")
    assert counts[0] == 500 and counts[-1] == 5
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(counts) == 10847  # the CIFAR-100-LT (IF=100) size reported in the LDAM paper


def test_step_profile():
    assert lt_counts(100, 4, 10, "step") == [100, 100, 10, 10]


def test_imbalance_below_one_rejected():
    with pytest.raises(ValueError, match=">= 1"):
        DataConfig(imbalance=0.5)


# ----------------------------------------------------------------------------- digits (embedded default)
def test_digits_manifest_long_tailed_and_stratified(digits_run):
    df = read_manifest(digits_run.real)
    train = df[df.split == "train"]
    counts = np.bincount(train.label, minlength=10)
    assert counts.tolist() == lt_counts(int(counts.max()), 10, 10, "exp")
    # val and test keep the (near-balanced) class distribution of the full dataset
    for split in ("val", "test"):
        c = np.bincount(df[df.split == split].label, minlength=10)
        assert c.min() >= 25 and c.max() <= 28
    # splits are disjoint
    ids = [set(df.loc[df.split == s, "uri"]) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert (df.source == "real").all()


def test_digits_images_load_as_uint8(digits_run):
    df = read_manifest(digits_run.real).head(5)
    imgs = load_images(df.uri, digits_run.root, channels=1, size=(8, 8))
    assert imgs.shape == (5, 8, 8, 1) and imgs.dtype == np.uint8
    assert imgs.max() > 200  # 0..16 scaled to 0..255
    rgb = load_images(df.uri, digits_run.root, channels=3, size=(16, 16))
    assert rgb.shape == (5, 16, 16, 3)


def test_same_seed_identical_manifest_other_seed_differs(tmp_path, digits_run):
    a = build_manifest(DataConfig(dataset="digits", imbalance=10, seed=0), RunDir(tmp_path / "a"))
    b = read_manifest(digits_run.real)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    c = build_manifest(DataConfig(dataset="digits", imbalance=10, seed=1), RunDir(tmp_path / "c"))
    assert set(c.sample_id[c.split == "train"]) != set(a.sample_id[a.split == "train"])


def test_random_class_order_moves_the_head(tmp_path):
    df = build_manifest(DataConfig(dataset="digits", imbalance=10, class_order="random", seed=3),
                        RunDir(tmp_path / "r"))
    counts = np.bincount(df[df.split == "train"].label, minlength=10)
    assert sorted(counts.tolist(), reverse=True) == lt_counts(int(counts.max()), 10, 10)
    assert np.argmax(counts) != 0 or np.argmin(counts) != 9


def test_stratified_split_fractions():
    labels = np.repeat(np.arange(4), [100, 40, 20, 3])
    tr, va, te = stratified_split(labels, (0.7, 0.15, 0.15), seed=0)
    assert len(tr) + len(va) + len(te) == len(labels)
    assert np.bincount(labels[va]).tolist() == [15, 6, 3, 1]
    assert np.bincount(labels[te]).tolist() == [15, 6, 3, 1]
    tr2, _, _ = stratified_split(labels, (0.7, 0.15, 0.15), seed=0)
    assert np.array_equal(tr, tr2)


# ----------------------------------------------------------------------------- Fashion-MNIST (Debian files)
def test_fashion_mnist_lt_from_debian_package(fashion_available, tmp_path):
    run = RunDir(tmp_path / "fm")
    df = build_manifest(DataConfig(dataset="fashion-mnist", imbalance=100), run)
    train = np.bincount(df[df.split == "train"].label, minlength=10)
    assert train.tolist() == lt_counts(6000, 10, 100)
    assert train.tolist()[-1] == 60
    # val/test: the official balanced test set, split in halves, still balanced and disjoint
    assert np.bincount(df[df.split == "val"].label).tolist() == [500] * 10
    assert np.bincount(df[df.split == "test"].label).tolist() == [500] * 10
    assert not set(df.uri[df.split == "val"]) & set(df.uri[df.split == "test"])
    stats = measure_run(run)
    assert stats.imbalance_factor == pytest.approx(100.0)
    assert stats.group_rule == "absolute" and stats.group_sizes == {"many": 8, "medium": 2, "few": 0}
    img = load_images(df.uri[:3], run.root, 1, (28, 28))
    assert img.shape == (3, 28, 28, 1)
    assert (run.root / "counts.png").stat().st_size > 5000


# ----------------------------------------------------------------------------- CIFAR (torchvision format)
def _fake_cifar10(root: Path, per_class: int) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names}, fh)
    for f, n in [(f"data_batch_{i}", per_class // 5) for i in range(1, 6)] + [("test_batch", 10)]:
        labels = np.repeat(np.arange(10), n).tolist()
        data = rng.integers(0, 255, size=(len(labels), 3072), dtype=np.uint8)
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
    return root


def test_cifar10_loader_and_lt(tmp_path):
    root = _fake_cifar10(tmp_path / "cifar", per_class=100)
    run = RunDir(tmp_path / "run")
    df = build_manifest(DataConfig(dataset="cifar10", root=root, imbalance=10), run)
    train = np.bincount(df[df.split == "train"].label, minlength=10)
    assert train.tolist() == lt_counts(100, 10, 10)
    assert np.bincount(df[df.split == "test"].label).tolist() == [5] * 10
    img = load_images(df.uri[:2], run.root, 3, (32, 32))
    assert img.shape == (2, 32, 32, 3)


# ----------------------------------------------------------------------------- image folders
def test_imagefolder_split_and_corrupt_file(tmp_path):
    root = make_image_tree(tmp_path / "caltech", {"accordion": 40, "bonsai": 20, "cup": 12})
    bad = root / "bonsai" / "9999.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(TailforgeError, match="9999.jpg"):
        build_manifest(DataConfig(dataset="imagefolder", root=root, profile="none"), RunDir(tmp_path / "r1"))
    assert not (tmp_path / "r1").exists()  # nothing written
    run = RunDir(tmp_path / "r2")
    df = build_manifest(DataConfig(dataset="imagefolder", root=root, profile="none", skip_bad=True), run)
    assert "9999.jpg" in (run.root / "skipped.txt").read_text()
    assert len(df) == 72 and not df.uri.str.contains("9999").any()
    by = df.groupby(["class_name", "split"]).size().unstack()
    assert by.loc["accordion"].tolist() == [6, 28, 6]  # test, train, val (70/15/15 of 40)
    assert bad.exists()  # real data untouched
    img = load_images(df.uri[:2], run.root, 3, (64, 64))
    assert img.shape == (2, 64, 64, 3)


def test_imagefolder_channels_follow_the_images(tmp_path):
    from PIL import Image

    from tailforge.data.datasets import load_dataset

    root = tmp_path / "grey"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / c / f"{i}.png")
    assert load_dataset(DataConfig(dataset="imagefolder", root=root)).channels == 1  # MNIST-like: one channel
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "b" / "rgb.png")
    assert load_dataset(DataConfig(dataset="imagefolder", root=root)).channels == 3  # any colour image: RGB


def test_mini_imagenet_layout(tmp_path):
    root = tmp_path / "mini"
    for split, n in (("train", 30), ("val", 4), ("test", 5)):
        make_image_tree(root / split, {"n01": n, "n02": n, "n03": n}, seed=len(split))
    df = build_manifest(DataConfig(dataset="mini-imagenet", root=root, imbalance=10), RunDir(tmp_path / "r"))
    assert np.bincount(df[df.split == "train"].label).tolist() == lt_counts(30, 3, 10)
    assert np.bincount(df[df.split == "test"].label).tolist() == [5, 5, 5]


# ----------------------------------------------------------------------------- measure
def test_groups_absolute_and_relative():
    groups, rule, _ = assign_groups([500, 150, 100, 20, 19, 3], MeasureConfig())
    assert rule == "absolute" and groups == ["many", "many", "medium", "medium", "few", "few"]
    groups, rule, thr = assign_groups([90, 40, 20, 9, 4], MeasureConfig())
    assert rule == "relative"
    assert groups[0] == "many" and groups[-1] == "few" and "medium" in groups


def test_gini():
    assert gini([10, 10, 10]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 100]) == pytest.approx(0.75)


def test_measure_run_writes_counts(digits_run):
    stats = ClassStats.load(digits_run)
    df = read_manifest(digits_run.real)
    assert sum(stats.counts["train"]) == (df.split == "train").sum()
    assert stats.imbalance_factor == pytest.approx(stats.counts["train"][0] / stats.counts["train"][9])
    assert stats.groups[0] == "many" and stats.groups[9] == "few"
    again = measure(df, stats.class_names, dataset="digits")
    assert again.counts == stats.counts


# ----------------------------------------------------------------------------- CLI and bad input
def test_cli_measure_prints_table(tmp_path, capsys):
    assert main(["measure", "--run", str(tmp_path / "r"), "--imbalance", "5"]) == 0
    out = capsys.readouterr().out
    assert "imbalance factor 5" in out and "counts.json" in out


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "cifar1000"], "unknown dataset 'cifar1000'"),
    (["--dataset", "imagefolder", "--root", "/nonexistent/x"], "does not exist"),
    (["--dataset", "imagefolder"], "needs a root folder"),
    (["--imbalance", "0.5"], "imbalance"),
    (["--imbalance", "500"], "0 training images"),
    (["--dataset", "cifar10", "--root", "/tmp"], "CIFAR-10 not found"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, args, needle):
    run = tmp_path / "bad"
    assert main(["measure", "--run", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "fix:" in err
    assert "\n" not in err and "Traceback" not in err
    assert not (run / "real.parquet").exists()


def test_cli_folder_problems(tmp_path, capsys):
    root = make_image_tree(tmp_path / "ds", {"a": 5, "b": 5})
    (root / "empty").mkdir()
    assert main(["measure", "--run", str(tmp_path / "r"), "--dataset", "imagefolder", "--root", str(root),
                 "--profile", "none"]) == 2
    assert "holds no usable images" in capsys.readouterr().err
    (root / "empty").rmdir()
    (root / "a" / "notes.txt").write_text("hello")
    assert main(["measure", "--run", str(tmp_path / "r"), "--dataset", "imagefolder", "--root", str(root),
                 "--profile", "none"]) == 2
    assert "notes.txt is not an image file" in capsys.readouterr().err


def test_run_folder_of_another_dataset_is_refused(digits_run_copy, capsys):
    before = digits_run_copy.real.read_bytes()
    assert main(["measure", "--run", str(digits_run_copy.root), "--dataset", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert "already holds a manifest of dataset 'digits'" in err and "new --run" in err
    assert digits_run_copy.real.read_bytes() == before
    # the same settings are accepted and reuse the manifest
    assert main(["measure", "--run", str(digits_run_copy.root), "--imbalance", "10"]) == 0
    assert digits_run_copy.real.read_bytes() == before


def test_yaml_config_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  dataset: digits\n  imbalence: 10\n")
    assert main(["measure", "--run", str(tmp_path / "r"), "--config", str(cfg)]) == 2
    assert "did you mean 'imbalance'" in capsys.readouterr().err
    # a misspelt section is not silently ignored, and a section must be a mapping (not a traceback)
    for text, words in (("dta:\n  dataset: digits\n", ("unknown section 'dta'", "did you mean 'data'")),
                        ("data: 5\n", ("section 'data'", "must be a mapping"))):
        cfg.write_text(text)
        assert main(["measure", "--run", str(tmp_path / "r"), "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_atomic_outputs_get_the_mode_of_a_plain_write(tmp_path):
    """mkstemp/mkdtemp make 0600 files and 0700 folders: outputs must not be private to the writer."""
    import os
    import stat

    from tailforge.data.atomic import atomic_dir, write_json

    mask = os.umask(0o022)
    os.umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    out = write_json(tmp_path / "out.json", {"a": 1})
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask
    with atomic_dir(tmp_path / "shard") as d:
        (d / "f.png").write_bytes(b"1")
    (tmp_path / "plain_dir").mkdir()
    assert stat.S_IMODE((tmp_path / "shard").stat().st_mode) == stat.S_IMODE((tmp_path / "plain_dir").stat().st_mode)
    assert json.loads(out.read_text()) == {"a": 1} and not list(tmp_path.glob(".tmp-*"))


def test_run_folder_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a run")
    assert main(["measure", "--run", str(tmp_path / "afile"), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "run folder" in err and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "afile").read_text() == "not a run"
