"""Filter stage: planted wrong-class, near-copy and duplicate candidates among good ones (real digits).

Good candidates are real digits from the TRAIN pool that the long-tail construction left out (never in
any split); wrong-class ones are digits of another class given the tail label; near copies are real
train images plus a little pixel noise; duplicates are copies of one good candidate.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from tailforge.data import RunDir, read_manifest, write_json, write_manifest
from tailforge.data.errors import TailforgeError
from tailforge.eval.filter import FilterConfig, filter_candidates
from tailforge.eval.filter.index import FaissSearch, NumpySearch, l2_normalize
from tailforge.eval.filter.score import score_arrays
from tailforge.eval.filter.planted import PlantedCandidates

TAIL, OTHER, WRONG = 9, 7, 6  # tail class (few), a medium class with a small quota, the wrong-class source


def _pool(run: RunDir):
    """Digits images of the train pool that no split uses (dropped by the long-tail construction)."""
    from tailforge.data import DataConfig, load_dataset

    real = read_manifest(run.real)
    allx = np.load(run.data_dir / "all.npy")
    ally = load_dataset(DataConfig(dataset="digits")).splits["all"].labels
    used = {int(u.split("#")[1]) for u in real["uri"]}
    pool = np.array([i for i in range(len(allx)) if i not in used])
    return real, allx, ally, pool


def plant(run: RunDir, n_good: int = 12, quota_other: int = 5, seed: int = 0) -> pd.DataFrame:
    """Write candidates.parquet (PNG candidates, column `kind` = planted truth) and plan.json."""
    real, allx, ally, pool = _pool(run)
    info = run.dataset_info()
    train = real[real["split"] == "train"]
    planted = PlantedCandidates(run, seed)
    add, noisy = planted.add, planted.noisy

    for c in (TAIL, OTHER):
        for i in pool[ally[pool] == c][:n_good]:
            add(allx[i], c, "good", f"pool-{i}")
    for i in pool[ally[pool] == WRONG][:4]:
        add(allx[i], TAIL, "wrong_class", f"pool-{i}")
    for uri in train[train["label"] == TAIL]["uri"][:3]:
        add(noisy(allx[int(uri.split("#")[1])], 3), TAIL, "near_copy", uri)
    base = planted.rows[0]["parent_id"]  # the first good tail candidate, twice more with faint noise
    for _ in range(2):
        add(noisy(allx[int(base.split("-")[1])], 2), TAIL, "duplicate", base)
    df = planted.write()
    need = {TAIL: 100, OTHER: quota_other}
    write_json(run.plan, {"target": "planted", "overgen": 2.0, "total": len(df), "classes": [
        dict(label=c, class_name=info["class_names"][c], have=int((train["label"] == c).sum()),
             need=need.get(c, 0), generate=int((df["label"] == c).sum())) for c in range(info["num_classes"])]})
    return df


def tiny_timm(folder):
    """A tiny timm backbone (random init, fixed seed) saved as a local folder: config.json + safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "test_convnext"}))
    return folder


def recording(load, seen: list):
    """Wrap an image loader so the test sees every uri it is asked for."""
    def wrapped(uris, *a, **kw):
        seen.extend(uris)
        return load(uris, *a, **kw)
    return wrapped


@pytest.fixture(scope="module")
def planted(digits_run, tmp_path_factory):
    """The planted run, filtered once with the tiny timm embedder while recording every image read."""
    import tailforge.eval.filter.stage as F
    import tailforge.eval.filter.report as R

    root = tmp_path_factory.mktemp("filter")
    shutil.copytree(digits_run.root, root / "run")
    run = RunDir(root / "run")
    plant(run)
    weights = tiny_timm(root / "timm-tiny")
    seen, events = [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "load_images", recording(F.load_images, seen))
        mp.setattr(R, "load_images", recording(R.load_images, seen))
        out = filter_candidates(run, timm_cfg(weights), progress=lambda d, t, i: events.append((d, t)))
    return run, weights, dict(seen=seen, events=events, out=out)


@pytest.fixture
def planted_copy(planted, tmp_path):
    run, weights, _ = planted
    shutil.copytree(run.root, tmp_path / "run")
    return RunDir(tmp_path / "run"), weights


def timm_cfg(weights, **kw) -> FilterConfig:
    return FilterConfig(embedder="timm", embedder_path=str(weights), image_size=32, **kw)


