"""Tracking: where a run's curves are (``eval/tracking.json``) and its copy in MLflow.

Everything here reads the run folder's files, after the fact: the trainer writes only its own files (and its
TensorBoard events, ``train/tb.py``), so training stays free of MLflow, and logging can be redone from the
folder at any time.

* ``write_tracking(run, uri)``: ``eval/tracking.json`` = ``{"mlflow": URI or null, "tensorboard": [folders]}``
  (the ``models/<name>/tb`` folders that exist), rewritten only when it changes.
* ``curves_line(eval_dir)``: the report's last line, naming where the curves are (from that file).
* ``log_mlflow(run, uri, config, experiment)``: one parent run for the flow run (the flattened run config as
  params, each arm's final metrics, the report, plots and config as artifacts) and one child run per trained
  model (its train config as params; per-epoch metrics from ``models/<name>/log.jsonl`` at step = epoch; the
  final metrics per split from ``eval/<name>-<split>.json`` as ``<split>_<metric>``, e.g.
  ``test_balanced_acc``; its log, best epoch and plots as artifacts).

Resumable: the parent carries a fingerprint of what is logged. A finished parent with the same fingerprint
in the experiment means the work is done (a re-run of a finished flow adds nothing); an unfinished one (an
attempt that died half way) is deleted with its children and logged again.

``local`` is a SQLite store inside the run folder, ``sqlite:///<run>/mlruns/mlflow.db`` with artifacts in
``<run>/mlruns/artifacts``: MLflow 3 refuses new file stores (``./mlruns``) unless told otherwise.
MLflow is an optional extra: ``pip install 'tailforge[track]'`` (mlflow-skinny: the client and the stores;
the UI needs the full ``mlflow`` package).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

from tailforge.data.atomic import read_json, write_json
from tailforge.data.errors import TailforgeError
from tailforge.data.run import RunDir

TRACKING = "tracking.json"
LOCAL = "local"
STORE = "mlruns"  # <run>/mlruns/: mlflow.db and artifacts/
PARAM_VALUE_MAX = 500  # MLflow's limit was 500 characters before 2.x (6000 since); the safe one
PARAM_KEY_MAX = 250
BATCH = {"params": 100, "metrics": 1000}  # log_batch limits per call
FINGERPRINT = "tailforge.fingerprint"


# --------------------------------------------------------------------------- where the curves are

def tracking_uri(run: RunDir, mlflow: str | None) -> str | None:
    """The tracking URI ``track.mlflow`` means for ``run`` (``local``: the SQLite store inside it)."""
    if not mlflow:
        return None
    if mlflow == LOCAL:
        return f"sqlite:///{(run.root / STORE / 'mlflow.db').resolve()}"
    return mlflow


def tensorboard_folders(run: RunDir) -> list[str]:
    """The TensorBoard folders of the run's trained models (absolute paths)."""
    return [str(run.model_dir(m).resolve() / "tb") for m in run.models() if (run.model_dir(m) / "tb").is_dir()]


def write_tracking(run: RunDir, uri: str | None) -> Path:
    """``eval/tracking.json``; left untouched when its content would not change (the report's stamp holds it)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    path = run.eval_dir / TRACKING
    data = {"mlflow": uri, "tensorboard": tensorboard_folders(run)}
    try:
        if read_json(path) == data:
            return path
    except (OSError, ValueError):
        pass
    write_json(path, data)
    return path


def curves_line(eval_dir: str | Path) -> str:
    """The report's line naming where the training curves are (empty without ``eval/tracking.json``)."""
    path = Path(eval_dir) / TRACKING
    if not path.is_file():
        return ""
    try:
        t = read_json(path)
    except (OSError, ValueError):
        return ""
    tb = t.get("tensorboard") or []
    parts = []
    if tb:
        logdir = Path(tb[0]).parent.parent if len(tb) > 1 else Path(tb[0])
        parts.append(f"TensorBoard, {len(tb)} model(s): `tensorboard --logdir {logdir}`")
    if t.get("mlflow"):
        parts.append(f"MLflow `{t['mlflow']}` (`mlflow ui --backend-store-uri {t['mlflow']}`)")
    if not parts:
        return "\nTraining curves: `models/<name>/log.jsonl` (TensorBoard and MLflow were off).\n"
    return "\nTraining curves: " + "; ".join(parts) + " (listed in `eval/tracking.json`; docs/tracking.md).\n"


