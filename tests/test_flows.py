"""Flows: the benchmark end to end on tiny digits, caching, resume after an interrupted generation,
and clear errors for bad configs (before any work starts).

Prefect runs against a temporary database (``prefect_test_harness``) with a temporary PREFECT_HOME.
"""
from __future__ import annotations

import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="tailforge-test-prefect-")  # before Prefect loads
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from tailforge.data import TailforgeError  # noqa: E402
from tailforge.flows.cli import main  # noqa: E402
from tailforge.flows.config import check_run_folder, load_config, parse_set, write_config  # noqa: E402

# tiny models everywhere: the whole benchmark takes seconds of compute
TINY = {
    "data": {"dataset": "digits", "imbalance": 10, "seed": 0},
    "plan": {"target": "balance", "overgen": 1.2, "budget": 40},
    "generate": {"generator": "ddpm", "shard_size": 8, "ddpm": {"ddpm_preset": "tiny", "ddpm_train_steps": 10,
                                                                "ddpm_sample_steps": 2}},
    "train": {"model": "tiny", "width": 8, "epochs": 2, "batch_size": 128, "lr": 0.05, "hflip": False},
    "recipe": {"epochs": 2},
    "evaluate": {"plots": False},
}


def tiny_config(run: Path, **sections):
    over = yaml.safe_load(yaml.safe_dump(TINY))
    for k, v in sections.items():
        over.setdefault(k, {}).update(v)
    over["run"] = str(run)
    return load_config(None, over)


@pytest.fixture(scope="module")
def harness():
    from tailforge.flows import prefect_env

    prefect_env()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def run_benchmark(cfg, which="benchmark"):
    from tailforge.flows.flows import FLOWS, make_runner

    state = FLOWS[which].with_options(task_runner=make_runner(cfg.runner))(config=cfg, return_state=True)
    return state


def task_states(flow_run_id) -> dict[str, str]:
    """task run name -> state name, for one flow run (read back from the API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    import time

    for _ in range(40):  # task states reach the API as events: wait until every one is final
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if all(t.state is not None and t.state.is_final() for t in runs):
            break
        time.sleep(0.5)
    return {t.name: t.state.name if t.state is not None else "(no state yet)" for t in runs}


def artifacts_of(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.type for a in arts if a.key}


def digest(run: Path) -> dict[str, str]:
    """sample_id -> hash of the sample's image bytes (decoded pixels), from candidates.parquet."""
    from tailforge.data import load_images

    df = pd.read_parquet(run / "candidates.parquet")
    imgs = load_images(df["uri"], run, 1, (8, 8))
    return {sid: hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for sid, im in zip(df["sample_id"], imgs)}


@pytest.fixture(scope="module")
def finished(harness, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("flows") / "digits-bench")
    state = run_benchmark(cfg)
    assert state.is_completed(), state.message
    return cfg, state


# --------------------------------------------------------------------------- end to end and caching

