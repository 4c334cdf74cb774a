"""train: every loss and sampler learns on real digits, resume == uninterrupted, cRT on featdict rows, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from tailforge import train
from tailforge.data import RunDir, TailforgeError, load_images, read_manifest, write_manifest
from tailforge.train.losses import LOSSES, build_loss
from tailforge.train.models import create_model
from tailforge.train.samplers import SAMPLERS, epoch_indices

pytestmark = pytest.mark.usefixtures("one_torch_thread")


FAST = dict(model="tiny", width=8, epochs=3, batch_size=64, lr=0.05, hflip=False, eval_batch_size=512)


def _train_xy(run: RunDir):
    df = read_manifest(run.real)
    tr = df[df["split"] == "train"]
    x = load_images(tr["uri"], run.root, 1, (8, 8))
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(tr["label"].to_numpy())


@pytest.fixture(scope="module")
def trained(digits_run, tmp_path_factory):
    """A private copy of the digits run with one CE model trained (3 epochs)."""
    root = tmp_path_factory.mktemp("train") / "digits"
    shutil.copytree(digits_run.root, root)
    run = RunDir(root)
    train.fit(run, train.TrainConfig(**FAST), "base")
    return run


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_learns_without_collapse(digits_run, loss):
    """50 full-batch steps on the long-tailed digits: the loss falls and the model does not predict one
    class (the collapse the class-balanced loss showed in the thesis): balanced accuracy >> chance."""
    x, y = _train_xy(digits_run)
    counts = np.bincount(y.numpy(), minlength=10)
    cfg = train.TrainConfig(loss=loss, epochs=50)
    fn = build_loss(cfg, counts)
    torch.manual_seed(0)
    model = create_model("tiny", 10, 1, 8, width=8, head=fn.head, scale=cfg.scale)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(50):
        per = fn(model(x), y, epoch=step)
        assert per.shape == (len(y),)
        loss_v = per.mean()
        opt.zero_grad()
        loss_v.backward()
        opt.step()
        losses.append(loss_v.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses[::10]
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    recall = [(pred[y.numpy() == c] == c).mean() for c in range(10)]
    assert len(np.unique(pred)) >= 6, f"{loss} predicts only {np.unique(pred)}"
    assert np.mean(recall) > 0.5, f"{loss}: train balanced accuracy {np.mean(recall):.2f}"


def test_class_weights_keep_loss_scale():
    """Re-weighted losses stay on CE's scale (weights average ~1 over classes), not ~1/N of it."""
    counts = np.array([1000, 300, 100, 30, 10])
    logits = torch.zeros(5, 5)
    y = torch.arange(5)
    ce = build_loss(train.TrainConfig(loss="ce"), counts)(logits, y).mean()
    for name in ("weighted_ce", "class_balanced"):
        v = build_loss(train.TrainConfig(loss=name), counts)(logits, y).mean()
        assert 0.5 * ce < v < 2 * ce


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_distribution_and_determinism(name):
    labels = np.repeat(np.arange(4), [400, 100, 25, 9])
    a = epoch_indices(name, labels, seed=0, epoch=3)
    assert len(a) == len(labels) and np.array_equal(a, epoch_indices(name, labels, seed=0, epoch=3))
    assert not np.array_equal(a, epoch_indices(name, labels, seed=0, epoch=4))
    share = np.bincount(labels[a], minlength=4) / len(a)
    if name == "instance":
        assert sorted(a.tolist()) == list(range(len(labels)))
    elif name in ("class_balanced", "weighted"):
        np.testing.assert_allclose(share, 0.25, atol=0.05)
    else:  # sqrt
        expect = np.sqrt([400, 100, 25, 9]) / np.sqrt([400, 100, 25, 9]).sum()
        np.testing.assert_allclose(share, expect, atol=0.05)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_fit_with_each_sampler_lowers_loss(digits_run_copy, sampler):
    path = train.fit(digits_run_copy, train.TrainConfig(**{**FAST, "sampler": sampler}), f"m-{sampler}")
    log = [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert max(r["val_balanced_acc"] for r in log) > 0.2  # chance is 0.1


def test_fit_outputs_and_inference(trained):
    d = trained.model_dir("base")
    assert {p.name for p in d.iterdir()} == {"model.safetensors", "config.json", "log.jsonl", "best.json",
                                             ".integrity.json", "tb"}  # the folder's record of its files
    log = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
    best = json.loads((d / "best.json").read_text())
    assert best["split"] == "val"
    assert best["epoch"] == 1 + int(np.argmax([r["val_balanced_acc"] for r in log]))
    model, meta = train.load_model(d)
    assert meta["arch"] == "tiny" and meta["num_classes"] == 10 and meta["in_chans"] == 1
    assert meta["image_size"] == [8, 8] and len(meta["class_names"]) == 10
    df = read_manifest(trained.real)
    val = df[df["split"] == "val"]
    x = load_images(val["uri"], trained.root, 1, (8, 8))
    p = train.predict_proba(model, meta, x)
    f = train.embed(model, meta, x, batch_size=50)
    assert p.dtype == np.float32 and p.shape == (len(val), 10)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    assert f.shape == (len(val), meta["feature_dim"])
    bacc = np.mean([(p.argmax(1)[val["label"].to_numpy() == c] == c).mean() for c in range(10)])
    assert bacc == pytest.approx(best["val_balanced_acc"], abs=1e-5)  # the saved weights are the selected ones
    # a finished model is reused, not retrained; other settings are refused
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert train.fit(trained, train.TrainConfig(**FAST), "base") == d
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(TailforgeError, match="already exists"):
        train.fit(trained, train.TrainConfig(**{**FAST, "lr": 0.01}), "base")


def test_resume_equals_uninterrupted(digits_run_copy):
    run = digits_run_copy
    cfg = train.TrainConfig(**{**FAST, "epochs": 3, "ema": 0.9, "mixup": 0.2, "augment": "strong"})
    full = train.fit(run, cfg, "full")

    def stop_after_first_epoch(done, total, info):
        if info.get("event") == "epoch" and info["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.fit(run, cfg, "cut", progress=stop_after_first_epoch)
    assert not run.model_dir("cut").exists()
    assert (run.root / "models" / ".work-cut" / "state.pt").exists()
    epochs_run = []
    cut = train.fit(run, cfg, "cut", progress=lambda d, t, i: epochs_run.append(i["epoch"]))
    assert min(epochs_run) == 2  # epoch 1 was not redone
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    drop = ("images_per_s", "time_s")
    la = [{k: v for k, v in json.loads(x).items() if k not in drop} for x in (full / "log.jsonl").read_text().splitlines()]
    lb = [{k: v for k, v in json.loads(x).items() if k not in drop} for x in (cut / "log.jsonl").read_text().splitlines()]
    assert la == lb


def _featdict_rows(run: RunDir, feats: np.ndarray, labels: np.ndarray, feature_model: str, tag: str) -> pd.DataFrame:
    shard = run.root / "synthetic" / "featdict" / f"{tag}.npy"
    shard.parent.mkdir(parents=True, exist_ok=True)
    np.save(shard, feats.astype(np.float32))
    info = json.loads(run.dataset.read_text())
    return pd.DataFrame({
        "sample_id": [f"fd-{tag}-{i}" for i in range(len(feats))],
        "uri": [f"synthetic/featdict/{tag}.npy#{i}" for i in range(len(feats))],
        "label": labels, "class_name": [info["class_names"][i] for i in labels], "split": "train",
        "source": "featdict", "feature_model": feature_model, "accepted": True, "generator": "featdict",
    })


def test_crt_uses_featdict_rows_of_its_base(trained):
    run = trained
    model, meta = train.load_model(run.model_dir("base"))
    df = read_manifest(run.real)
    tail = df[(df["split"] == "train") & (df["label"] == 9)]
    f = train.embed(model, meta, load_images(tail["uri"], run.root, 1, (8, 8)))
    rng = np.random.default_rng(0)
    ours = _featdict_rows(run, f[rng.integers(0, len(f), 40)] + 0.01 * rng.normal(size=(40, f.shape[1])),
                          np.full(40, 9), "base", "a")
    other = _featdict_rows(run, np.zeros((5, 3)), np.full(5, 9), "another-model", "b")
    rejected = _featdict_rows(run, np.zeros((7, f.shape[1])), np.full(7, 8), "base", "c").assign(accepted=False)
    write_manifest(pd.concat([ours, other, rejected], ignore_index=True), run.filtered)
    cfg = train.TrainConfig(**{**FAST, "stage": "crt", "base": "base", "sampler": "class_balanced",
                               "synthetic": "filtered", "epochs": 4, "lr": 0.1})
    path = train.fit(run, cfg, "crt")
    crt_model, crt_meta = train.load_model(path)
    assert crt_meta["n_featdict"] == 40 and crt_meta["train_counts"][9] == len(tail) + 40
    # the backbone is the base's, unchanged
    for (k, a), b in zip(model.backbone.state_dict().items(), crt_model.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    # featdict features of a wrong dimension for this base are refused
    write_manifest(_featdict_rows(run, np.zeros((3, 5)), np.full(3, 9), "base", "d"), run.filtered)
    with pytest.raises(TailforgeError, match="dimension"):
        train.fit(run, cfg.model_copy(update={"seed": 1}), "crt2")
    run.filtered.unlink()


def test_distillation_and_margin_head(trained):
    cfg = train.TrainConfig(**{**FAST, "epochs": 2, "teacher": "base", "loss": "arcface", "cutmix": 1.0})
    path = train.fit(trained, cfg, "student")
    model, meta = train.load_model(path)
    assert meta["head"] == "cosine"
    log = [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]
    assert np.isfinite([r["train_loss"] for r in log]).all()


def test_models_build_for_grey_and_rgb():
    for arch in ("tiny", "resnet32", "resnet18", "mobilenetv2"):
        for chans, size in ((1, 8), (3, 32)):
            m = create_model(arch, 7, chans, size, width=8 if arch in ("tiny", "resnet32") else None).eval()
            x = torch.randn(2, chans, size, size)
            f = m.forward_features(x)
            assert f.shape == (2, m.feature_dim)
            assert m.forward_head(f).shape == (2, 7)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["convnext_tiny", "vit_b_16", "resnet50", "convnext_base"])
def test_large_models_build(arch):
    m = create_model(arch, 5, 1, 8).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 8, 8)).shape == (1, 5)


