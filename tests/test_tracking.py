"""Tracking: TensorBoard event files of every training (models/<name>/tb/, sealed with the model folder),
eval/tracking.json and the report's line, MLflow logged from the run folder (parent run, one child run per
trained model), resumable; and the benchmark flow end to end with ``track.mlflow=local`` (slow).

Read back with the readers users have: TensorBoard's ``EventAccumulator`` and ``mlflow.search_runs``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from tailforge import train
from tailforge.data import RunDir, TailforgeError
from tailforge.data.integrity import check_folder
from tailforge.eval import track

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(model="tiny", width=8, epochs=3, batch_size=64, lr=0.05, hflip=False)


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def log_rows(model_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (model_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(digits_run, tmp_path_factory):
    """A copy of the digits run with one model trained (3 epochs, TensorBoard on by default) and evaluated."""
    import shutil

    from tailforge import eval as ev
    from tailforge.eval.config import EvalConfig

    root = tmp_path_factory.mktemp("track") / "digits"
    shutil.copytree(digits_run.root, root)
    run = RunDir(root)
    train.fit(run, train.TrainConfig(**FAST), "baseline")
    ev.evaluate(run, "baseline", "test", cfg=EvalConfig(plots=False))
    return run


# --------------------------------------------------------------------------- TensorBoard

def test_every_epoch_is_in_the_event_files_sealed_with_the_model(trained):
    d = trained.model_dir("baseline")
    ea = events(d / "tb")
    rows = log_rows(d)
    for tag, key in (("val/balanced_acc", "val_balanced_acc"), ("val/top1", "val_top1"),
                     ("train/loss", "train_loss"), ("train/lr", "lr")):
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in got] == [1, 2, 3], tag
        np.testing.assert_allclose([v for _, v in got], [r[key] for r in rows], rtol=1e-6)
    best = json.loads((d / "best.json").read_text())
    (img,) = ea.Images("val/confusion_matrix")  # once, at the selected epoch
    assert img.step == best["epoch"] and img.width > 100 and img.height > 100
    # the event files are in the model folder's record: intact on a check, damage is seen
    assert check_folder(d) == []
    record = json.loads((d / ".integrity.json").read_text())["files"]
    assert any(k.startswith("tb/events.out.tfevents") for k in record)
    assert not (trained.root / "models" / ".work-baseline").exists()


def test_confusion_image_rows_are_true_classes_from_head_to_tail():
    from tailforge.train.tb import MAX_CLASSES_SHOWN, confusion_image

    counts = [5, 50, 20]  # head: class 1, then 2, then 0
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 0])  # class 0: half right; 1: right; 2: always "0"
    img, order = confusion_image(y, pred, counts, side=30)
    assert list(order) == [1, 2, 0] and img.shape == (30, 30, 3) and img.dtype == np.uint8
    cell = lambda r, c: img[r * 10 + 5, c * 10 + 5].astype(int)  # noqa: E731  (row r, column c, 10 px cells)
    white, blue = [247, 251, 255], [8, 48, 107]
    assert cell(0, 0).tolist() == blue and cell(1, 2).tolist() == blue  # 1 -> 1, 2 -> 0
    assert cell(1, 1).tolist() == white and cell(0, 2).tolist() == white
    assert cell(2, 2).tolist() == cell(2, 0).tolist() == [128, 150, 181]  # 0: half right, half "1"
    many = np.arange(200)
    img, order = confusion_image(many % 100, many % 100, list(range(100, 0, -1)))  # class 99 rarest
    assert len(order) == MAX_CLASSES_SHOWN and order[-1] == 99 and set(order) == set(range(36, 100))


def test_tensorboard_off_writes_no_event_files_and_keeps_the_identity(digits_run_copy):
    on, off = train.TrainConfig(**FAST), train.TrainConfig(**FAST, tensorboard=False)
    assert on.identity() == off.identity()  # a switch of the writing, not of the weights
    d = train.fit(digits_run_copy, off.model_copy(update={"epochs": 1}), "quiet")
    assert not (d / "tb").exists() and (d / "model.safetensors").exists()
    assert check_folder(d) == []


def test_event_files_need_neither_tensorboard_nor_protobuf_to_write(digits_run_copy, monkeypatch):
    for mod in ("tensorboard", "torch.utils.tensorboard", "google.protobuf"):
        monkeypatch.setitem(sys.modules, mod, None)  # import -> ImportError
    d = train.fit(digits_run_copy, train.TrainConfig(**{**FAST, "epochs": 1}), "plain")
    monkeypatch.undo()
    assert [e.step for e in events(d / "tb").Scalars("val/balanced_acc")] == [1]


def test_the_encoding_is_what_protobuf_and_tfrecord_write():
    from tensorboard.compat.proto import event_pb2, summary_pb2

    from tailforge.train import tb

    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    s = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="val/top1", simple_value=0.75),
                                   summary_pb2.Summary.Value(tag="x", simple_value=-2.5)])
    want = event_pb2.Event(wall_time=1.5, step=300, summary=s).SerializeToString()
    got = tb.event(300, summary=tb.scalar_value("val/top1", 0.75) + tb.scalar_value("x", -2.5), wall_time=1.5)
    assert got == want
    start = event_pb2.Event(wall_time=2.0, step=4, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
    assert tb.event(4, session_start=True, wall_time=2.0) == start.SerializeToString()
    img = summary_pb2.Summary.Image(height=3, width=5, colorspace=3, encoded_image_string=b"\x89PNG")
    want = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="im", image=img)]).SerializeToString()
    assert tb.image_value("im", b"\x89PNG", 3, 5) == want
    parsed = summary_pb2.Summary.FromString(tb.text_value("t", "a, b"))
    assert parsed.value[0].metadata.plugin_data.plugin_name == "text"
    assert parsed.value[0].tensor.string_val == [b"a, b"] and parsed.value[0].tensor.dtype == 7


def test_a_resumed_training_has_each_epoch_once(digits_run_copy):
    run = digits_run_copy
    cfg = train.TrainConfig(**FAST)

    def stop_after_second_epoch(done, total, info):
        if info.get("event") == "epoch" and info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.fit(run, cfg, "cut", progress=stop_after_second_epoch)
    work = run.root / "models" / ".work-cut" / "tb"
    assert [e.step for e in events(work).Scalars("val/balanced_acc")] == [1, 2]  # visible while it trains
    d = train.fit(run, cfg, "cut")
    ea = events(d / "tb")
    got = [(e.step, e.value) for e in ea.Scalars("val/balanced_acc")]
    assert [s for s, _ in got] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in got], [r["val_balanced_acc"] for r in log_rows(d)], rtol=1e-6)


def test_the_run_switch_turns_tensorboard_off_for_every_arm():
    from tailforge.flows.config import load_config

    cfg = load_config(None, {"track": {"tensorboard": False}})
    arms = [cfg.baseline_train(), cfg.backbone_train(), cfg.real_only_train(), cfg.rebalanced_train()]
    assert [a.tensorboard for a in arms] == [False] * 4
    assert all(a.tensorboard for a in (load_config().baseline_train(), load_config().rebalanced_train()))
    again = load_config(None, json.loads(json.dumps(cfg.model_dump(mode="json"))))  # config.yaml round trip
    assert again == cfg


# --------------------------------------------------------------------------- tracking.json, the report, config

def test_tracking_json_lists_the_folders_and_the_report_names_them(trained):
    from tailforge import eval as ev

    uri = track.tracking_uri(trained, "local")
    assert uri == f"sqlite:///{(trained.root / 'mlruns' / 'mlflow.db').resolve()}"
    assert track.tracking_uri(trained, None) is None and track.tracking_uri(trained, "http://h:5000") == "http://h:5000"
    path = track.write_tracking(trained, uri)
    t = json.loads(path.read_text())
    assert t == {"mlflow": uri, "tensorboard": [str(trained.model_dir("baseline").resolve() / "tb")]}
    mtime = path.stat().st_mtime_ns
    track.write_tracking(trained, uri)
    assert path.stat().st_mtime_ns == mtime  # unchanged content: not rewritten (the report's stamp holds it)
    out = ev.compare(trained, ["baseline"], split="test", out_dir=trained.eval_dir)
    last = out["markdown"].strip().splitlines()[-1]
    assert last.startswith("Training curves: TensorBoard, 1 model(s)") and uri in last
    assert (trained.eval_dir / "report.md").read_text().strip().endswith(last)


def test_track_config_is_checked():
    from tailforge.flows.config import load_config

    assert load_config(None, {"track": {"mlflow": "local"}}).track.mlflow == "local"
    assert load_config(None, {"track": {"mlflow": None}}).track.mlflow is None
    with pytest.raises(TailforgeError, match=r"track\.mlflow: 'mlruns' is not an MLflow tracking URI.*local"):
        load_config(None, {"track": {"mlflow": "mlruns"}})
    with pytest.raises(TailforgeError, match=r"unknown key 'track\.mlfow'"):
        load_config(None, {"track": {"mlfow": "local"}})


def test_mlflow_missing_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TailforgeError) as err:
        track.require_mlflow()
    assert "MLflow is not installed" in err.value.problem and "pip install 'tailforge[track]'" in err.value.hint


def test_flatten_cuts_long_values():
    flat = track.flatten({"a": {"b": 1, "c": [1, 2]}, "long": "x" * 10_000, "none": None})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "long": "x" * 497 + "...", "none": "None"}


# --------------------------------------------------------------------------- MLflow

def test_mlflow_parent_and_child_runs_from_the_run_folder_resumable(trained, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {"run": str(trained.root), "train": {"epochs": 3, "notes": "y" * 2000}}
    out = track.log_mlflow(trained, uri, config, experiment="t")
    assert not out["cached"] and set(out["children"]) == {"baseline"}
    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(experiment_names=["t"])
    assert len(df) == 2
    parent = df[df["tags.mlflow.parentRunId"].isna()].iloc[0]
    child = df[df["tags.mlflow.parentRunId"] == out["parent"]].iloc[0]
    assert parent["run_id"] == out["parent"] and child["tags.mlflow.runName"] == "baseline"
    test_json = json.loads((trained.eval_dir / "baseline-test.json").read_text())
    assert child["metrics.test_balanced_acc"] == pytest.approx(test_json["balanced_acc"])
    assert parent["metrics.baseline.test_balanced_acc"] == pytest.approx(test_json["balanced_acc"])
    assert parent["params.train.epochs"] == "3" and len(parent["params.train.notes"]) == 500
    client = mlflow.MlflowClient(uri)
    hist = client.get_metric_history(out["children"]["baseline"], "val_balanced_acc")
    rows = log_rows(trained.model_dir("baseline"))
    assert sorted((m.step, m.value) for m in hist) == [(r["epoch"], pytest.approx(r["val_balanced_acc"])) for r in rows]
    arts = {a.path for a in client.list_artifacts(out["parent"])} | \
        {a.path for a in client.list_artifacts(out["parent"], "eval")}
    assert {"counts.json", "eval/report.md", "eval/tracking.json"} <= arts
    assert (tmp_path / "artifacts" / out["parent"] / "artifacts" / "eval" / "report.md").is_file()  # next to the db
    # a second call finds the finished parent with the same content: nothing new
    again = track.log_mlflow(trained, uri, config, experiment="t")
    assert again["cached"] and again["parent"] == out["parent"] and again["children"] == out["children"]
    assert len(mlflow.search_runs(experiment_names=["t"])) == 2
    # an attempt that died half way (parent not finished) is replaced, not kept next to the new one
    client.set_terminated(out["parent"], "FAILED")
    redo = track.log_mlflow(trained, uri, config, experiment="t")
    assert not redo["cached"] and redo["parent"] != out["parent"]
    assert set(mlflow.search_runs(experiment_names=["t"])["run_id"]) == {redo["parent"], *redo["children"].values()}
    # other content (another config) is a new parent run
    other = track.log_mlflow(trained, uri, {**config, "train": {"epochs": 4}}, experiment="t")
    assert not other["cached"] and len(mlflow.search_runs(experiment_names=["t"])) == 4


def test_mlflow_error_is_one_line(trained):
    pytest.importorskip("mlflow")
    with pytest.raises(TailforgeError, match=r"MLflow at nosuch://store failed: .*unsupported URI") as err:
        track.log_mlflow(trained, "nosuch://store", {}, experiment="t")
    assert "track.mlflow" in err.value.hint


# --------------------------------------------------------------------------- the benchmark flow, end to end

@pytest.mark.slow
def test_benchmark_with_local_mlflow_and_tensorboard(tmp_path, monkeypatch):
    """`tailforge run --set track.mlflow=local` (tiny epochs): MLflow has the flow's parent run and one child per
    arm with a test balanced accuracy; TensorBoard has baseline's per-epoch val metrics in a listed folder."""
    mlflow = pytest.importorskip("mlflow")
    import os
    import subprocess

    run = tmp_path / "digits-track"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1")
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "tailforge.flows", "run", "--run", str(run), "--set", "train.epochs=2",
           "--set", "recipe.epochs=2", "--set", "train.width=8", "--set", "track.mlflow=local"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    t = json.loads((run / "eval" / "tracking.json").read_text())
    mlflow.set_tracking_uri(t["mlflow"])
    df = mlflow.search_runs(experiment_names=["tailforge"])
    parents = df[df["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1 and parents.iloc[0]["tags.mlflow.runName"] == "digits-track"
    kids = df[df["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]].set_index("tags.mlflow.runName")
    models = sorted(p.name for p in (run / "models").iterdir() if not p.name.startswith("."))
    assert sorted(kids.index) == models and {"baseline", "real-only", "rebalanced"} <= set(models)
    for arm in ("baseline", "real-only", "rebalanced"):
        want = json.loads((run / "eval" / f"{arm}-test.json").read_text())["balanced_acc"]
        assert kids.loc[arm, "metrics.test_balanced_acc"] == pytest.approx(want), arm
    base_tb = [f for f in t["tensorboard"] if Path(f).parent.name == "baseline"]
    assert len(t["tensorboard"]) == len(models) and base_tb
    assert [e.step for e in events(Path(base_tb[0])).Scalars("val/balanced_acc")] == [1, 2]
    assert "Training curves: TensorBoard" in (run / "eval" / "report.md").read_text().strip().splitlines()[-1]