def test_planted_candidates_rejected_with_right_reason(planted, monkeypatch):
    run, weights, rec = planted
    out, seen, events = rec["out"], rec["seen"], rec["events"]

    # the real data read were train images only: val and test never touched
    real = read_manifest(run.real)
    held_out = set(real.loc[real["split"] != "train", "uri"])
    assert seen and not held_out & set(seen)
    assert set(real.loc[real["split"] == "train", "uri"]) <= set(seen)
    assert events and events[-1][0] == events[-1][1]

    kind = out["kind"]
    assert (out.loc[kind == "wrong_class", "reason"] == "wrong_class").all()
    assert (out.loc[kind == "near_copy", "reason"] == "near_copy").all()
    copies = out[(out["parent_id"] == out.loc[kind == "duplicate", "parent_id"].iloc[0])]
    assert len(copies) == 3 and copies["accepted"].sum() == 1
    assert (copies.loc[~copies["accepted"], "reason"] == "duplicate").all()
    # accepted are good ones only; the small quota of OTHER is filled exactly, the rest over_quota
    assert set(kind[out["accepted"]]) <= {"good", "duplicate"}
    other = out[out["label"] == OTHER]
    assert other["accepted"].sum() == 5
    assert (other.loc[~other["accepted"], "reason"] == "over_quota").sum() >= 5
    kept_scores = other.loc[other["accepted"], "score"].min()
    assert kept_scores >= other.loc[other["reason"] == "over_quota", "score"].max()
    # a good tail candidate is mostly kept (the tiny random embedder may lose one or two)
    good_tail = out[(kind == "good") & (out["label"] == TAIL)]
    assert good_tail["accepted"].sum() >= 8

    # the written outputs
    disk = pd.read_parquet(run.filtered)
    for col in ("score_consistency", "score_fidelity", "score_novelty", "score_duplicate", "score", "accepted",
                "reason"):
        assert col in disk.columns
    assert disk["accepted"].dtype == bool and set(disk["reason"]) <= {
        "", "wrong_class", "low_fidelity", "near_copy", "duplicate", "over_quota"}
    report = json.loads((run.root / "filter" / "classes.json").read_text())
    row = {r["label"]: r for r in report["classes"]}[OTHER]
    assert (row["generated"], row["accepted"], row["need"]) == (12, 5, 5)
    assert (run.root / "filter" / "scores.png").stat().st_size > 10_000
    assert f"grid_{TAIL}_{TAIL}.png" in report["grids"]
    assert "| 9 |" in (run.root / "filter" / "classes.md").read_text()

    # a second call with the same inputs is not redone (no image is loaded again)
    import tailforge.eval.filter.stage as F

    again_seen: list[str] = []
    monkeypatch.setattr(F, "load_images", recording(F.load_images, again_seen))
    again = filter_candidates(run, timm_cfg(weights))
    assert not again_seen and again["accepted"].tolist() == out["accepted"].tolist()


def test_empty_class_is_a_warning_and_bad_input_is_a_clear_error(planted_copy, caplog):
    run, weights = planted_copy
    cands = read_manifest(run.candidates)
    # a class whose every candidate is wrong: one log line and the report, not an error nor a Python warning
    only_wrong = cands[(cands["kind"] == "wrong_class") | (cands["label"] == OTHER)]
    write_manifest(only_wrong, run.candidates)
    with caplog.at_level(logging.WARNING, logger="tailforge"), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        filter_candidates(run, timm_cfg(weights))
    assert [r.getMessage() for r in caplog.records if r.name.startswith("tailforge")] == [
        "filter: no candidate accepted for 1 class: class 9 (4 wrong_class)"]
    assert any("class 9" in w for w in json.loads((run.root / "filter" / "classes.json").read_text())["warnings"])

    bad = only_wrong.copy()
    bad.loc[bad.index[0], "label"] = 42
    write_manifest(bad, run.candidates)
    with pytest.raises(TailforgeError, match="unknown class label 42"):
        filter_candidates(run, timm_cfg(weights))
    write_manifest(only_wrong.iloc[:0], run.candidates)
    with pytest.raises(TailforgeError, match="no candidates"):
        filter_candidates(run, timm_cfg(weights))
    write_manifest(only_wrong, run.candidates)
    with pytest.raises(TailforgeError, match="embedder weights not found"):
        filter_candidates(run, FilterConfig(embedder="timm", embedder_path=str(run.root / "nowhere")))
    with pytest.raises(TailforgeError, match="the clip embedder needs local weights, and --embedder-path is not set"):
        filter_candidates(run, FilterConfig(embedder="clip"))
    rng = np.random.default_rng(0)
    with pytest.raises(TailforgeError, match="dimension 16 but the real ones 8"):
        score_arrays(rng.normal(size=(20, 8)), np.arange(20) % 2, rng.normal(size=(5, 16)), np.zeros(5), {0: 5},
                     FilterConfig())


def test_cli_filter_runs_and_reports_errors(planted_copy, capsys):
    from tailforge.flows.cli import main

    run, weights = planted_copy
    args = ["filter", "--run", str(run.root), "--embedder", "timm", "--image-size", "32"]
    assert main(args + ["--embedder-path", str(weights)]) == 0
    assert "candidates accepted" in capsys.readouterr().out
    assert main(args + ["--embedder-path", str(run.root / "missing")]) == 2
    err = capsys.readouterr().err
    assert "error: timm embedder weights not found" in err and "Traceback" not in err