def test_benchmark_end_to_end_writes_run_folder_and_artifacts(finished):
    cfg, state = finished
    run = Path(cfg.run)
    out = state.result()
    for rel in ("config.yaml", "real.parquet", "counts.json", "counts.png", "plan.json", "candidates.parquet",
                "filtered.parquet", "models/baseline/model.safetensors", "models/rebalanced/model.safetensors",
                "models/real-only/model.safetensors", "eval/baseline-test.json", "eval/real-only-test.json",
                "eval/rebalanced-test.json", "eval/report.md", "eval/compare.json", "models/oracle/model.safetensors",
                "eval/oracle-test.json", "eval/real-only-test-pred.npy", "sources/oracle/filtered.parquet"):
        assert (run / rel).exists(), rel
    # config.yaml is the resolved config: it loads back to the same model
    assert load_config(run / "config.yaml") == cfg
    plan = yaml.safe_load((run / "plan.json").read_text())
    cands = pd.read_parquet(run / "candidates.parquet")
    assert len(cands) == plan["total"] > 0 and not cands["sample_id"].duplicated().any()
    # the rebalanced model trained on real + accepted synthetic rows, the baseline on real only
    filt = pd.read_parquet(run / "filtered.parquet")
    assert set(filt["sample_id"]) == set(cands["sample_id"])
    report = (run / "eval" / "report.md").read_text()
    assert out["report"].endswith("report.md") and "baseline" in report
    # the report leads with room and capture: the oracle arm (the long tail's held-back real images) against
    # real-only, and rebalanced against real-only, each decided by a paired bootstrap interval
    assert report.startswith("## Room and capture (test split"), report[:200]
    assert "**Room:**" in report and ("Synthetic data helped" in report or "did not help" in report)
    room = json.loads((run / "eval" / "compare.json").read_text())["room"]["sets"]["balanced"]
    assert room["room"]["low"] <= room["room"]["value"] <= room["room"]["high"]
    assert set(out["metrics"]) == {"baseline", "real-only", "rebalanced", "oracle"}
    # the oracle's candidates are held-back real train images only, through the same plan and filter
    oc = pd.read_parquet(run / "sources" / "oracle" / "candidates.parquet")
    assert len(oc) == plan["total"] and (oc["source"] == "oracle").all() and oc["parent_id"].notna().all()
    real = pd.read_parquet(run / "real.parquet")
    assert not oc["uri"].isin(real["uri"]).any() and oc["uri"].str.startswith("data/all.npy#").all()
    of = pd.read_parquet(run / "sources" / "oracle" / "filtered.parquet")
    assert 0 < of["accepted"].sum() <= sum(q["need"] for q in plan["classes"])
    # real-only and rebalanced: the same recipe (cRT on a class-balanced backbone), only the data differ;
    # with an image generator (ddpm here) the rebalanced arm's backbone also trains on its synthetic images
    cfgs = {m: json.loads((run / "models" / m / "config.json").read_text())["train"]
            for m in ("real-only", "rebalanced", "baseline", "backbone", "backbone-rebalanced", "oracle",
                      "backbone-oracle")}
    metas = {m: json.loads((run / "models" / m / "config.json").read_text())["meta"] for m in cfgs}
    # the oracle arm: the rebalanced arm's recipe and budget, on the held-back real images
    assert {k: v for k, v in cfgs["oracle"].items() if k not in ("base", "synthetic_source")} == \
        {k: v for k, v in cfgs["rebalanced"].items() if k not in ("base", "synthetic_source")}
    assert cfgs["oracle"]["synthetic_source"] == "oracle" and cfgs["oracle"]["base"] == "backbone-oracle"
    assert metas["oracle"]["steps_per_epoch"] == metas["rebalanced"]["steps_per_epoch"] == \
        metas["real-only"]["steps_per_epoch"]
    assert metas["backbone-oracle"]["steps_per_epoch"] == metas["backbone"]["steps_per_epoch"]
    ro, rb = cfgs["real-only"], cfgs["rebalanced"]
    assert ro["stage"] == rb["stage"] == "crt" and (ro["base"], rb["base"]) == ("backbone", "backbone-rebalanced")
    assert (ro["synthetic"], rb["synthetic"]) == ("none", "filtered")
    same = lambda c: {k: v for k, v in c.items() if k not in ("synthetic", "base")}  # noqa: E731
    assert same(ro) == same(rb) and same(cfgs["backbone"]) == same(cfgs["backbone-rebalanced"])
    bb, base = cfgs["backbone"], cfgs["baseline"]
    assert (bb["sampler"], bb["epoch_samples"], bb["synthetic"]) == ("class_balanced", "real", "none")
    assert cfgs["backbone-rebalanced"]["synthetic"] == "filtered"
    assert {k: v for k, v in bb.items() if k not in ("sampler", "epoch_samples")} == \
        {k: v for k, v in base.items() if k not in ("sampler", "epoch_samples")}  # otherwise the baseline's
    assert all(0 <= m["top1"] <= 1 for m in out["metrics"].values())

    arts = artifacts_of(state.state_details.flow_run_id)
    slug = "digits-bench"
    for key, kind in {"counts": "table", "histogram": "markdown", "plan": "table", "ddpm-training": "progress",
                      "generation": "progress", "candidates": "table", "filter": "table",
                      "train-baseline": "progress", "train-rebalanced": "progress", "train-real-only": "progress",
                      "metrics-baseline-test": "table", "metrics-rebalanced-test": "table",
                      "metrics-real-only-test": "table",
                      "report": "markdown"}.items():
        assert arts.get(f"{slug}-{key}") == kind, (key, sorted(arts))
    tasks = task_states(state.state_details.flow_run_id)
    from tailforge import gen
    from tailforge.data import RunDir

    units = gen.plan_units(gen.Plan.load(RunDir(run)), "ddpm", cfg.generate.shard_size)  # one task per unit
    assert sum(n.startswith("unit ") for n in tasks) == len(units) < len(cands["shard"].unique())
    assert all(s == "Completed" for s in tasks.values()), tasks