# --------------------------------------------------------------------------- MLflow

def require_mlflow() -> None:
    """One clear error when MLflow is asked for but not installed (before any work starts)."""
    if importlib.util.find_spec("mlflow") is None:
        raise TailforgeError("track.mlflow is set but MLflow is not installed",
                             "pip install 'tailforge[track]', or drop track.mlflow (--set track.mlflow=null)")


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": "0.1"}``; values cut to ``PARAM_VALUE_MAX`` characters."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    text = json.dumps(d) if isinstance(d, (list, tuple)) else str(d)
    if len(text) > PARAM_VALUE_MAX:
        text = text[:PARAM_VALUE_MAX - 3] + "..."
    return {prefix[:PARAM_KEY_MAX]: text}


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _evals(run: RunDir) -> dict[str, dict[str, dict]]:
    """model -> split -> the numeric top-level metrics of ``eval/<model>-<split>.json``."""
    out: dict[str, dict[str, dict]] = {}
    for p in sorted(run.eval_dir.glob("*.json")) if run.eval_dir.is_dir() else []:
        if p.name in (TRACKING, "compare.json"):
            continue
        try:
            d = read_json(p)
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict) or not isinstance(d.get("model"), str) or d.get("split") not in ("train", "val",
                                                                                                    "test"):
            continue
        if p.name != f"{d['model']}-{d['split']}.json":
            continue
        vals = {k: _number(v) for k, v in d.items()}
        out.setdefault(d["model"], {})[d["split"]] = {k: v for k, v in vals.items() if v is not None}
    return out


def _epochs(model_dir: Path) -> list[dict]:
    p = model_dir / "log.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def payload(run: RunDir, config: dict) -> dict:
    """What ``log_mlflow`` logs, from the run folder: ``{"parent": {...}, "children": {model: {...}}}``, each with
    params, metrics (``[(key, value, step)]``) and artifacts (``[(file, artifact folder)]``)."""
    evals = _evals(run)
    children = {}
    for name in run.models():
        d = run.model_dir(name)
        if not (d / "config.json").is_file():  # not a trained model
            continue
        cfg = read_json(d / "config.json")
        metrics = []
        for rec in _epochs(d):
            step = int(rec.get("epoch", 0))
            metrics += [(k, v, step) for k, v in ((k, _number(x)) for k, x in rec.items() if k != "epoch")
                        if v is not None]
        best = read_json(d / "best.json") if (d / "best.json").is_file() else {}
        if _number(best.get("epoch")) is not None:
            metrics.append(("best_epoch", float(best["epoch"]), 0))
        if _number(best.get("val_balanced_acc")) is not None:
            metrics.append(("selected_val_balanced_acc", float(best["val_balanced_acc"]), 0))
        for split, vals in sorted(evals.get(name, {}).items()):
            metrics += [(f"{split}_{k}", v, 0) for k, v in sorted(vals.items())]
        arts = [(d / f, "model") for f in ("config.json", "log.jsonl", "best.json") if (d / f).is_file()]
        arts += [(p, "eval") for split in evals.get(name, {})
                 for p in sorted(run.eval_dir.glob(f"{name}-{split}-*.png"))]
        children[name] = {"params": flatten(cfg.get("train", {})), "metrics": metrics, "artifacts": arts}
    parent_metrics = [(f"{m}.{split}_{k}", v, 0) for m in children for split, vals in
                      sorted(evals.get(m, {}).items()) for k, v in sorted(vals.items())
                      if k in ("balanced_acc", "top1", "many", "medium", "few", "macro_f1")]
    cmp_path = run.eval_dir / "compare.json"
    if cmp_path.is_file():
        verdict = (read_json(cmp_path).get("verdict") or {})
        if _number(verdict.get("delta_balanced_acc")) is not None:
            parent_metrics.append(("verdict.delta_balanced_acc", float(verdict["delta_balanced_acc"]), 0))
    arts = [(run.root / f, "") for f in ("config.yaml", "counts.json", "counts.png", "plan.json")
            if (run.root / f).is_file()]
    arts += [(run.eval_dir / f, "eval") for f in ("report.md", "compare.json", TRACKING)
             if (run.eval_dir / f).is_file()]
    arts += [(p, "eval") for p in sorted(run.eval_dir.glob("*.png"))] if run.eval_dir.is_dir() else []
    parent = {"params": flatten(config), "metrics": parent_metrics, "artifacts": arts}
    return {"parent": parent, "children": children}