def test_pretrained_local_only(tmp_path):
    src = create_model("resnet18", 10, 3, 32)
    torch.save(src.backbone.state_dict(), tmp_path / "r18.pth")
    dst = create_model("resnet18", 4, 1, 32)
    from tailforge.train.models import load_pretrained

    stats = load_pretrained(dst, tmp_path)  # folder: the .pth inside is found
    assert stats["loaded"] > 50
    torch.testing.assert_close(dst.backbone.conv1.weight, src.backbone.conv1.weight.sum(1, keepdim=True))
    with pytest.raises(TailforgeError, match="never downloads"):
        load_pretrained(dst, tmp_path / "missing.safetensors")
    with pytest.raises(TailforgeError, match="does not fit this architecture: 0 of its 18 tensors"):
        load_pretrained(create_model("tiny", 4, 1, 8), tmp_path / "r18.pth")


def test_bad_input(digits_run_copy, tmp_path):
    run = digits_run_copy
    for field, bad, valid in (("loss", "focl", "balanced_softmax"), ("sampler", "balanced", "class_balanced"),
                              ("model", "resnet33", "resnet32")):
        with pytest.raises(TailforgeError, match=f"unknown {field} '{bad}'.*{valid}"):
            train.fit(run, train.TrainConfig(**{**FAST, field: bad}), "x")
    with pytest.raises(TailforgeError, match=r"unknown device 'banana'.*--device auto, cpu"):
        train.fit(run, train.TrainConfig(**{**FAST, "device": "banana"}), "dev")
    assert not run.model_dir("dev").exists()
    with pytest.raises(TailforgeError, match="epoch 1"):
        train.fit(run, train.TrainConfig(**{**FAST, "lr": 1e30, "clip_grad": None}), "nan")
    assert not run.model_dir("nan").exists()
    # a teacher with another class count
    from safetensors.torch import save_file

    other = create_model("tiny", 4, 1, 8, width=8)
    d = run.model_dir("four")
    d.mkdir(parents=True)
    save_file(other.state_dict(), str(d / "model.safetensors"))
    meta = {"arch": "tiny", "num_classes": 4, "in_chans": 1, "image_size": [8, 8], "width": 8, "mean": [0.3],
            "std": [0.3], "feature_dim": 32, "class_names": list("abcd")}
    (d / "config.json").write_text(json.dumps({"meta": meta}))
    with pytest.raises(TailforgeError, match="4 classes"):
        train.fit(run, train.TrainConfig(**{**FAST, "teacher": "four"}), "kd")
    # a run without training data
    df = read_manifest(run.real)
    write_manifest(df[df["split"] != "train"], run.real)
    with pytest.raises(TailforgeError, match="no real training images"):
        train.fit(run, train.TrainConfig(**FAST), "empty")