def test_room_plan_measures_the_learning_curve_then_splits_the_budget_by_it(harness, tmp_path):
    """plan.target room: the flow measures each class's learning curve first (headroom's thinned recipe), then
    splits exactly the budget over the classes below the largest, and says how in one line."""
    from tailforge.data import read_json

    cfg = tiny_config(tmp_path / "room", plan={"target": "room", "budget": 60})
    state = run_benchmark(cfg, "rebalance")
    assert state.is_completed(), state.message
    plan = read_json(Path(cfg.run) / "plan.json")
    hr = read_json(Path(cfg.run) / "eval" / "headroom.json")
    counts = [q["have"] for q in plan["classes"]]
    assert plan["target"] == "room" and plan["total"] == 60
    assert plan["curve_classes"] == [i for i, n in enumerate(counts) if n < max(counts)]
    assert all(q["have"] + q["need"] <= max(counts) for q in plan["classes"])
    assert "room plan:" in plan["note"] and "\n" not in plan["note"]
    assert [c["curve"] for c in hr["classes"]] == [n < max(counts) for n in counts]
    assert (Path(cfg.run) / "models" / "headroom-f50" / "model.safetensors").exists()


def test_real_only_heads_are_chosen_on_val_beside_the_base_network(harness, tmp_path):
    """recipe.candidates: each head trained on the base's frozen features, the VAL-best named the control of every
    arm; the base network's own head is scored too, and where it is stronger on VAL the report measures
    rebalanced against it as well."""
    from tailforge.data import read_json

    cfg = tiny_config(tmp_path / "heads", recipe={"stage": "crt", "candidates": ["crt", "la"]},
                      generate={"generator": "featcov", "feature_model": "backbone"})
    state = run_benchmark(cfg)
    assert state.is_completed(), state.message
    run = Path(cfg.run)
    cand = read_json(run / "eval" / "candidates.json")
    assert set(cand["scores"]) == {"crt", "la"} and cand["scores"][cand["chosen"]] == max(cand["scores"].values())
    assert all((run / "models" / f"real-only-{h}" / "model.safetensors").exists() for h in ("crt", "la"))
    ref = cand["reference"]  # the frozen base: the default recipe's class-balanced backbone
    assert ref["model"] == cfg.crt_base == "backbone"
    assert ref["above"] == (ref["val_balanced_acc"] > max(cand["scores"].values()))
    assert ref["val_balanced_acc"] == read_json(run / "models" / "backbone" / "best.json")["val_balanced_acc"]
    report = (run / "eval" / "report.md").read_text()
    assert f"**Real-only control:** the head `{cand['chosen']}`" in report and "own head (`backbone`)" in report
    assert ("**Against the strongest real-only model on VAL:**" in report) == ref["above"]
    assert (run / "eval" / "backbone-test.json").exists() == ref["above"]  # evaluated where it is the control
    assert read_json(run / "models" / "real-only" / "config.json")["identity"] == \
        read_json(run / "models" / f"real-only-{cand['chosen']}" / "config.json")["identity"]


def test_second_run_is_served_from_the_run_folder(finished):
    cfg, first = finished
    run = Path(cfg.run)
    watched = ["candidates.parquet", "filtered.parquet", "models/rebalanced/model.safetensors", "eval/report.md"]
    before = {p: (run / p).stat().st_mtime_ns for p in watched}
    state = run_benchmark(cfg)
    assert state.is_completed()
    tasks = task_states(state.state_details.flow_run_id)
    assert tasks and all(s == "Cached" for s in tasks.values()), tasks
    assert {p: (run / p).stat().st_mtime_ns for p in watched} == before
    same = [json.dumps(x.result()["metrics"], sort_keys=True) for x in (state, first)]  # NaN-safe equality
    assert same[0] == same[1]


