"""The published split files (data/listfiles.py): ImageNet-LT-format list files and iNaturalist JSON that the
tests write, read exactly as the files say; bad files give one line naming the file and line; and
`tailforge run` goes end to end on both.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tailforge.data import DataConfig, RunDir, TailforgeError, build_manifest, load_dataset, read_json
from tailforge.flows.cli import main

CLASSES = ["tench", "goldfish", "white shark", "tiger shark", "hammerhead"]
TRAIN = [12, 7, 4, 2, 1]  # long-tailed, as ImageNet-LT's train list
VAL, TEST = 2, 3  # balanced, per class


def _png(path: Path, k: int, i: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(1000 * k + i)
    base = np.array([(k * 67) % 256, (k * 131) % 256, (k * 29) % 256], dtype=np.int16)
    arr = np.clip(base + rng.integers(-30, 30, size=(10, 12, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_lt_set(root: Path) -> dict[str, list[tuple[str, int]]]:
    """An ImageNet-LT-format set: ROOT/{train,val}/<wnid>/*.png, one list file per split, a names file.
    Val and test images both come from val/ (as ImageNet-LT's test list reads ImageNet's val folder)."""
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for k in range(len(CLASSES)):
        for i in range(TRAIN[k]):
            lists["train"].append((f"train/n{k:04d}/n{k:04d}_{i}.png", k))
        for i in range(VAL + TEST):
            lists["val" if i < VAL else "test"].append((f"val/n{k:04d}/v{k:04d}_{i}.png", k))
    for split, rows in lists.items():
        for i, (p, k) in enumerate(rows):
            _png(root / p, k, i)
        # shuffled, as the published files are (order must not matter)
        order = np.random.default_rng(len(split)).permutation(len(rows))
        (root / f"LT_{split}.txt").write_text("".join(f"{rows[j][0]} {rows[j][1]}\n" for j in order))
    (root / "names.txt").write_text("\n".join(CLASSES) + "\n")
    return lists


@pytest.fixture(scope="module")
def lt_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet-lt")
    return root, make_lt_set(root)


def cfg_for(root: Path, **kw) -> DataConfig:
    lists = kw.pop("lists", {"train": "LT_train.txt", "val": "LT_val.txt", "test": "LT_test.txt"})
    return DataConfig(dataset="listfile", root=root, lists=lists, names=kw.pop("names", "names.txt"), **kw)


def test_listfile_keeps_the_published_splits_labels_and_names(lt_root, tmp_path):
    root, lists = lt_root
    cfg = cfg_for(root)
    assert cfg.profile == "none"  # the lists are already long-tailed: nothing is dropped
    df = build_manifest(cfg, RunDir(tmp_path / "run"))
    for split, rows in lists.items():
        got = df[df["split"] == split]
        want = {(str((root / p).resolve()), k) for p, k in rows}
        assert set(zip(got["uri"], got["label"])) == want, split
        assert len(got) == len(rows)
    train = df[df["split"] == "train"]
    assert train["label"].value_counts().sort_index().tolist() == TRAIN
    assert dict(zip(df["label"], df["class_name"])) == dict(enumerate(CLASSES))
    info = read_json(tmp_path / "run" / "dataset.json")
    assert info["class_names"] == CLASSES and info["num_classes"] == 5 and info["channels"] == 3
    assert info["fingerprint"]["lists.train"]["sha256"]  # the list's content is part of the run's identity


def test_without_names_the_label_ids_name_the_classes(lt_root):
    root, _ = lt_root
    raw = load_dataset(cfg_for(root, names=None))
    assert raw.class_names == ["0", "1", "2", "3", "4"]
    assert np.bincount(raw.splits["train"].labels).tolist() == TRAIN


def test_without_a_val_list_val_is_held_out_of_test(lt_root, tmp_path):
    root, lists = lt_root
    df = build_manifest(cfg_for(root, lists={"train": str(root / "LT_train.txt"), "test": "LT_test.txt"}),
                        RunDir(tmp_path / "run"))  # an absolute list path works as well
    n = df["split"].value_counts()
    assert n["train"] == sum(TRAIN) and n["val"] + n["test"] == len(lists["test"])
    assert (df[df["split"] == "val"]["label"].value_counts() == 1).all()  # stratified: 1 of 3 per class
    test_files = {str((root / p).resolve()) for p, _ in lists["test"]}
    assert set(df[df["split"] != "train"]["uri"]) == test_files


def test_an_edited_list_is_a_new_dataset_for_the_run_folder(lt_root, tmp_path):
    root, _ = lt_root
    copy = tmp_path / "ds"
    copy.mkdir()
    for f in ("LT_train.txt", "LT_val.txt", "LT_test.txt", "names.txt"):
        (copy / f).write_text((root / f).read_text())
    for d in ("train", "val"):
        os.symlink(root / d, copy / d)
    run = RunDir(tmp_path / "run")
    build_manifest(cfg_for(copy), run)
    lines = (copy / "LT_train.txt").read_text().splitlines()
    (copy / "LT_train.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(TailforgeError, match=r"other settings \(lists.train\)"):
        build_manifest(cfg_for(copy), run)


def bad(root: Path, name: str, text: str) -> dict:
    (root / name).write_text(text)
    return {"train": name, "test": "LT_test.txt"}


@pytest.mark.parametrize("text, message", [
    ("train/n0000/n0000_0.png 0\ntrain/n0000/n0000_1.png\n", r"bad1.txt:2: expected `relative/path label`"),
    ("train/n0000/n0000_0.png 0\n\ntrain/n0000/n0000_1.png -1\n", r"bad1.txt:3: expected"),
    ("train/n0000/n0000_0.png 0\ntrain/n0000/n0000_1.png 7\n", r"bad1.txt:2: label 7 is out of range"),
    ("train/n0000/n0000_0.png 0\n../outside.png 1\n", r"bad1.txt:2: path '../outside.png' lies outside"),
    ("/etc/hostname.png 0\n", r"bad1.txt:1: path '/etc/hostname.png' lies outside"),
    ("train/n0000/n0000_0.png 0\ntrain/n0000/missing.png 1\n", r"bad1.txt:2: image .*missing.png does not exist"),
    ("train/n0000/n0000_0.png 0\ntrain/n0000/n0000_0.png 0\n", r"bad1.txt:2: .* listed a second time \(first at .*bad1.txt:1\)"),
    ("train/n0000/n0000_0.png 0\nval/n0001/v0001_3.png 1\n", r"LT_test.txt:\d+: .* listed a second time \(first at .*bad1.txt:2\)"),
])
def test_bad_lines_are_one_error_naming_file_and_line(lt_root, tmp_path, text, message):
    root, _ = lt_root
    cfg = cfg_for(root, lists=bad(root, "bad1.txt", text))
    with pytest.raises(TailforgeError, match=message) as err:
        build_manifest(cfg, RunDir(tmp_path / "run"))
    assert "\n" not in err.value.one_line()
    assert not (tmp_path / "run" / "real.parquet").exists()


def test_unknown_labels_missing_files_and_missing_lists_are_one_error(lt_root, tmp_path):
    root, _ = lt_root
    # a test label that train never shows (no names file: classes are 0..max label)
    lists = bad(root, "bad2.txt", "".join(f"train/n0000/n0000_{i}.png 0\n" for i in range(3)))
    with pytest.raises(TailforgeError, match=r"LT_test.txt:\d+: label [1-4] \('[1-4]'\) has no images in the train"):
        load_dataset(cfg_for(root, lists=lists, names=None))
    with pytest.raises(TailforgeError, match=r"test list .*nope.txt does not exist"):
        load_dataset(cfg_for(root, lists={"train": "LT_train.txt", "test": "nope.txt"}))
    with pytest.raises(TailforgeError, match=r"names file .*nope.txt does not exist"):
        load_dataset(cfg_for(root, names="nope.txt"))
    with pytest.raises(TailforgeError, match=r"needs a val or test file besides train"):
        load_dataset(cfg_for(root, lists={"train": "LT_train.txt"}))
    with pytest.raises(TailforgeError, match=r"needs data.lists"):
        load_dataset(DataConfig(dataset="listfile", root=root))
    two = bad(root, "bad3.txt", "train/n0000/n0000_0.png 0\ntrain/n0001/n0001_0.png 1\n")
    with pytest.raises(TailforgeError, match=r"LT_test.txt:\d+: label [2-4] \('(white|tiger|hammer)"):
        load_dataset(cfg_for(root, lists=two))
    with pytest.raises(TailforgeError, match=r"3 class\(es\) have no images in the train split .*bad3.txt: 2 "):
        bad(root, "bad3t.txt", "val/n0000/v0000_0.png 0\nval/n0001/v0001_0.png 1\n")
        load_dataset(cfg_for(root, lists={"train": "bad3.txt", "test": "bad3t.txt"}))  # 5 names, 2 with images


def test_skip_bad_leaves_missing_files_out_and_lists_them(lt_root, tmp_path):
    root, _ = lt_root
    text = (root / "LT_train.txt").read_text() + "train/n0000/gone.png 0\ntrain/n0000/notes.txt 0\n"
    cfg = cfg_for(root, lists=bad(root, "bad4.txt", text), skip_bad=True)
    df = build_manifest(cfg, RunDir(tmp_path / "run"))
    assert (df["split"] == "train").sum() == sum(TRAIN)
    skipped = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 2 and "gone.png" in skipped[0] and "bad4.txt:" in skipped[0] and "notes.txt" in skipped[1]


def test_loading_a_list_opens_no_image(tmp_path, monkeypatch):
    """One stat per listed file and no decoding: the files here are empty, and Pillow's open is a trap.
    (The time for ImageNet-LT's 115,846 and iNaturalist 2018's 437,513 lines: bench/listfile_load.py.)"""
    import PIL.Image

    root = tmp_path / "big"
    n, classes = 3000, 100
    labels = np.minimum(np.random.default_rng(0).geometric(0.03, n) - 1, classes - 1)
    labels[:2 * classes] = np.tile(np.arange(classes), 2)  # one test image per class, every class in train
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
    paths = [f"c{k}/{i}.JPEG" for i, k in enumerate(labels)]
    for p in paths:
        (root / p).touch()
    (root / "train.txt").write_text("".join(f"{p} {k}\n" for p, k in zip(paths[classes:], labels[classes:])))
    (root / "test.txt").write_text("".join(f"{p} {k}\n" for p, k in zip(paths[:classes], labels[:classes])))
    opened = []
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a) or 1 / 0)
    cfg = DataConfig(dataset="listfile", root=root, lists={"train": "train.txt", "test": "test.txt"})
    df = build_manifest(cfg, RunDir(tmp_path / "run"))
    assert opened == []
    assert len(df) == n and (df["split"] == "train").sum() == n - classes and df["label"].max() == classes - 1


# --------------------------------------------------------------------------- iNaturalist

INAT_CATS = [(3, "Aves: Turdus"), (10, "Plantae: Quercus"), (7, "Insecta: Apis")]  # ids not contiguous, unsorted


def make_inat(root: Path) -> dict[str, list[tuple[str, int]]]:
    """iNaturalist-2018-style JSON: file_name under train_val2018/<super>/<cat>/, train long-tailed."""
    per = {"train": {3: 9, 10: 4, 7: 2}, "val": {3: 3, 10: 3, 7: 3}}
    want: dict[str, list[tuple[str, int]]] = {}
    img_id = 100
    for split, counts in per.items():
        images, anns, want[split] = [], [], []
        for cid, name in INAT_CATS:
            for i in range(counts[cid]):
                fn = f"train_val2018/{name.split(':')[0]}/{cid}/{split}{i}.jpg"
                _png(root / fn, cid, i)
                images.append({"id": img_id, "file_name": fn, "width": 12, "height": 10})
                anns.append({"id": img_id + 5000, "image_id": img_id, "category_id": cid})
                want[split].append((fn, cid))
                img_id += 1
        cats = [{"id": c, "name": n, "supercategory": n.split(":")[0]} for c, n in INAT_CATS]
        (root / f"{split}2018.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                            "categories": cats, "info": {}, "licenses": []}))
    return want


def test_inaturalist_maps_sorted_category_ids_to_labels_and_splits_val_into_val_and_test(tmp_path):
    root = tmp_path / "inat"
    want = make_inat(root)
    cfg = DataConfig(dataset="inaturalist", root=root, lists={"train": "train2018.json", "val": "val2018.json"})
    assert cfg.profile == "none"
    df = build_manifest(cfg, RunDir(tmp_path / "run"))
    label_of = {3: 0, 7: 1, 10: 2}  # sorted ids
    info = read_json(tmp_path / "run" / "dataset.json")
    assert info["class_names"] == ["Aves: Turdus", "Insecta: Apis", "Plantae: Quercus"]
    train = df[df["split"] == "train"]
    assert set(zip(train["uri"], train["label"])) == {(str((root / f).resolve()), label_of[c]) for f, c in want["train"]}
    assert train["label"].value_counts().to_dict() == {0: 9, 2: 4, 1: 2}
    # no public test labels: the val file is split (stratified, val_from_test=0.5) into val and test
    held = df[df["split"] != "train"]
    assert set(zip(held["uri"], held["label"])) == {(str((root / f).resolve()), label_of[c]) for f, c in want["val"]}
    assert df[df["split"] == "val"]["label"].value_counts().to_dict() == {0: 1, 1: 1, 2: 1}
    assert df[df["split"] == "test"]["label"].value_counts().to_dict() == {0: 2, 1: 2, 2: 2}
    assert held["sample_id"].str.startswith("inaturalist-val-").all()


def test_bad_inaturalist_json_is_one_error_naming_the_entry(tmp_path):
    root = tmp_path / "inat"
    make_inat(root)
    val = json.loads((root / "val2018.json").read_text())
    cfg = DataConfig(dataset="inaturalist", root=root, lists={"train": "train2018.json", "val": "bad.json"})

    def fails(data, message):
        (root / "bad.json").write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(TailforgeError, match=message):
            load_dataset(cfg)

    fails("{not json", r"bad.json is not valid JSON")
    fails({**val, "annotations": []}, r"bad.json has no annotations .*test JSON has no labels")
    fails({k: v for k, v in val.items() if k != "annotations"}, r"bad.json has no `annotations` list")
    anns = [dict(a) for a in val["annotations"]]
    anns[4]["category_id"] = 99
    fails({**val, "annotations": anns}, r"bad.json: annotations\[4\] names category_id 99, which is not in")
    cats = val["categories"] + [{"id": 99, "name": "Fungi: Amanita"}]
    fails({**val, "annotations": anns, "categories": cats}, r"bad.json: annotations\[4\]: category_id 99 has no "
          r"images in the train split")
    anns = [dict(a) for a in val["annotations"]]
    anns[2]["image_id"] = 1
    fails({**val, "annotations": anns}, r"bad.json: annotations\[2\] names image_id 1, which is not in `images`")
    images = [dict(i) for i in val["images"]]
    images[0]["file_name"] = "../../etc/passwd.jpg"
    fails({**val, "images": images}, r"bad.json: annotations\[0\]: path '../../etc/passwd.jpg' lies outside")
    images[0]["file_name"] = "train_val2018/Aves/3/nope.jpg"
    fails({**val, "images": images}, r"bad.json: annotations\[0\]: image .*nope.jpg does not exist")


# --------------------------------------------------------------------------- end to end and the CLI

TINY_RUN = ["--config", str(Path(__file__).resolve().parents[1] / "flows" / "recipes" / "small-images.yaml"),
            "--set", "train.epochs=1", "--set", "recipe.epochs=1", "--set", "data.image_size=8",
            "--set", "train.width=4", "--set", "evaluate.plots=false"]


@pytest.fixture(scope="module")
def harness():
    """One temporary Prefect server for the module's `tailforge run` calls (as tests/test_flows.py)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from tailforge.flows import prefect_env

    prefect_env()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):
        yield


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["listfile", "inaturalist"])
def test_tailforge_run_goes_end_to_end_on_the_split_files(fmt, tmp_path, harness, one_torch_thread):
    """`tailforge run` (the three arms of the small-images recipe, one epoch each) on either format."""
    root = tmp_path / "ds"
    if fmt == "listfile":
        make_lt_set(root)
        data = ["--set", "data.dataset=listfile", "--set", f"data.root={root}", "--set", "data.lists.train=LT_train.txt",
                "--set", "data.lists.val=LT_val.txt", "--set", "data.lists.test=LT_test.txt",
                "--set", "data.names=names.txt"]
    else:
        make_inat(root)
        data = ["--set", "data.dataset=inaturalist", "--set", f"data.root={root}",
                "--set", "data.lists.train=train2018.json", "--set", "data.lists.val=val2018.json"]
    run = tmp_path / "run"
    assert main(["run", *TINY_RUN, *data, "--run", str(run)]) == 0
    real = pd.read_parquet(run / "real.parquet")
    n_train = sum(TRAIN) if fmt == "listfile" else 15
    assert (real["split"] == "train").sum() == n_train  # profile none: the list as published
    n_test = 5 * TEST if fmt == "listfile" else 6  # iNat: val's 3 per class split 1 val / 2 test
    for arm in ("baseline", "real-only", "rebalanced"):
        metrics = json.loads((run / "eval" / f"{arm}-test.json").read_text())
        assert metrics["split"] == "test" and metrics["n"] == n_test and 0 <= metrics["balanced_acc"] <= 1


def test_measure_train_and_eval_read_the_listed_images_through_the_cli(tmp_path, capsys):
    """The fast end-to-end check (no Prefect): the stages load the images the iNaturalist JSON names."""
    root = tmp_path / "inat"
    make_inat(root)
    run = str(tmp_path / "run")
    assert main(["measure", "--run", run, "--dataset", "inaturalist", "--root", str(root), "--image-size", "8",
                 "--lists", "{train: train2018.json, val: val2018.json}"]) == 0
    assert main(["train", "--run", run, "--name", "b", "--model", "tiny", "--width", "4", "--epochs", "1",
                 "--no-hflip"]) == 0
    assert main(["eval", "--run", run, "--model-name", "b", "--split", "test", "--no-plots"]) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "b-test.json").read_text())
    assert metrics["n"] == 6 and metrics["class_names"] == ["Aves: Turdus", "Insecta: Apis", "Plantae: Quercus"]


def test_the_cli_reads_list_files_and_reports_bad_ones_in_one_line(lt_root, tmp_path, capsys):
    root, _ = lt_root
    args = ["measure", "--run", str(tmp_path / "run"), "--dataset", "listfile", "--root", str(root),
            "--lists", "{train: LT_train.txt, val: LT_val.txt, test: LT_test.txt}", "--names", "names.txt"]
    assert main(args) == 0
    counts = json.loads((tmp_path / "run" / "counts.json").read_text())
    assert counts["counts"]["train"] == TRAIN
    bad(root, "bad5.txt", "train/n0000/n0000_0.png 0\n../../x.png 1\n")
    capsys.readouterr()
    args = ["measure", "--run", str(tmp_path / "run2"), "--dataset", "listfile", "--root", str(root),
            "--lists", "{train: bad5.txt, test: LT_test.txt}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad5.txt:2: path '../../x.png' lies outside the dataset root" in err[0], err
    assert main(["measure", "--run", str(tmp_path / "run3"), "--dataset", "digits", "--lists", "{train: a.txt}"]) == 2
    assert "data.lists and data.names are read by the datasets listfile, inaturalist" in capsys.readouterr().err


def test_a_misspelt_split_key_is_named_before_any_work(tmp_path):
    from tailforge.flows.config import load_config, parse_set

    with pytest.raises(TailforgeError, match=r"unknown key 'data.lists.tarin'.*did you mean 'train'"):
        load_config(None, parse_set(["data.dataset=listfile", f"data.root={tmp_path}", "data.lists.tarin=a.txt"]))
    cfg = load_config(None, parse_set(["data.dataset=listfile", f"data.root={tmp_path}", "data.lists.train=a.txt",
                                       "data.lists.test=b.txt"]))
    assert cfg.data.profile == "none" and str(cfg.data.lists.test) == "b.txt"
    assert load_config(None, parse_set(["data.dataset=listfile", "data.profile=exp"])).data.profile == "exp"
