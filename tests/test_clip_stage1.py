"""ECVL's contrastive stage 1 (``train.clip_stage1: contrastive``) on the tiny CLIP of test_clip_adapter: both towers
change, the --pretrained folder does not, stage 2 trains on the tuned towers, the model carries them in its own
folder and reloads (load_model, evaluate, crt on it, the classify page) predicting what it predicted on val."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tailforge import train
from tailforge.data import RunDir
from tailforge.train import clip as clipmod

from test_clip_adapter import _bacc, _split, tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the random tiny CLIP learns digits from scratch: a high lr, 160 small steps, no augmentation (measured: the
# zero-shot head goes from chance, 0.1, to 0.30 val balanced accuracy)
STAGE1 = dict(model="clip_adapter", loss="balanced_softmax", epochs=4, batch_size=32, device="cpu", augment="none",
              clip_stage1="contrastive", clip={"stage1_epochs": 10, "stage1_lr": 3e-3})


def _hashes(folder):
    import hashlib

    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tuned(digits_run, tmp_path_factory):
    clip_dir = tiny_clip(tmp_path_factory.mktemp("weights1") / "tiny-clip")
    before = _hashes(clip_dir)
    root = tmp_path_factory.mktemp("clip1") / "digits"
    shutil.copytree(digits_run.root, root)
    run = RunDir(root)
    frozen = train.fit(run, train.TrainConfig(**{**STAGE1, "clip_stage1": "none"}, pretrained=clip_dir), "frozen")
    path = train.fit(run, train.TrainConfig(**STAGE1, pretrained=clip_dir), "ecvl")
    return run, clip_dir, before, frozen, path


def test_stage1_tunes_both_towers_and_leaves_the_source_folder_alone(tuned):
    from transformers import CLIPModel

    run, clip_dir, before, frozen, path = tuned
    assert _hashes(clip_dir) == before  # real weights are never modified
    meta = json.loads((path / "config.json").read_text())["meta"]
    c = meta["clip"]
    assert c["towers"] == "clip" and c["path"] == str(clip_dir.resolve()) and "stage1_dir" not in c
    assert (path / "clip" / "config.json").is_file() and not list((run.root / "models").glob(".clip-stage1-*"))
    log = c["stage1"]["log"]
    assert len(log) == 10 and log[-1]["train_loss"] < log[0]["train_loss"] - 0.3
    src = CLIPModel.from_pretrained(clip_dir).state_dict()
    new = CLIPModel.from_pretrained(path / "clip").state_dict()
    changed = {k for k in src if not torch.equal(src[k], new[k])}
    assert any(k.startswith("vision_model.") for k in changed) and "visual_projection.weight" in changed
    assert any(k.startswith("text_model.") for k in changed) and "text_projection.weight" in changed
    assert torch.equal(src["logit_scale"], new["logit_scale"])
    # stage 2 ran on the tuned towers: its zero-shot head is the tuned text tower's class embeddings
    text, _ = clipmod.text_features(path / "clip", run.dataset_info()["class_names"], ["a photo of a {name}."])
    model, _ = train.load_model(path)
    np.testing.assert_allclose(model.text.numpy(), text, atol=1e-5)
    # and stage 1 made the zero-shot head far better than the random CLIP's (chance 0.1) on VAL
    b0 = json.loads((frozen / "best.json").read_text())
    b1 = json.loads((path / "best.json").read_text())
    assert b0["zero_shot_val_balanced_acc"] < 0.15 and b1["zero_shot_val_balanced_acc"] > 0.2


def test_saved_model_reloads_from_its_own_folder_and_predicts_as_before(tuned, tmp_path):
    run, clip_dir, _, _, path = tuned
    best = json.loads((path / "best.json").read_text())
    val, x = _split(run, "val")
    moved = tmp_path / "moved-model"  # the model folder alone, anywhere: its towers travel with it
    shutil.copytree(path, moved)
    for folder in (path, moved):
        model, meta = train.load_model(folder)
        assert model.tower_path == str(folder / "clip")
        p = train.predict_proba(model, meta, x)
        assert _bacc(val["label"].to_numpy(), p.argmax(1)) == pytest.approx(best["val_balanced_acc"], abs=1e-6)
    from tailforge.eval import evaluate

    out = evaluate(run, "ecvl", "test")
    assert out["selected_on"]["blend"] == best["blend"] and out["balanced_acc"] > 0.3
    # cRT on it reads the tuned towers' features, not the source folder's (cached in this run by `frozen`): its
    # zero-shot head (the tuned text . the features) scores what the model's did
    crt = train.fit(run, train.TrainConfig(stage="crt", base="ecvl", sampler="class_balanced", epochs=2,
                                           batch_size=64, device="cpu"), "ecvl-crt")
    crt_best = json.loads((crt / "best.json").read_text())
    assert crt_best["zero_shot_val_balanced_acc"] == pytest.approx(best["zero_shot_val_balanced_acc"], abs=1e-6)


def test_classify_page_serves_the_tuned_model(tuned):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tailforge.data import read_manifest
    from tailforge.flows.serve import create_app

    run = tuned[0]
    client = TestClient(create_app(run.root), raise_server_exceptions=False)
    test = read_manifest(run.real).query("split == 'test'")
    r = client.post("/api/predict", data={"sample_id": test["sample_id"].iloc[0], "model": "ecvl"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["model"] == "ecvl"


def test_loss_guided_augmentation_runs_in_stage1(digits_run_copy, tmp_path):
    clip_dir = tiny_clip(tmp_path / "tiny-clip")
    cfg = train.TrainConfig(**{**STAGE1, "epochs": 1, "clip": {"stage1_epochs": 2, "stage1_lr": 3e-3}},
                            aug_policy="loss_guided", pretrained=clip_dir)
    path = train.fit(digits_run_copy, cfg, "ecvl-lg")
    log = json.loads((path / "config.json").read_text())["meta"]["clip"]["stage1"]["log"]
    assert log[0]["lossaug"]["w_mean"] == 0.0 and log[1]["lossaug"]["w_mean"] == pytest.approx(0.5, abs=1e-3)


def test_cli_clip_stage1_errors_are_one_line(digits_run_copy, tmp_path, capsys):
    from tailforge.flows.cli import main

    run = str(digits_run_copy.root)
    capsys.readouterr()
    assert main(["train", "--run", run, "--model", "clip_adapter", "--clip-stage1", "contrastive"]) == 2
    assert main(["train", "--run", run, "--model", "clip_adapter", "--clip-stage1", "contrastive",
                 "--pretrained", str(tmp_path / "none")]) == 2
    assert main(["train", "--run", run, "--model", "tiny", "--clip-stage1", "contrastive"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "Traceback" not in "".join(err)
    assert "--pretrained is not set" in err[0] and "does not exist" in err[1] and "clip_adapter" in err[2]