def test_interrupted_generation_resumes_to_the_same_samples(finished, tmp_path, monkeypatch):
    """The first shard fails once (retried, then done); every later shard fails on every retry, which
    stops the flow mid-generation. The re-run generates only the missing shards and ends with exactly
    the candidates of the uninterrupted run, none duplicated."""
    import shutil

    from tailforge import gen
    import tailforge.gen.ddpm
    from tailforge.data import RunDir

    cfg_done, _ = finished
    cfg = tiny_config(tmp_path / "digits-bench")
    # reuse the trained diffusion model (same data, seed and preset): the test is about the shards
    model = Path(cfg_done.run) / "synthetic" / "ddpm" / "model"
    shutil.copytree(model, Path(cfg.run) / "synthetic" / "ddpm" / "model")
    real_run_shard = gen.ddpm.DDPMGenerator.run_shard
    calls = {"n": 0}

    def flaky(self, shard, out_dir):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("transient failure of the first attempt")
        if calls["n"] > 2:
            raise RuntimeError("injected failure after the first shard")
        return real_run_shard(self, shard, out_dir)

    monkeypatch.setattr(gen.ddpm.DDPMGenerator, "run_shard", flaky)
    state = run_benchmark(cfg, "rebalance")
    assert state.is_failed()
    run = Path(cfg.run)
    units = gen.plan_units(gen.Plan.load(RunDir(run)), "ddpm", cfg.generate.shard_size)
    # a unit is written whole or not at all: the first unit is finished only if its one shard is all of it
    finished = list((run / "synthetic" / "ddpm").glob("c*/rows.parquet"))
    assert len(finished) == (len(units[0].shards) == 1) and not (run / "candidates.parquet").exists()
    assert not list((run / "synthetic" / "ddpm").glob(".tmp-*"))  # failed units left no partial folder
    # work units (consecutive shards, about shard_size samples): the first unit's first shard failed once,
    # then was done on the retry, where its next shard (if any) failed on every remaining attempt; each
    # later unit failed at its first shard 1 + retries times, and the flow failed
    r = cfg.runner.shard_retries
    assert len(units) >= 2 and len(units) < len(gen.make_shards(gen.Plan.load(RunDir(run)), "ddpm", 8))
    assert calls["n"] == 2 + (r if len(units[0].shards) > 1 else 0) + (len(units) - 1) * (1 + r)

    monkeypatch.setattr(gen.ddpm.DDPMGenerator, "run_shard", real_run_shard)
    state = run_benchmark(cfg, "rebalance")
    assert state.is_completed(), state.message
    tasks = task_states(state.state_details.flow_run_id)
    unit_states = [s for n, s in tasks.items() if n.startswith("unit ")]
    first_done = len(units[0].shards) == 1  # the first unit's first shard was finished before the failure
    assert len(unit_states) == len(units) and unit_states.count("Cached") == int(first_done)
    assert unit_states.count("Completed") == len(units) - int(first_done)
    assert tasks["measure " + cfg.run] == "Cached" and tasks["plan " + cfg.run] == "Cached"
    again = pd.read_parquet(run / "candidates.parquet")
    assert not again["sample_id"].duplicated().any()
    assert digest(run) == digest(Path(cfg_done.run))


# --------------------------------------------------------------------------- bad input: clear errors, no work

def test_unknown_keys_name_the_nearest_valid_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  ddpm:\n    ddpm_presett: tiny\n")
    with pytest.raises(TailforgeError, match=r"unknown key 'generate\.ddpm\.ddpm_presett'.*did you mean 'ddpm_preset'"):
        load_config(bad)
    bad.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(TailforgeError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(bad)
    with pytest.raises(TailforgeError, match=r"unknown key 'train\.epoch'.*did you mean 'epochs'"):
        load_config(None, parse_set(["train.epoch=3"]))
    with pytest.raises(TailforgeError, match="key.path=value"):
        parse_set(["train.epochs"])
    with pytest.raises(TailforgeError, match=r"--set 'train\.epochs=\[': the value is not valid YAML.*quote it"):
        parse_set(["train.epochs=["])
    with pytest.raises(TailforgeError, match=r"data\.imbalance.*>= 1"):
        load_config(None, {"data": {"imbalance": 0.5}})


def test_cli_bad_yaml_is_one_line_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "never"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [\n")
    assert main(["run", "--config", str(bad), "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML at line 2" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    bad.write_text("- just\n- a list\n")
    assert main(["run", "--config", str(bad), "--run", str(run)]) == 2
    assert "mapping" in capsys.readouterr().err
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")  # a binary file passed by mistake
    assert main(["run", "--config", str(bad), "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["run", "--config", str(tmp_path), "--run", str(run)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not run.exists()


def test_config_contradicting_the_run_folder_is_refused_before_work(digits_run_copy, capsys):
    run = digits_run_copy.root
    cfg = tiny_config(run)
    write_config(cfg)
    check_run_folder(cfg)  # the same config: fine
    check_run_folder(tiny_config(run, train={"epochs": 5}))  # no model trained yet: train may change
    files = sorted(p.name for p in run.iterdir())
    assert main(["run", "--run", str(run), "--set", "data.imbalance=20", "--set", "train.model=tiny"]) == 2
    err = capsys.readouterr().err
    assert "contradicts run folder" in err and "data.imbalance: 10.0 -> 20.0" in err and "(fix:" in err
    assert sorted(p.name for p in run.iterdir()) == files  # nothing written, no stage ran
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["imbalance"] == 10


def test_show_config_prints_the_embedded_default(capsys):
    assert main(["run", "--show-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["data"]["dataset"] == "digits" and shown["generate"]["generator"] == "featcov"
    assert shown["recipe"]["stage"] == "crt" and shown["generate"]["ddpm"]["ddpm_preset"] == "fast"
    assert shown["train"]["synthetic"] == "none"  # the rebalanced model switches it to 'filtered'