def fingerprint(run: RunDir, data: dict) -> str:
    """Hash of what would be logged (params, metrics, the bytes of the artifacts)."""
    h = hashlib.sha256()
    for who in [data["parent"], *(data["children"][k] for k in sorted(data["children"]))]:
        h.update(json.dumps([who["params"], who["metrics"]], sort_keys=True).encode())
        for f, folder in who["artifacts"]:
            h.update(f"{Path(f).name}:{folder}:".encode())
            h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    h.update(json.dumps(sorted(data["children"])).encode())
    h.update(str(run.root.resolve()).encode())
    return h.hexdigest()[:24]


def log_mlflow(run: RunDir | str, uri: str, config: dict, experiment: str = "tailforge", flow: str = "benchmark",
               tags: dict[str, str] | None = None) -> dict:
    """Log the run folder to MLflow at ``uri``; returns ``{"uri", "experiment_id", "parent", "children", "cached"}``.

    ``config``: the run config as a dict (its params). ``tags``: extra tags of the parent (e.g. the Prefect
    flow run id; not part of the fingerprint)."""
    require_mlflow()
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run = run if isinstance(run, RunDir) else RunDir(run)
    data = payload(run, config)
    fp = fingerprint(run, data)
    try:
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment(client, run, uri, experiment)
        done = _previous(client, exp_id, fp)
        if done is not None:
            kids = {r.data.tags.get("tailforge.model", r.info.run_name): r.info.run_id
                    for r in _children(client, exp_id, done)}
            return {"uri": uri, "experiment_id": exp_id, "parent": done, "children": kids, "cached": True}
        now = int(time.time() * 1000)

        def log(run_id: str, who: dict) -> None:
            params = [Param(k, v) for k, v in who["params"].items()]
            metrics = [Metric(k, v, now, step) for k, v, step in who["metrics"]]
            for i in range(0, len(params), BATCH["params"]):
                client.log_batch(run_id, params=params[i:i + BATCH["params"]])
            for i in range(0, len(metrics), BATCH["metrics"]):
                client.log_batch(run_id, metrics=metrics[i:i + BATCH["metrics"]])
            for f, folder in who["artifacts"]:
                client.log_artifact(run_id, str(f), folder or None)

        base_tags = {"tailforge.run_folder": str(run.root.resolve()), "tailforge.flow": flow}
        parent = client.create_run(exp_id, run_name=run.root.name,
                                   tags={**base_tags, **(tags or {}), FINGERPRINT: fp})
        pid = parent.info.run_id
        try:
            log(pid, data["parent"])
            kids = {}
            for name, who in data["children"].items():
                child = client.create_run(exp_id, run_name=name, tags={**base_tags, "mlflow.parentRunId": pid,
                                                                       "tailforge.model": name})
                log(child.info.run_id, who)
                client.set_terminated(child.info.run_id, "FINISHED")
                kids[name] = child.info.run_id
        except BaseException:
            client.set_terminated(pid, "FAILED")  # the next attempt deletes it and logs again
            raise
        client.set_terminated(pid, "FINISHED")
        return {"uri": uri, "experiment_id": exp_id, "parent": pid, "children": kids, "cached": False}
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or ["error"])[0]
        raise TailforgeError(f"MLflow at {uri} failed: {first[:300]}",
                             "check track.mlflow (local: a store inside the run folder)") from None


def _experiment(client, run: RunDir, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri))


def artifact_root(uri: str) -> str | None:
    """Where a new experiment's artifacts go: next to a SQLite database (``local``: inside the run folder), not
    MLflow's default ``./mlruns`` of the working directory; a server's own default otherwise (None)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.name and db.name != ":memory:":
            return (db.parent / "artifacts").resolve().as_uri()
    return None


def _previous(client, exp_id: str, fp: str) -> str | None:
    """The id of a finished parent run with fingerprint ``fp``; unfinished ones (and their children) are deleted."""
    found = None
    for r in client.search_runs([exp_id], filter_string=f"tags.`{FINGERPRINT}` = '{fp}'"):
        if r.info.status == "FINISHED" and found is None:
            found = r.info.run_id
        elif r.info.status != "FINISHED":
            for c in _children(client, exp_id, r.info.run_id):
                client.delete_run(c.info.run_id)
            client.delete_run(r.info.run_id)
    return found


def _children(client, exp_id: str, parent_id: str) -> Iterable:
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
