"""clip_adapter: a tiny CLIP built from configs and saved as a real folder (``CLIPModel.save_pretrained`` +
the tokenizer's ``save_pretrained``), then trained, evaluated and served through the user code path
(``--pretrained DIR``) on long-tailed digits: the zero-shot head is CLIP's own, the blend is chosen on val
and saved, the feature cache is reused and shared with the filter's ``clip`` embedder, and missing weights
are one clear line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tailforge import train
from tailforge.data import RunDir, TailforgeError, load_images, read_manifest, write_json
from tailforge.train import clip as clipmod
from tailforge.train.features import cache_dir, uri_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADAPTER = dict(model="clip-adapter", loss="balanced_softmax", epochs=15, batch_size=64, device="cpu")


def tiny_clip(folder: Path, seed: int = 0, dim: int = 16) -> Path:
    """A random CLIP (2-layer towers, 32 px, 16-d projection) with the character-level BPE tokenizer of the tiny
    Stable Diffusion pipeline, written the way a downloaded checkpoint is: config.json + model.safetensors +
    tokenizer files."""
    from transformers import CLIPConfig, CLIPModel

    from tailforge.gen.sd_build import make_tokenizer

    tok = make_tokenizer(32)  # ids: <|startoftext|> 0, <|endoftext|> 1, pad "!" 2
    conf = CLIPConfig(
        text_config=dict(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=32,
                         projection_dim=dim),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                           image_size=32, patch_size=8, projection_dim=dim),
        projection_dim=dim)
    torch.manual_seed(seed)
    CLIPModel(conf).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("weights") / "tiny-clip")


@pytest.fixture(scope="module")
def adapted(digits_run, clip_dir, tmp_path_factory):
    """A private digits run with one clip_adapter trained (balanced softmax, 15 epochs)."""
    root = tmp_path_factory.mktemp("clip") / "digits"
    shutil.copytree(digits_run.root, root)
    run = RunDir(root)
    train.fit(run, train.TrainConfig(**ADAPTER, pretrained=clip_dir), "clip")
    return run


def _split(run: RunDir, split: str):
    df = read_manifest(run.real)
    rows = df[(df["split"] == split) & (df["source"] == "real")]
    return rows, load_images(rows["uri"], run.root, 1, (8, 8))


def _bacc(y, pred) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def test_adapter_trains_on_cached_features_saves_the_blend_and_loads_for_eval(adapted, clip_dir):
    run = adapted
    d = run.model_dir("clip")
    assert {p.name for p in d.iterdir()} == {"model.safetensors", "config.json", "log.jsonl", "best.json",
                                             ".integrity.json", "tb"}
    from safetensors.torch import load_file

    weights = load_file(str(d / "model.safetensors"))  # the adapter, not the CLIP tower: a few KB
    assert set(weights) == {"head.weight", "head.bias", "text", "logit_scale", "blend", "center", "spread"}
    best = json.loads((d / "best.json").read_text())
    meta = json.loads((d / "config.json").read_text())["meta"]
    assert best["split"] == "val" and best["blend_chosen_on"] == "val" and 0 <= best["blend"] <= 1
    assert meta["clip"]["blend"] == best["blend"] == pytest.approx(float(weights["blend"]))
    assert meta["clip"]["path"] == str(clip_dir.resolve()) and meta["clip"]["prompts"] == ["a photo of a {name}."]
    # the blend is the best of the grid on val, so it is at least as good as either head alone
    assert best["val_balanced_acc"] >= max(best["adapter_val_balanced_acc"], best["zero_shot_val_balanced_acc"])
    assert best["adapter_val_balanced_acc"] > 0.25  # chance is 0.1: random CLIP features still carry the digits
    # the saved model, loaded like any other (its tower read from the CLIP folder), reproduces the val number
    model, meta = train.load_model(d)
    assert isinstance(model, clipmod.ClipAdapter) and model.backbone is not None
    val, x = _split(run, "val")
    p = train.predict_proba(model, meta, x)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    assert _bacc(val["label"].to_numpy(), p.argmax(1)) == pytest.approx(best["val_balanced_acc"], abs=1e-6)
    from tailforge.eval import evaluate

    out = evaluate(run, "clip", "test")
    assert out["train"]["model"] == "clip_adapter" and out["train"]["pretrained"] == str(clip_dir)
    assert out["selected_on"]["blend"] == best["blend"] and 0.2 < out["balanced_acc"] <= 1


def test_zero_shot_head_is_clips_own_image_text_similarity(adapted, clip_dir):
    """With blend 0 the model's probabilities are CLIPModel's softmax(logits_per_image) over the class prompts."""
    from transformers import AutoTokenizer, CLIPModel

    from tailforge.train.features import fit_input

    model, meta = train.load_model(adapted.model_dir("clip"))
    model.blend.fill_(0.0)
    _, x = _split(adapted, "test")
    x = x[:6]
    ours = train.predict_proba(model, meta, x)
    ref = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    names = adapted.dataset_info()["class_names"]
    enc = tok([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
    pixels = fit_input(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, (32, 32), clipmod.CLIP_MEAN,
                       clipmod.CLIP_STD)
    with torch.no_grad():
        logits = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
    np.testing.assert_allclose(ours, logits.logits_per_image.softmax(1).numpy(), atol=1e-5)


def test_feature_cache_is_reused_and_shared_with_the_clip_filter(adapted, clip_dir, monkeypatch):
    from tailforge.eval.filter import FilterConfig, filter_candidates
    from tailforge.eval.filter.planted import PlantedCandidates

    run = adapted
    cached = sorted(cache_dir(run).glob("clip*"))
    assert len(cached) == 3  # real train images, val images, class prompts
    before = {p: p.stat().st_mtime_ns for p in cached}

    def no_model(*a, **k):
        raise AssertionError("a model was loaded although every feature is cached")

    # a second adapter with other settings embeds nothing and loads no CLIP weights
    monkeypatch.setattr(clipmod, "load_clip_vision", no_model)
    monkeypatch.setattr(clipmod, "text_features", no_model)
    cfg = train.TrainConfig(**{**ADAPTER, "loss": "ce", "sampler": "class_balanced", "epochs": 3}, pretrained=clip_dir)
    train.fit(run, cfg, "clip-cb")
    # the filter with embedder clip reads the real train vectors from the same file
    real = read_manifest(run.real)
    train_uris = real[(real["split"] == "train") & (real["source"] == "real")]["uri"].tolist()
    shared = [p for p in cached if p.name.endswith(uri_hash(train_uris, run) + ".npy")]
    assert len(shared) == 1
    monkeypatch.undo()
    planted = PlantedCandidates(run)
    _, x = _split(run, "val")
    val = read_manifest(run.real).query("split == 'val'")
    for img, label in list(zip(x, val["label"]))[:8]:
        planted.add(img, 9, "good" if label == 9 else "wrong_class", "val")
    planted.write()
    info = run.dataset_info()
    write_json(run.plan, {"target": "planted", "overgen": 1.0, "total": 8, "classes": [
        dict(label=c, class_name=info["class_names"][c], have=0, need=4 if c == 9 else 0, generate=8 if c == 9 else 0)
        for c in range(10)]})
    out = filter_candidates(run, FilterConfig(embedder="clip", embedder_path=str(clip_dir)))
    assert len(out) == 8 and out["accepted"].sum() <= 4
    after = sorted(cache_dir(run).glob("clip*"))
    assert len(after) == 4  # + the candidates; the real train vectors were read, not recomputed
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    # synthetic images join the adapter's training set (here every candidate: the filter's candidate vectors)
    path = train.fit(run, cfg.model_copy(update={"synthetic": "candidates"}), "clip-syn")
    meta = json.loads((path / "config.json").read_text())["meta"]
    real9 = int(((real["split"] == "train") & (real["source"] == "real") & (real["label"] == 9)).sum())
    assert meta["n_synthetic_images"] == 8 and meta["train_counts"][9] == real9 + 8
    assert len(list(cache_dir(run).glob("clip*"))) == 4  # the same uri list as the filter's: its file


def test_crt_on_a_clip_adapter_base_uses_the_cache_and_chooses_its_own_blend(adapted, monkeypatch):
    """What `tailforge run` does with train.model clip_adapter: the recipe re-trains the head on the baseline's
    (here: the adapter's) features; the image tower is loaded once with the base, nothing is embedded again."""
    run = adapted
    monkeypatch.setattr(clipmod.ClipImages, "embed", lambda *a, **k: pytest.fail("features were recomputed"))
    cfg = train.TrainConfig(stage="crt", base="clip", sampler="class_balanced", epochs=3, batch_size=64, device="cpu")
    path = train.fit(run, cfg, "clip-crt")
    best = json.loads((path / "best.json").read_text())
    assert best["blend_chosen_on"] == "val" and best["adapter_val_balanced_acc"] > 0.2
    model, meta = train.load_model(path)
    assert meta["arch"] == "clip_adapter" and float(model.blend) == pytest.approx(best["blend"])


def test_classify_page_serves_the_adapter(adapted):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tailforge.flows.serve import create_app

    client = TestClient(create_app(adapted.root), raise_server_exceptions=False)
    models = {m["name"]: m for m in client.get("/api/models").json()}
    assert models["clip"]["arch"] == "clip_adapter"
    test = read_manifest(adapted.real).query("split == 'test'")
    r = client.post("/api/predict", data={"sample_id": test["sample_id"].iloc[0], "model": "clip"})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["model"] == "clip" and len(res["top"]) == 5 and res["true_rank"] >= 1


def test_cli_train_and_eval_and_clear_errors_for_missing_weights(digits_run_copy, clip_dir, tmp_path, capsys):
    from tailforge.flows.cli import main

    run = str(digits_run_copy.root)
    assert main(["train", "--run", run, "--model", "clip-adapter", "--pretrained", str(clip_dir), "--epochs", "2",
                 "--loss", "logit_adjust", "--clip-prompts", "a photo of the digit {name}, handwritten.",
                 "--device", "cpu"]) == 0
    name = "clip_adapter-logit_adjust-instance-s0"
    conf = json.loads((digits_run_copy.model_dir(name) / "config.json").read_text())
    assert conf["train"]["clip"]["prompts"] == ["a photo of the digit {name}, handwritten."]
    assert main(["eval", "--run", run, "--model-name", name, "--split", "val", "--no-plots"]) == 0
    capsys.readouterr()

    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / f, no_tok / f)
    assert main(["train", "--run", run, "--model", "clip-adapter"]) == 2
    assert main(["train", "--run", run, "--model", "clip-adapter", "--pretrained", str(tmp_path / "nope")]) == 2
    assert main(["train", "--run", run, "--model", "clip-adapter", "--pretrained", str(no_tok)]) == 2
    assert main(["train", "--run", run, "--model", "clip-adapter", "--pretrained", str(clip_dir),
                 "--clip-prompts", "a photo of a {nmae}."]) == 2
    # a saved adapter whose CLIP folder has gone
    moved = tmp_path / "moved-clip"
    shutil.copytree(clip_dir, moved)
    assert main(["train", "--run", run, "--name", "moved", "--model", "clip-adapter", "--pretrained", str(moved),
                 "--epochs", "1", "--device", "cpu"]) == 0
    shutil.rmtree(moved)
    capsys.readouterr()
    assert main(["eval", "--run", run, "--model-name", "moved", "--no-plots"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert str(moved) in lines[0] and "--pretrained DIR" in lines[0]


def test_missing_weights_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(TailforgeError, match="--pretrained is not set") as e:
        clipmod.check_folder(None)
    assert "save_pretrained" in e.value.hint
    with pytest.raises(TailforgeError, match="does not exist"):
        clipmod.check_folder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TailforgeError, match="has no config.json"):
        clipmod.check_folder(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(TailforgeError, match="model.safetensors or pytorch_model.bin"):
        clipmod.check_folder(tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(TailforgeError, match="vocab.json"):
        clipmod.check_folder(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(TailforgeError, match="not a full CLIP model"):
        clipmod.check_folder(tmp_path / "empty")
    assert clipmod.check_folder(tmp_path / "empty", text=False) == tmp_path / "empty"  # the filter's tower only


def test_class_balanced_adapter_beats_plain_ce_on_fashion_mnist_lt(fashion_available, clip_dir, tmp_path):
    """Fashion-MNIST-LT (IF = 100, 14,886 train images): the long-tail toolbox applies to the adapter. With the
    tiny random CLIP the zero-shot head is at chance, and the class-balanced adapter is far above plain CE on val
    (measured: balanced softmax 0.52, CE 0.39)."""
    from tailforge.data import DataConfig, build_manifest, measure_run

    run = RunDir(tmp_path / "fmnist-lt")
    build_manifest(DataConfig(dataset="fashion-mnist", imbalance=100, seed=0), run)
    measure_run(run)
    best = {}
    for loss in ("ce", "balanced_softmax"):
        cfg = train.TrainConfig(**{**ADAPTER, "loss": loss, "batch_size": 128}, pretrained=clip_dir)
        best[loss] = json.loads((train.fit(run, cfg, loss) / "best.json").read_text())
    assert best["ce"]["zero_shot_val_balanced_acc"] < 0.2  # random text tower: chance is 0.1
    assert best["balanced_softmax"]["adapter_val_balanced_acc"] > best["ce"]["adapter_val_balanced_acc"] + 0.05


@pytest.mark.slow
def test_benchmark_flow_with_a_clip_adapter_baseline(clip_dir, tmp_path):
    """`tailforge run` with train.model clip_adapter: the baseline is the adapter, featcov samples its feature
    space, the recipe re-trains its head (cRT) on cached features; every arm is evaluated (~25 s, a Prefect
    server starts)."""
    import os
    import subprocess
    import sys

    run = tmp_path / "digits-clip"
    cmd = [sys.executable, "-m", "tailforge.flows.cli", "run", "--run", str(run), "--set", "train.model=clip_adapter",
           "--set", f"train.pretrained={clip_dir}", "--set", "train.loss=balanced_softmax", "--set", "train.epochs=10",
           "--set", "evaluate.plots=false"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for name in ("baseline", "real-only", "rebalanced"):
        conf = json.loads((run / "models" / name / "config.json").read_text())
        assert conf["meta"]["arch"] == "clip_adapter" and "blend" in conf["meta"]["clip"]
        assert json.loads((run / "eval" / f"{name}-test.json").read_text())["balanced_acc"] > 0.2
    assert (run / "eval" / "report.md").is_file()
