"""tailforge export: the rebalanced dataset out (imagefolder, hf, webdataset), read back by torchvision, datasets and
webdataset, and measured again by tailforge itself; refusals, resume, feature-space samples.

The run: digits (IF 10) with `warp` images (or `featcov` features) generated, filtered with a 1-epoch tiny
classifier as embedder: real train + accepted synthetic rows, built by the product's own functions.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tailforge.data import DataConfig, RunDir, TailforgeError, build_manifest, measure_run, read_manifest
from tailforge.data.export import ExportConfig, export_rows, export_run
from tailforge.flows.cli import main

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_run(root: Path, generator: str) -> RunDir:
    from tailforge.eval.filter import FilterConfig, filter_candidates
    from tailforge.gen import GenerateConfig, PlanConfig, generate, plan_run
    from tailforge.train import TrainConfig, fit

    run = RunDir(root)
    build_manifest(DataConfig(dataset="digits", imbalance=10, seed=0), run)
    measure_run(run)
    plan_run(run, PlanConfig(target="fixed", count=40, overgen=1.5))
    fit(run, TrainConfig(model="tiny", width=8, epochs=1, batch_size=128, lr=0.05, hflip=False, device="cpu",
                         tensorboard=False), "baseline")
    extra = {"feature_model": "baseline"} if generator == "featcov" else {}
    generate(run, GenerateConfig(generator=generator, shard_size=64, seed=0, **extra))
    filter_candidates(run, FilterConfig())
    return run


@pytest.fixture(scope="module")
def warp_run(tmp_path_factory, one_torch_thread):
    return make_run(tmp_path_factory.mktemp("export") / "digits-warp", "warp")


def expected(run: RunDir) -> dict[str, collections.Counter]:
    """(split -> Counter of labels) the export must hold: real rows, plus accepted synthetic ones in train."""
    real = read_manifest(run.real)
    filt = read_manifest(run.filtered)
    out = {s: collections.Counter(real.loc[real["split"] == s, "label"].tolist()) for s in ("train", "val", "test")}
    out["train"].update(filt.loc[filt["accepted"], "label"].tolist())
    return out


def test_export_rows_are_what_the_rebalanced_arm_trains_on(warp_run):
    from tailforge.train import TrainConfig
    from tailforge.train.trainer import training_table

    rows = export_rows(warp_run, "filtered")
    table = training_table(warp_run, TrainConfig(synthetic="filtered"))
    train = rows[rows["split"] == "train"]
    assert set(train["sample_id"]) == set(table["sample_id"]) and len(train) == len(table)
    filt = read_manifest(warp_run.filtered)
    assert 0 < train["synthetic"].sum() == filt["accepted"].sum() < len(filt)  # rejected ones stay out
    real = read_manifest(warp_run.real)
    for s in ("val", "test"):  # val and test as measured, real only
        assert set(rows.loc[rows["split"] == s, "sample_id"]) == set(real.loc[real["split"] == s, "sample_id"])
    every = export_rows(warp_run, "candidates")  # the no-filter control: every candidate
    assert every["synthetic"].sum() == len(filt)


def test_imagefolder_export_reads_back_in_torchvision_and_tailforge(warp_run, tmp_path):
    import torchvision

    dest = tmp_path / "if"
    out = export_run(warp_run, ExportConfig(to=dest, format="imagefolder"))
    want = expected(warp_run)
    for split in ("train", "val", "test"):
        ds = torchvision.datasets.ImageFolder(str(dest / split))
        assert collections.Counter(ds.targets) == want[split], split
        assert ds.classes == [str(i) for i in range(10)]
    # synthetic images are hard links of the run's files; the digits arrays were written as PNGs
    filt = read_manifest(warp_run.filtered)
    acc = filt[filt["accepted"]].iloc[0]
    exported = dest / "train" / acc["class_name"] / f"{acc['sample_id']}.png"
    assert os.path.samefile(exported, warp_run.root / acc["uri"])
    assert out["linked"] == int(filt["accepted"].sum()) and out["encoded"] == sum(map(sum, (
        c.values() for c in want.values()))) - out["linked"]
    # provenance sidecar: which file is synthetic, and which generator and seed made it
    prov = pd.read_csv(dest / "provenance.csv")
    assert len(prov) == sum(sum(c.values()) for c in want.values())
    syn = prov[prov["synthetic"]]
    assert set(syn["generator"]) == {"warp"} and syn["seed"].notna().all() and syn["parent_id"].notna().all()
    assert (dest / syn["file"].iloc[0]).is_file() and prov.loc[~prov["synthetic"], "generator"].isna().all()
    # tailforge's own imagefolder keeps the train/val/test folders (profile none): real + accepted per class
    cfg = DataConfig(dataset="imagefolder", root=dest)
    assert cfg.profile == "none"
    run2 = RunDir(tmp_path / "measured")
    build_manifest(cfg, run2)
    stats = measure_run(run2)
    for split in ("train", "val", "test"):
        assert stats.counts[split] == [want[split][c] for c in range(10)]


def test_hf_export_reads_back_in_datasets_and_as_data_dataset_hf(warp_run, tmp_path):
    datasets = pytest.importorskip("datasets")

    dest = tmp_path / "hf"
    out = export_run(warp_run, ExportConfig(to=dest, format="hf", shard_size=250))
    assert len(out["shards"]["train"]) == 3  # 576 train samples in shards of 250
    want = expected(warp_run)
    files = {s: sorted(str(p) for p in (dest / "data").glob(f"{s}-*.parquet")) for s in ("train", "validation", "test")}
    dd = datasets.load_dataset("parquet", data_files=files)
    assert isinstance(dd["train"].features["image"], datasets.Image)
    assert dd["train"].features["label"].names == [str(i) for i in range(10)]
    for split, hf_split in (("train", "train"), ("val", "validation"), ("test", "test")):
        assert collections.Counter(dd[hf_split]["label"]) == want[split], split
    train = dd["train"]
    syn = [i for i, s in enumerate(train["synthetic"]) if s]
    assert len(syn) == sum(want["train"].values()) - sum(1 for s in train["source"] if s == "real")
    assert {train["generator"][i] for i in syn} == {"warp"} and all(train["seed"][i] is not None for i in syn)
    assert train[syn[0]]["image"].size == (8, 8)  # the PNG bytes, as the generator wrote them
    # the folder itself (README.md names each split's files, features/ stays out)
    assert {k: len(v) for k, v in datasets.load_dataset(str(dest)).items()} == {
        "train": len(train), "validation": sum(want["val"].values()), "test": sum(want["test"].values())}
    # measured again by tailforge (data.dataset: hf, read with pyarrow): real + accepted synthetic per class
    cfg = DataConfig(dataset="hf", root=dest)
    assert cfg.profile == "none"
    run2 = RunDir(tmp_path / "measured")
    build_manifest(cfg, run2)
    stats = measure_run(run2)
    for split in ("train", "val", "test"):
        assert stats.counts[split] == [want[split][c] for c in range(10)], split
    assert run2.dataset_info()["image_size"] == [8, 8] and run2.dataset_info()["channels"] == 1


def test_webdataset_export_reads_back_in_webdataset(warp_run, tmp_path):
    wds = pytest.importorskip("webdataset")

    dest = tmp_path / "wds"
    out = export_run(warp_run, ExportConfig(to=dest, format="webdataset", shard_size=200))
    want = expected(warp_run)
    for split in ("train", "val", "test"):
        urls = [str(dest / f) for f in out["shards"][split]]
        labels, sources = collections.Counter(), collections.Counter()
        for img, cls, meta in wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("png", "cls", "json"):
            labels[cls] += 1
            sources[meta["source"]] += 1
            assert meta["label"] == cls and img.size == (8, 8)
        assert labels == want[split], split
        if split == "train":
            assert sources["warp"] == int(read_manifest(warp_run.filtered)["accepted"].sum())


def test_existing_folder_is_refused_in_one_line_and_the_same_export_is_up_to_date(warp_run, tmp_path, capsys):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    args = ["export", "--run", str(warp_run.root), "--to", str(dest), "--format", "hf"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "exists and is not empty" in err and "--overwrite" in err
    assert (dest / "mine.txt").read_text() == "keep me" and not (tmp_path / ".taken.partial").exists()
    assert main(args + ["--overwrite"]) == 0  # replaced, atomically
    assert not (dest / "mine.txt").exists() and (dest / "export.json").is_file()
    capsys.readouterr()
    assert main(args) == 0  # the very same export: nothing to do, no refusal
    assert "nothing to do" in capsys.readouterr().out
    assert main(args[:-1] + ["webdataset"]) == 2  # another export into it: refused
    capsys.readouterr()
    # in a flow: refused before any work starts (not after the filter)
    assert main(["run", "--run", str(tmp_path / "other"), "--set", f"export.to={dest}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "export.overwrite=true" in err and not (tmp_path / "other").exists()
    # the run folder and the dataset are never a destination (overwrite would delete them)
    assert main(["export", "--run", str(warp_run.root), "--to", str(warp_run.root), "--overwrite"]) == 2
    assert "is or holds the run folder" in capsys.readouterr().err


def test_interrupted_export_resumes_without_redoing_finished_shards(warp_run, tmp_path, monkeypatch):
    from tailforge.data import export as ex

    dest = tmp_path / "resumed"
    cfg = ExportConfig(to=dest, format="webdataset", shard_size=100)
    real_member, calls = ex._tar_member, {"n": 0}

    def dying(tar, name, data):  # killed in the middle of the third shard
        calls["n"] += 1
        if calls["n"] > 2 * 3 * 100 + 30:
            raise KeyboardInterrupt
        real_member(tar, name, data)

    monkeypatch.setattr(ex, "_tar_member", dying)
    with pytest.raises(KeyboardInterrupt):
        export_run(warp_run, cfg)
    partial = tmp_path / ".resumed.partial"
    assert not dest.exists() and sorted(p.name for p in partial.glob("*.tar")) == ["train-000000.tar",
                                                                                   "train-000001.tar"]
    first = (partial / "train-000000.tar").stat()
    monkeypatch.setattr(ex, "_tar_member", real_member)
    out = export_run(warp_run, cfg)
    assert out["kept"] == 2 and out["written"] == len([f for fs in out["shards"].values() for f in fs]) - 2
    again = (dest / "train-000000.tar").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not written again
    assert not partial.exists()
    # an imagefolder export resumes at the class folder it was killed in
    cfg = ExportConfig(to=tmp_path / "if", format="imagefolder")
    real_place, placed = ex.place, {"n": 0}

    def counting_place(*args):
        placed["n"] += 1
        if placed.get("die") and placed["n"] > 300:
            raise KeyboardInterrupt
        return real_place(*args)

    monkeypatch.setattr(ex, "place", counting_place)
    placed["die"] = True
    with pytest.raises(KeyboardInterrupt):
        export_run(warp_run, cfg)
    placed.update(n=0, die=False)
    out = export_run(warp_run, cfg)
    total = sum(c["samples"] for c in out["counts"].values())
    assert 0 < out["kept"] <= 300 and placed["n"] == total - out["kept"]  # finished class folders are not redone
    assert out["linked"] + out["encoded"] == total - out["kept"]
    assert sum(1 for _ in (tmp_path / "if").rglob("*.png")) == total and not (tmp_path / "if" / ".done-groups").exists()


def test_feature_space_samples_go_to_a_features_file(tmp_path, one_torch_thread, capsys):
    run = make_run(tmp_path / "digits-featcov", "featcov")
    dest = tmp_path / "feat"
    assert main(["export", "--run", str(run.root), "--to", str(dest), "--format", "imagefolder"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "feature vectors" in ln]
    assert len(lines) == 1 and "features/synthetic.npy" in lines[0] and "not images" in lines[0]
    filt = read_manifest(run.filtered)
    n = int(filt["accepted"].sum())
    vecs = np.load(dest / "features" / "synthetic.npy")
    table = pd.read_parquet(dest / "features" / "synthetic.parquet")
    assert vecs.shape[0] == len(table) == n > 0 and vecs.dtype == np.float32
    assert set(table["source"]) == {"featcov"} and set(table["feature_model"]) == {"baseline"}
    # the vectors are the generator's rows, in the table's order
    from tailforge.train.trainer import featdict_vectors

    acc = filt[filt["accepted"]].set_index("sample_id").loc[table["sample_id"]]
    assert np.allclose(vecs, featdict_vectors(run, acc.reset_index()))
    # the images hold the real train split only
    real = read_manifest(run.real)
    n_train = sum(1 for _ in (dest / "train").rglob("*.png"))
    assert n_train == int((real["split"] == "train").sum())


def test_imagefolder_with_split_folders_keeps_its_splits(tmp_path):
    from conftest import make_image_tree

    root = tmp_path / "folder"
    sizes = {"train": {"cat": 30, "dog": 5}, "val": {"cat": 4, "dog": 4}, "test": {"cat": 6, "dog": 6}}
    for split, counts in sizes.items():
        make_image_tree(root / split, counts, seed=len(split))
    cfg = DataConfig(dataset="imagefolder", root=root)
    assert cfg.profile == "none"  # kept as it is unless asked
    run = RunDir(tmp_path / "run")
    build_manifest(cfg, run)
    stats = measure_run(run)
    assert stats.class_names == ["cat", "dog"]
    for split, counts in sizes.items():
        assert stats.counts[split] == [counts["cat"], counts["dog"]]
    assert DataConfig(dataset="imagefolder", root=root, profile="exp").profile == "exp"  # asked: made long-tailed
    flat = DataConfig(dataset="imagefolder", root=root / "train")  # a plain class tree: split 70/15/15 as before
    assert flat.profile == "exp"


def test_hub_id_without_local_copy_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tailforge.data import load_dataset

    with pytest.raises(TailforgeError, match=r"tailforge downloads nothing.*save_to_disk"):
        load_dataset(DataConfig(dataset="hf", root="someone/tail-dataset"))
    assert main(["measure", "--run", str(tmp_path / "r"), "--dataset", "hf", "--root", "someone/tail-dataset"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "load_dataset('someone/tail-dataset').save_to_disk('DIR')" in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(TailforgeError, match="image_column and data.label_column are read by the dataset hf"):
        from tailforge.flows.config import load_config

        load_config(None, {"data": {"image_column": "img"}})


def test_data_dataset_hf_reads_save_to_disk_and_named_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)

    def images(n, size):
        return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)]

    feats = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["ant", "bee", "cow"]),
                               "coarse": datasets.ClassLabel(names=["small", "big"])})
    splits = {"train": [0] * 12 + [1] * 5 + [2] * 3, "validation": [0, 1, 2] * 2, "test": [0, 1, 2] * 3}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"img": images(len(y), (10, 12)), "fine": y, "coarse": [int(v > 0) for v in y]}, features=feats)
        for s, y in splits.items()})
    dd.save_to_disk(str(tmp_path / "saved"))
    from tailforge.data import load_dataset

    with pytest.raises(TailforgeError, match=r"several ClassLabel columns \(fine, coarse\).*data.label_column"):
        load_dataset(DataConfig(dataset="hf", root=tmp_path / "saved"))
    raw = load_dataset(DataConfig(dataset="hf", root=tmp_path / "saved", label_column="fine"))
    assert raw.class_names == ["ant", "bee", "cow"] and raw.channels == 3 and raw.image_size == (10, 12)
    assert {s: np.bincount(r.labels).tolist() for s, r in raw.splits.items()} == {
        "train": [12, 5, 3], "val": [2, 2, 2], "test": [3, 3, 3]}
    assert raw.splits["train"].images.shape == (20, 10, 12, 3)
    with pytest.raises(TailforgeError, match=r"no column 'fien'.*did you mean 'fine'"):
        load_dataset(DataConfig(dataset="hf", root=tmp_path / "saved", label_column="fien"))
    # parquet shards without the library's metadata: string labels, images of two sizes (resized to image_size)
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    (tmp_path / "plain").mkdir()
    for split, n in (("train", 9), ("test", 6)):
        ims = images(n, (10, 12)) + images(n, (14, 14))
        pq.write_table(pa.table({"picture": [{"bytes": png(im), "path": None} for im in ims],
                                 "label": ["x", "y", "z"] * (2 * n // 3)}), tmp_path / "plain" / f"{split}.parquet")
    raw = load_dataset(DataConfig(dataset="hf", root=tmp_path / "plain", image_size=16))
    assert raw.class_names == ["x", "y", "z"] and set(raw.splits) == {"train", "test"}
    assert raw.splits["train"].images.shape == (18, 16, 16, 3)


@pytest.mark.slow
def test_round_trip_through_tailforge_run(tmp_path, monkeypatch):
    """`tailforge run` with warp (tiny budgets) exporting hf in the flow, then `tailforge run` on the export."""
    import yaml

    monkeypatch.chdir(tmp_path)
    tiny = ["--set", "train.epochs=2", "--set", "train.width=8", "--set", "recipe.epochs=2", "--set",
            "evaluate.plots=false", "--set", "compare.oracle=false", "--set", "compare.bootstrap=100"]
    assert main(["run", "--run", "runs/warp", "--set", "generate.generator=warp", "--set", "export.to=exp-hf",
                 "--set", "export.format=hf", *tiny]) == 0
    assert (tmp_path / "exp-hf" / "export.json").is_file()
    run = RunDir(tmp_path / "runs" / "warp")
    want = expected(run)
    assert main(["measure", "--run", "runs/measured", "--dataset", "hf", "--root", "exp-hf"]) == 0
    counts = yaml.safe_load((tmp_path / "runs" / "measured" / "counts.json").read_text())["counts"]
    assert counts["train"] == [want["train"][c] for c in range(10)]
    assert main(["run", "--run", "runs/on-export", "--set", "data.dataset=hf", "--set", "data.root=exp-hf",
                 "--set", "generate.generator=warp", *tiny]) == 0
    assert (tmp_path / "runs" / "on-export" / "eval" / "report.md").is_file()


def test_other_layouts_go_through_datasets_or_name_the_extra(tmp_path, monkeypatch):
    """An image folder with metadata.csv (no parquet, no save_to_disk): datasets.load_dataset, offline; without the
    library, one line naming the extra."""
    pytest.importorskip("datasets")
    import sys

    from PIL import Image

    from tailforge.data import load_dataset

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        (tmp_path / "ds" / split).mkdir(parents=True)
        lines = ["file_name,label"]
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "ds" / split / f"{i}.png")
            lines.append(f"{i}.png,{'abc'[i % 3]}")
        (tmp_path / "ds" / split / "metadata.csv").write_text("\n".join(lines) + "\n")
    raw = load_dataset(DataConfig(dataset="hf", root=tmp_path / "ds"))
    assert raw.class_names == ["a", "b", "c"] and set(raw.splits) == {"train", "test"}
    assert np.bincount(raw.splits["train"].labels).tolist() == [4, 4, 4]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(TailforgeError, match=r"needs the datasets library.*pip install 'tailforge\[hf\]'"):
        load_dataset(DataConfig(dataset="hf", root=tmp_path / "ds"))


def test_a_balanced_export_tops_up_nothing_and_the_filter_keeps_nothing(tmp_path):
    """A rebalanced export read back is balanced: the plan tops up no class, generation is skipped, and the filter
    writes an empty filtered.parquet (the flow's rebalanced arm then trains on the real data alone)."""
    from conftest import make_image_tree
    from tailforge.eval.filter import FilterConfig, filter_candidates
    from tailforge.gen import PlanConfig, plan_run
    from tailforge.train import TrainConfig
    from tailforge.train.trainer import training_table

    root = tmp_path / "balanced"
    for split, n in (("train", 12), ("val", 3), ("test", 3)):
        make_image_tree(root / split, {"a": n, "b": n}, seed=n)
    run = RunDir(tmp_path / "run")
    build_manifest(DataConfig(dataset="imagefolder", root=root), run)
    measure_run(run)
    assert plan_run(run, PlanConfig(target="balance")).total == 0
    out = filter_candidates(run, FilterConfig())
    assert len(out) == 0 and run.filtered.exists()
    assert len(training_table(run, TrainConfig(synthetic="filtered"))) == 24