def test_balanced_epochs_give_real_only_and_rebalanced_the_same_budget():
    """epoch_samples=balanced: an epoch is classes x the largest real class, with or without synthetic rows."""
    from tailforge.train.samplers import epoch_indices

    labels = np.repeat(np.arange(3), [50, 10, 2])
    grown = np.r_[labels, np.repeat([1, 2], [40, 48])]  # + synthetic rows balancing the classes
    for lab in (labels, grown):
        order = epoch_indices("class_balanced", lab, 0, 3, n=150)
        assert len(order) == 150 and order.max() < len(lab)
        assert np.bincount(lab[order], minlength=3).min() > 30  # still class-balanced
    assert np.array_equal(epoch_indices("class_balanced", labels, 0, 3, n=150), epoch_indices("class_balanced", labels, 0, 3, n=150))
    assert len(epoch_indices("instance", labels, 0, 0, n=100)) == 100
    assert np.array_equal(np.sort(epoch_indices("instance", labels, 0, 0)), np.arange(len(labels)))



def test_channels_last_on_cpu_learns_what_nchw_learns(digits_run_copy):
    """train.channels_last (opt-in) trains in NHWC on CPU, about 1.5x faster (bench/cpu_layout.py); the layouts
    differ only in float rounding, so both learn the digits alike, and the NHWC model saves and reloads whole."""
    run = digits_run_copy
    val = read_manifest(run.real).query("split == 'val'")
    x, y = load_images(val["uri"], run.root, 1, (8, 8)), val["label"].to_numpy()
    best = {}
    for on in (True, False):
        path = train.fit(run, train.TrainConfig(**{**FAST, "epochs": 6}, channels_last=on), f"nhwc-{on}")
        best[on] = json.loads((path / "best.json").read_text())["val_balanced_acc"]
        model, meta = train.load_model(path)
        pred = train.predict_proba(model, meta, x).argmax(1)
        assert np.mean([(pred[y == c] == c).mean() for c in range(10)]) == pytest.approx(best[on], abs=1e-5)
    assert min(best.values()) > 0.4 and abs(best[True] - best[False]) < 0.1, best


def test_channels_last_keeps_nchw_where_onednn_breaks(digits_run_copy):
    """oneDNN computes a strided 1x1 conv's weight gradient wrong in NHWC below its channel block (oneDNN#6035; here
    CifarResNet width 4 aborted with a corrupted heap): such a model stays NCHW and trains; wider ones go NHWC."""
    from tailforge.train.models import use_nhwc

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    narrow, wide = (create_model("resnet32", 10, 1, 8, width=w) for w in (4, 16))
    assert not use_nhwc(narrow, True, True, cpu) and use_nhwc(wide, True, True, cpu)
    assert not use_nhwc(wide, False, True, cpu) and use_nhwc(narrow, False, True, cuda)  # GPU: amp decides
    path = train.fit(digits_run_copy, train.TrainConfig(**{**FAST, "model": "resnet32", "width": 4, "epochs": 2},
                                                        channels_last=True), "narrow")
    assert json.loads((path / "best.json").read_text())["val_balanced_acc"] > 0.1