def test_cli_output_is_plain_lines_without_python_warnings(planted_copy, capfd):
    """A stage through the CLI with a class left empty: one grouped `warning:` line on stderr, no Python
    warning (no `UserWarning:` with a source path, no line of code), from tailforge or a library it calls."""
    from tailforge.flows.cli import main

    run, weights = planted_copy
    cands = read_manifest(run.candidates)
    write_manifest(cands[(cands["kind"] == "wrong_class") | (cands["label"] == OTHER)], run.candidates)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["filter", "--run", str(run.root), "--embedder", "timm", "--embedder-path", str(weights),
                   "--image-size", "32"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # off by default
    shown = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
             if not issubclass(w.category, hidden)]
    assert not shown, shown
    assert not re.search(r"\w+Warning: |\.py:\d+|Traceback|write_report\(", out + err), out + err
    assert err.splitlines() == ["warning: filter: no candidate accepted for 1 class: class 9 (4 wrong_class)"]
    assert "candidates accepted" in out


def test_clip_embedder_from_a_local_folder(planted_copy):
    """A tiny CLIP vision model saved with save_pretrained and loaded through the user code path."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from tailforge.eval.filter.embedders import ClipEmbedder

    run, _ = planted_copy
    conf = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            image_size=16, patch_size=4, projection_dim=24)
    import torch

    torch.manual_seed(0)
    folder = run.root.parent / "clip-tiny"
    CLIPVisionModelWithProjection(conf).save_pretrained(folder)
    vec = ClipEmbedder(str(folder), batch_size=8).embed(np.random.default_rng(0).integers(0, 255, (10, 8, 8, 1),
                                                                                          dtype=np.uint8))
    assert vec.shape == (10, 24) and np.allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-5)
    out = filter_candidates(run, FilterConfig(embedder="clip", embedder_path=str(folder)))
    assert (out.loc[out["kind"] == "near_copy", "reason"] != "").all()
    assert out.loc[out["kind"] == "duplicate", "accepted"].sum() <= 1


def test_featdict_candidates_scored_in_their_classifier_space(digits_run_copy):
    """Feature candidates are compared with real features of the classifier named in feature_model."""
    from tailforge import train

    run = digits_run_copy
    cfg = train.TrainConfig(model="tiny", width=8, epochs=2, batch_size=64, lr=0.05, hflip=False, device="cpu",
                            augment="none")
    train.fit(run, cfg, "baseline")
    model, meta = train.load_model(run.model_dir("baseline"))
    real, allx, ally, pool = _pool(run)
    good = pool[ally[pool] == OTHER][:10]
    wrong = pool[ally[pool] == 1][:4]
    tr = real[(real["split"] == "train") & (real["label"] == OTHER)]
    copy_idx = [int(u.split("#")[1]) for u in tr["uri"][:2]]
    feats = train.embed(model, meta, allx[np.r_[good, wrong, copy_idx]]).astype(np.float32)
    feats[-2:] += np.random.default_rng(0).normal(0, 1e-4, feats[-2:].shape).astype(np.float32)
    shard = run.root / "synthetic" / "featdict" / "s0"
    shard.mkdir(parents=True)
    np.save(shard / "features.npy", feats)
    kinds = ["good"] * len(good) + ["wrong_class"] * len(wrong) + ["near_copy"] * 2
    df = pd.DataFrame(dict(sample_id=[f"fd-{i}" for i in range(len(feats))],
                           uri=[f"synthetic/featdict/s0/features.npy#{i}" for i in range(len(feats))],
                           label=OTHER, class_name=str(OTHER), split="train", source="featdict",
                           generator="featdict", seed=0, prompt="", parent_id="", shard="s0",
                           feature_model="baseline", kind=kinds))
    write_manifest(df, run.candidates)
    write_json(run.plan, {"classes": [dict(label=c, class_name=str(c), have=0, need=4 if c == OTHER else 0,
                                           generate=0) for c in range(10)]})
    out = filter_candidates(run, FilterConfig(feature_rules="all"))  # every image rule, score order
    assert (out.loc[out["kind"] == "wrong_class", "reason"] == "wrong_class").all()
    assert (out.loc[out["kind"] == "near_copy", "reason"] == "near_copy").all()
    assert out["accepted"].sum() == 4 and set(out.loc[out["accepted"], "kind"]) == {"good"}
    assert (out["space"] == "features:baseline").all()
    # the default guard rules: near copies still go; the quota is filled in a seeded random order
    # (class consistency is not judged in feature space: it lost to random on val), from real-looking rows
    guard = filter_candidates(run, FilterConfig())
    assert (guard.loc[guard["kind"] == "near_copy", "reason"] == "near_copy").all()
    assert guard["accepted"].sum() == 4 and not guard.loc[guard["accepted"], "kind"].eq("near_copy").any()
    assert guard["accepted"].tolist() == filter_candidates(run, FilterConfig(grid_samples=7))["accepted"].tolist()
    noise = feats.copy()
    noise[:4] = np.random.default_rng(1).uniform(0, 50 * np.abs(feats).max(), noise[:4].shape)  # off the manifold
    np.save(shard / "features.npy", noise)
    planted = filter_candidates(run, FilterConfig())
    assert (planted["reason"].iloc[:4] == "unrealistic").all()

    np.save(shard / "features.npy", np.zeros((len(feats), meta["feature_dim"] + 3), np.float32))
    with pytest.raises(TailforgeError, match="dimension"):
        filter_candidates(run, FilterConfig())


def test_faiss_matches_numpy_brute_force_and_ivf_past_threshold():
    rng = np.random.default_rng(0)
    centres = l2_normalize(rng.normal(size=(5, 32)))
    y = rng.integers(0, 5, 3000)
    real = l2_normalize(centres[y] + 0.3 * rng.normal(size=(3000, 32)) / np.sqrt(32))
    yc = rng.integers(0, 5, 400)
    cand = l2_normalize(centres[yc] + 0.3 * rng.normal(size=(400, 32)) / np.sqrt(32))
    cand[:20] = real[:20]  # copies
    yc[:20] = y[:20]
    yc[20:40] = (yc[20:40] + 1) % 5  # wrong labels
    quotas = {c: 50 for c in range(5)}
    cfg = FilterConfig()
    a, _ = score_arrays(real, y, cand, yc, quotas, cfg, search=FaissSearch())
    b, _ = score_arrays(real, y, cand, yc, quotas, cfg, search=NumpySearch())
    assert (a["reason"] == b["reason"]).all() and np.allclose(a["score"], b["score"], atol=1e-4)
    copies = a["reason"][:20]  # a copy of an atypical real point may fail fidelity first: still rejected
    assert (copies != "").all() and (copies == "near_copy").mean() >= 0.8
    assert (a["reason"][20:40] == "wrong_class").all()
    assert a.groupby(yc)["accepted"].sum().max() <= 50
    ivf, _ = score_arrays(real, y, cand, yc, quotas, cfg, search=FaissSearch(ivf_threshold=1000, nprobe=8))
    assert (ivf["reason"] == a["reason"]).mean() > 0.95


def test_realism_planted_noise_blank_and_wrong_class_fail_for_every_class(digits_run_copy):
    """The default filter (the baseline classifier's space) never accepts noise, blank or another class's
    images, for any class, the rarest included, while it keeps real-looking images of the class."""
    from tailforge import train

    run = digits_run_copy
    train.fit(run, train.TrainConfig(model="tiny", width=8, epochs=3, batch_size=64, lr=0.05, hflip=False,
                                     device="cpu"), "baseline")
    real, allx, ally, pool = _pool(run)
    info = run.dataset_info()
    counts = np.bincount(real[real["split"] == "train"]["label"], minlength=10)
    planted = PlantedCandidates(run, 0)
    rng = np.random.default_rng(0)
    for c in range(10):
        for i in pool[ally[pool] == c][:3]:
            planted.add(allx[i], c, "good", f"pool-{i}")
        for k in range(3):
            planted.add(rng.integers(0, 17, allx[0].shape).astype(allx.dtype), c, "noise", "")
        planted.add(np.zeros_like(allx[0]), c, "blank", "")
        planted.add(np.full_like(allx[0], allx.max()), c, "blank", "")
        for i in pool[ally[pool] == (c + 5) % 10][:2]:
            planted.add(allx[i], c, "wrong_class", f"pool-{i}")
    df = planted.write()
    write_json(run.plan, {"target": "planted", "overgen": 2.0, "total": len(df), "classes": [
        dict(label=c, class_name=info["class_names"][c], have=int(counts[c]), need=10, generate=10)
        for c in range(10)]})
    out = filter_candidates(run, FilterConfig())
    bad = out[out["kind"] != "good"]
    assert not bad["accepted"].any(), bad.loc[bad["accepted"], ["label", "kind", "reason"]]
    assert set(bad.loc[bad["kind"] == "blank", "reason"]) == {"blank"}
    assert set(bad.loc[bad["kind"] == "noise", "reason"]) <= {"unrealistic", "wrong_class", "low_fidelity"}
    rarest = int(np.argmin(counts))
    assert not out[(out["label"] == rarest) & (out["kind"] != "good")]["accepted"].any()
    assert out.loc[out["kind"] == "good", "accepted"].mean() >= 0.5  # it still keeps real-looking ones
