"""Prefect tasks: one per stage, each a thin wrapper around the stage's plain function.

Every task decides first whether its outputs in the run folder are already up to date (a stamp in
``<run>/.flows/<task>.json`` records the hash of the settings that made them, and the outputs must
exist). If so it does no work and finishes in the state ``Cached`` with a ``cached:`` log line, so a
re-run of a finished flow is visibly free, and a killed flow resumes at the first unfinished task or
generation shard. Prefect's own result cache is off (``cache_policy=NONE``): the run folder is the
single source of truth, and deleting an output re-runs the task that makes it.

Artifacts (Prefect UI, "Artifacts" tab of the flow run): class-count table and histogram, plan
table, progress of generator training, generation and classifier training, filter table with sample
grids, metrics tables and the comparison report.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import Completed

from tailforge.data import RunDir, read_json, write_json

STAMPS = ".flows"
EMBED_LIMIT = 600_000  # bytes: images up to this size are embedded in markdown artifacts


# --------------------------------------------------------------------------- run-folder stamps

def settings_key(*parts: Any) -> str:
    """Hash of the settings that determine a task's outputs."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def stamp_path(run: RunDir, name: str) -> Path:
    return run.root / STAMPS / f"{name}.json"


_OUTPUTS: dict[tuple[str, str], list] = {}  # (run folder, task) -> the outputs its is_done asked about


def is_done(run: RunDir, name: str, key: str, outputs: list[Path]) -> bool:
    """True when the outputs exist, were made by the same settings (the stamp's key) and still match
    what the stamp recorded of them (size and hash, ``tailforge.data.integrity``). Damaged outputs are
    reported in one line (``damaged: <file> (size 1000, recorded 380312); redoing train rebalanced``)
    and removed, so the task redoes the stage; later tasks follow, since their keys hold this one's
    output files (size and mtime)."""
    from tailforge.data.integrity import stamp_ok

    _OUTPUTS[(str(run.root), name)] = list(outputs)
    p = stamp_path(run, name)
    if not p.exists():
        return False
    try:
        stamp = read_json(p)
    except (OSError, ValueError):
        return False
    if stamp.get("key") != key or not stamp_ok(run.root, stamp, redo=name.replace("-", " ")):
        return False
    return all(Path(o).exists() for o in outputs)


def mark_done(run: RunDir, name: str, key: str, outputs: list[Path] | None = None, **info) -> None:
    """Stamp a finished task: its settings key and a record (path, size, hash) of ``outputs``, by default
    the outputs its ``is_done`` asked about (folders: every file under them)."""
    from tailforge.data.integrity import record

    outs = _OUTPUTS.pop((str(run.root), name), []) if outputs is None else outputs
    write_json(stamp_path(run, name), {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info,
                                       "files": record(run.root, outs)})


def cached(name: str, run: RunDir, data: Any = None):
    """The final state of a task that found its outputs up to date (shown as ``Cached`` in the UI)."""
    msg = f"cached: {name} outputs in {run.root} are up to date, nothing to do"
    get_run_logger().info(msg)
    return Completed(name="Cached", message=msg, data=data)


# --------------------------------------------------------------------------- artifacts

def artifact_key(run: RunDir, what: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes; one key per run folder and item."""
    slug = re.sub(r"[^a-z0-9]+", "-", run.root.name.lower()).strip("-") or "run"
    return f"{slug}-{what}"


def image_md(path: Path, alt: str) -> str:
    """Markdown for an image: embedded (data URI) when small, a file link otherwise."""
    path = Path(path)
    if not path.exists():
        return ""
    if path.stat().st_size <= EMBED_LIMIT:
        b64 = base64.b64encode(path.read_bytes()).decode()
        return f"![{alt}](data:image/png;base64,{b64})\n\n_file: `{path.resolve()}`_\n"
    return f"[{alt}]({path.resolve().as_uri()}) (`{path.resolve()}`)\n"


def capped(rows: list[dict], rare_key: str, worst_key: str | None = None, what: str = "classes"):
    """A table artifact holds at most ``MAX_ROWS`` rows (``tailforge.data.classtable.select_rows``: the
    rarest and the worst); returns (rows, note for the description, empty when nothing was left out)."""
    from tailforge.data.classtable import select_rows

    return select_rows(rows, rare_key, worst_key, what=what)


def table(key: str, rows: list[dict], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(rows, key=key, description=description)


def markdown(key: str, text: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(text, key=key, description=description)


class ProgressArtifact:
    """A stage ``progress(done, total, info)`` callback that updates a Prefect progress artifact.

    Updates are throttled (at most one per ``every`` seconds, plus the last one), so a fast loop
    does not flood the API. The latest ``info`` goes into the description.
    """

    def __init__(self, key: str, description: str, every: float = 1.0):
        from prefect.artifacts import create_progress_artifact

        self.description = description
        self.every = every
        self.last = 0.0
        self.lock = threading.Lock()
        self.id = create_progress_artifact(0.0, key=key, description=description)

    def __call__(self, done: int, total: int, info: dict | None = None) -> None:
        from prefect.artifacts import update_progress_artifact

        now = time.monotonic()
        with self.lock:
            if done < total and now - self.last < self.every:
                return
            self.last = now
        pct = 100.0 * done / total if total else 100.0
        text = ", ".join(f"{k}={v}" for k, v in (info or {}).items())
        try:
            update_progress_artifact(self.id, min(pct, 100.0), description=f"{self.description} ({done}/{total}"
                                     + (f"; {text}" if text else "") + ")")
        except Exception as exc:  # progress is best effort: never fail the stage for it
            get_run_logger().debug("progress artifact update failed: %s", exc)


# --------------------------------------------------------------------------- measure

@task(name="measure", cache_policy=NONE, task_run_name="measure {run}")
def measure_task(run: str, data_cfg, measure_cfg) -> dict:
    """Build the real manifest (splits, long tail) and measure class frequencies."""
    from tailforge.data import ClassStats, build_manifest, measure_run

    r = RunDir(run)
    key = settings_key(data_cfg.fingerprint(), measure_cfg.model_dump(mode="json"))
    if is_done(r, "measure", key, [r.real, r.dataset, r.counts]):
        return cached("measure", r, ClassStats.load(r).to_dict())
    build_manifest(data_cfg, r)
    stats = measure_run(r, measure_cfg)
    publish_counts(r, stats)
    mark_done(r, "measure", key, outputs=[r.real, r.dataset, r.counts, *sorted(r.data_dir.glob("*.npy"))])
    return stats.to_dict()


def publish_counts(run: RunDir, stats) -> None:
    rows = [{"class": i, "name": stats.class_names[i], "group": stats.groups[i],
             **{s: stats.counts[s][i] for s in ("train", "val", "test")}}
            for i in sorted(range(stats.num_classes), key=lambda i: -stats.counts["train"][i])]
    rows, note = capped(rows, "train", what="classes")
    table(artifact_key(run, "counts"), rows,
          f"{stats.dataset}: real images per class and split (train split long-tailed, imbalance factor "
          f"{stats.imbalance_factor:.1f})" + (f"; {note} (every class: {run.counts})" if note else ""))
    md = (f"# Class frequencies: {stats.dataset}\n\n"
          f"train imbalance factor **{stats.imbalance_factor:.1f}**, Gini {stats.gini:.3f}, groups "
          f"({stats.group_rule}): " + ", ".join(f"{g} {n}" for g, n in stats.group_sizes.items()) + "\n\n"
          + image_md(run.root / "counts.png", "train images per class"))
    markdown(artifact_key(run, "histogram"), md, "train images per class (log scale), coloured by group")


# --------------------------------------------------------------------------- plan

@task(name="plan", cache_policy=NONE, task_run_name="plan {run}")
def plan_task(run: str, plan_cfg) -> dict:
    """Per-class quotas of synthetic samples (plan.json)."""
    from tailforge import gen

    r = RunDir(run)
    key = settings_key(_counts_key(r), plan_cfg.model_dump(mode="json"))
    if is_done(r, "plan", key, [r.plan]):
        return cached("plan", r, read_json(r.plan))
    p = gen.plan_run(r, plan_cfg)
    publish_plan(r, p)
    mark_done(r, "plan", key)
    return p.to_dict()


def _counts_key(run: RunDir) -> str:
    return hashlib.sha256(run.counts.read_bytes()).hexdigest()[:16] if run.counts.exists() else ""


def publish_plan(run: RunDir, plan) -> None:
    rows = [{"class": q.label, "name": q.class_name, "have": q.have, "target": q.target, "need": q.need,
             "generate": q.generate} for q in plan.classes]
    rows, note = capped(rows, "have")
    table(artifact_key(run, "plan"), rows,
          f"generation plan: target '{plan.target}', over-generation x{plan.overgen}, {plan.total} samples in all"
          + (f"; {note} (every class: {run.plan})" if note else "") + (f". {plan.note}" if plan.note else ""))


# --------------------------------------------------------------------------- generate

_GENERATORS: dict[tuple, Any] = {}
_GEN_LOCK = threading.Lock()


def generator_for(run: RunDir, gen_cfg, progress=None):
    """The run's generator, prepared once per process (a thread pool shares it; dask workers each hold one)."""
    from tailforge import gen
    from tailforge.gen.planner import Plan

    k = (str(run.root.resolve()), gen_cfg.model_dump_json())
    with _GEN_LOCK:
        if k not in _GENERATORS:
            g = gen.GENERATORS[gen_cfg.generator](run, gen_cfg, run.dataset_info())
            g.prepare(Plan.load(run), progress=progress)
            _GENERATORS[k] = g
        return _GENERATORS[k]


def forget_generators(run: RunDir) -> None:
    """Drop this process's prepared generators of ``run`` (a rebuilt run folder must not reuse them)."""
    root = str(run.root.resolve())
    with _GEN_LOCK:
        for k in [k for k in _GENERATORS if k[0] == root]:
            del _GENERATORS[k]


def _gen_key(run: RunDir, gen_cfg) -> str:
    d = gen_cfg.model_dump(mode="json")
    d.pop("device", None)
    return settings_key(d, hashlib.sha256(run.plan.read_bytes()).hexdigest()[:16] if run.plan.exists() else "")


@task(name="prepare-generator", cache_policy=NONE, task_run_name="prepare {gen_cfg.generator}")
def prepare_generator_task(run: str, gen_cfg) -> None:
    """Train or load the generator once (the in-domain diffusion model trains here, with progress)."""
    r = RunDir(run)
    _before_shards(r, gen_cfg)
    key = _gen_key(r, gen_cfg)
    if is_done(r, f"prepare-{gen_cfg.generator}", key, []):
        return cached(f"prepare {gen_cfg.generator}", r)
    prog = ProgressArtifact(artifact_key(r, f"{gen_cfg.generator}-training"),
                            f"training the {gen_cfg.generator} generator")
    generator_for(r, gen_cfg, progress=prog)
    mark_done(r, f"prepare-{gen_cfg.generator}", key)


def _before_shards(run: RunDir, gen_cfg) -> None:
    """Before the shards fan out (none runs yet; the run folder's lock keeps other runs out): remove the
    partial ``.tmp-<shard>-*`` folders of killed attempts (a SIGKILLed Dask worker or run), and warn in
    one line when the unfinished shards may not fit on the disk."""
    from tailforge.gen import plan_units
    from tailforge.gen.planner import Plan
    from tailforge.gen.shards import clean_partial, finished_folders
    from tailforge.gen.space import space_warning

    units = plan_units(Plan.load(run), gen_cfg.generator, gen_cfg.shard_size)
    gen_dir = run.synthetic(gen_cfg.generator)
    clean_partial(gen_dir, units)
    there = finished_folders(gen_dir)  # one listing of the folder, not one look-up per unit
    warn = space_warning(run, gen_cfg.generator, sum(u.size for u in units if u.folder not in there))
    if warn:
        get_run_logger().warning(warn)


def shard_device(gen_cfg):
    """One GPU per worker: a dask worker ``i`` of a local cluster uses ``cuda:i % n`` when several GPUs exist."""
    if gen_cfg.device != "auto":
        return gen_cfg
    try:
        import torch

        n = torch.cuda.device_count()
        if n > 1:
            from distributed import get_worker

            name = get_worker().name
            idx = int(name) if str(name).isdigit() else abs(hash(name))
            return gen_cfg.model_copy(update={"device": f"cuda:{idx % n}"})
    except (ImportError, ValueError):
        pass
    return gen_cfg


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry a failed shard (a transient error), but not a full disk or another user error: the same
    attempt again cannot help, and every shard would print its failure three times."""
    from tailforge.data.errors import TailforgeError

    return not isinstance(getattr(state, "data", None), TailforgeError)


@task(name="generate-unit", cache_policy=NONE, task_run_name="unit {unit.id}", retries=2,
      retry_delay_seconds=1, retry_condition_fn=_retry_unless_user_error)
def generate_unit_task(run: str, gen_cfg, unit) -> int:
    """Generate one work unit (``gen.shards.Unit``: consecutive shards, each a class and an index range,
    about ``shard_size`` samples in all) into its folder ``synthetic/<gen>/<unit folder>/``, atomically; a
    finished unit is skipped (a retry redoes the unit)."""
    from tailforge.gen.shards import run_unit, unit_done

    r = RunDir(run)
    gen_dir = r.synthetic(gen_cfg.generator)
    if unit_done(gen_dir, unit):
        return cached(f"unit {unit.describe()}", r, unit.size)
    g = generator_for(r, shard_device(gen_cfg))
    run_unit(g, unit, gen_dir)
    return unit.size


def _side(r: RunDir, what: str) -> str:
    """Stamp and artifact names of a source view (``oracle-filter``); the run's own keep their names."""
    return f"{r.source}-{what}" if r.source else what


@task(name="collect-candidates", cache_policy=NONE, task_run_name="collect candidates")
def collect_task(run: str, gen_cfg, source: str | None = None) -> int:
    """Union of the finished shards -> candidates.parquet (``source``: sources/<source>/candidates.parquet),
    plus per-class sample grids."""
    from tailforge import gen
    from tailforge.gen.planner import Plan
    from tailforge.gen.shards import write_candidates

    r = RunDir(run, source)
    key = _gen_key(r, gen_cfg)
    if is_done(r, _side(r, "candidates"), key, [r.candidates]):
        import pandas as pd

        return cached("collect candidates", r, len(pd.read_parquet(r.candidates, columns=["sample_id"])))
    df = gen.collect_candidates(r, Plan.load(r))
    write_candidates(r, df)
    mark_done(r, _side(r, "candidates"), key, rows=len(df))
    if not source:  # a second source's sample grids would overwrite the run's own
        publish_candidates(r, gen_cfg.generator, df)
    return len(df)


def publish_candidates(run: RunDir, generator: str, df) -> None:
    from tailforge import gen

    counts = df.groupby(["label", "class_name"]).size().reset_index(name="candidates")
    rows, note = capped(counts.to_dict("records"), "candidates")
    table(artifact_key(run, "candidates"), rows, f"{len(df)} {generator} candidates per class"
          + (f"; {note} (every row: {run.candidates})" if note else ""))
    try:
        grids = gen.write_sample_grids(run, generator) or []
    except Exception as exc:  # pictures are a bonus; never fail generation for them
        get_run_logger().warning("sample grids failed: %s", exc)
        return
    grids = [Path(g) for g in (grids if isinstance(grids, (list, tuple)) else [grids])][:6]
    if grids:
        markdown(artifact_key(run, "samples"), f"# {generator} samples (real exemplars above, synthetic below)\n\n"
                 + "\n".join(image_md(g, g.stem) for g in grids), "generated samples per class")


# --------------------------------------------------------------------------- filter

@task(name="filter", cache_policy=NONE, task_run_name="filter {run}")
def filter_task(run: str, filter_cfg, upstream: str = "", source: str | None = None) -> dict:
    """Score every candidate (embedding similarity) and accept the useful ones: filtered.parquet
    (``source``: the candidates and filtered table of sources/<source>/)."""
    from tailforge.eval.filter import filter_candidates

    r = RunDir(run, source)
    key = settings_key(filter_cfg.model_dump(mode="json"), upstream, _file_key(r.candidates))
    if is_done(r, _side(r, "filter"), key, [r.filtered]):
        return cached(_side(r, "filter"), r, _filter_summary(r))
    prog = ProgressArtifact(artifact_key(r, _side(r, "filter-progress")), f"filtering {source or ''} candidates")
    filter_candidates(r, filter_cfg, prog)
    mark_done(r, _side(r, "filter"), key)
    summary = _filter_summary(r)
    publish_filter(r)
    return summary


def _file_key(path: Path) -> str:
    p = Path(path)
    return f"{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else ""


def _filter_summary(run: RunDir) -> dict:
    import pandas as pd

    df = pd.read_parquet(run.filtered, columns=["accepted", "reason"])
    return {"candidates": len(df), "accepted": int(df["accepted"].sum()),
            "reasons": df.loc[~df["accepted"], "reason"].value_counts().to_dict()}


def publish_filter(run: RunDir) -> None:
    import pandas as pd

    df = pd.read_parquet(run.filtered, columns=["label", "class_name", "accepted", "reason"])
    acc = df["accepted"].astype(bool)
    by = df.assign(_acc=acc).groupby(["label", "class_name"])["_acc"]
    per = pd.DataFrame({"generated": by.size(), "accepted": by.sum()})
    rej = pd.crosstab([df.loc[~acc, "label"], df.loc[~acc, "class_name"]], df.loc[~acc, "reason"].replace("", "rejected"))
    per = per.join(rej).fillna(0)
    rows = []
    for (label, name), r in zip(per.index, per.to_dict("records")):
        row = {"class": int(label), "name": name, "generated": int(r.pop("generated")),
               "accepted": int(r.pop("accepted"))}
        row["rate"] = round(row["accepted"] / row["generated"], 3) if row["generated"] else 0.0
        row.update({str(k): int(v) for k, v in r.items() if v})
        rows.append(row)
    rows, note = capped(rows, "generated", "rate")
    table(artifact_key(run, _side(run, "filter")), rows,
          f"filter{' (' + run.source + ')' if run.source else ''}: candidates generated / accepted per class, "
          "rejections by reason" + (f"; {note} (every class: {run.side / 'filter' / 'classes.csv'})" if note else ""))
    pics = sorted((run.side / "filter").glob("*.png")) if (run.side / "filter").is_dir() else []
    if pics:
        markdown(artifact_key(run, _side(run, "filter-grids")), "# Filter: accepted vs rejected samples\n\n"
                 + "\n".join(f"## {p.stem}\n\n" + image_md(p, p.stem) for p in pics[:8]),
                 "sample grids of the filter (accepted above, rejected below) and the score histogram")


# --------------------------------------------------------------------------- export

@task(name="export", cache_policy=NONE, task_run_name="export {run}")
def export_task(run: str, export_cfg, synthetic: str = "filtered") -> dict:
    """The rebalanced dataset out (``tailforge.data.export``): the real + accepted synthetic train samples, val and
    test in ``export.format`` at ``export.to``, with a progress artifact and a table artifact of the counts. Cached
    when the folder already holds this very export (its ``export.json`` key)."""
    from tailforge.data.export import describe, export_run

    r = RunDir(run)
    cfg = export_cfg if export_cfg.synthetic else export_cfg.model_copy(update={"synthetic": synthetic})
    prog = ProgressArtifact(artifact_key(r, "export-progress"), f"exporting to {cfg.to} ({cfg.format})")
    out = export_run(r, cfg, progress=prog)
    for note in out.get("notes", []):
        get_run_logger().info(note)
    if out["up_to_date"]:
        return cached("export", r, out)
    get_run_logger().info(describe(out, cfg.to))
    rows = [{"split": s, "samples": c["samples"], "real": c["real"], "synthetic": sum(c["synthetic"].values()),
             **{f"from {k}": v for k, v in c["synthetic"].items()}, "images": c["images"], "features": c["features"]}
            for s, c in out["counts"].items()]
    table(artifact_key(r, "export"), rows, f"exported to {Path(cfg.to).resolve()} as {cfg.format}: samples per split "
          "and source (train: real + accepted synthetic)" + (f"; {out['notes'][0]}" if out["notes"] else ""))
    return out


# --------------------------------------------------------------------------- train, evaluate, compare

@task(name="train", cache_policy=NONE, task_run_name="train {name}")
def train_task(run: str, train_cfg, name: str, upstream: str = "") -> str:
    """Train one classifier (``models/<name>/``) with a progress artifact.

    ``tailforge.train.launch_fit``: with more than one visible GPU (or ``train.nproc`` > 1) it runs torchrun with one
    DDP process per GPU and relays rank 0's progress here; otherwise it trains in this process.
    """
    from tailforge import train

    r = RunDir(run, getattr(train_cfg, "synthetic_source", None))  # the synthetic rows' source view
    ident = train_cfg.identity() if hasattr(train_cfg, "identity") else train_cfg.model_dump(mode="json")
    data_key = _file_key(r.filtered) if getattr(train_cfg, "synthetic", "none") == "filtered" else \
        _file_key(r.candidates) if getattr(train_cfg, "synthetic", "none") == "candidates" else ""
    base_key = _file_key(r.model_dir(train_cfg.base) / "model.safetensors") \
        if getattr(train_cfg, "stage", "full") == "crt" and train_cfg.base else ""
    key = settings_key(ident, name, upstream, data_key, _file_key(r.real), base_key)
    out = r.model_dir(name)
    if is_done(r, f"train-{name}", key, [out / "model.safetensors", out / "config.json"]):
        return cached(f"train {name}", r, str(out))
    prog = ProgressArtifact(artifact_key(r, f"train-{name}"), f"training {name}")
    path = train.launch_fit(r, train_cfg, name, progress=prog)
    mark_done(r, f"train-{name}", key)
    publish_training(r, name)
    return str(path)


def publish_training(run: RunDir, name: str) -> None:
    best = run.model_dir(name) / "best.json"
    if best.exists():
        b = read_json(best)
        table(artifact_key(run, f"train-{name}-best"), [{k: v for k, v in b.items() if not isinstance(v, (dict, list))}],
              f"{name}: the checkpoint selected on the val split")


@task(name="choose-head", cache_policy=NONE, task_run_name="choose the real-only head of {run}")
def choose_head_task(run: str, names: dict, reference: str | None = None) -> dict:
    """The real-only candidate with the best VAL balanced accuracy (train/heads.py ``choose``; ``reference``: the
    frozen base network, scored alongside): eval/candidates.json, published as a table artifact."""
    from tailforge.train.heads import choose

    r = RunDir(run)
    res = choose(r, dict(names), reference=reference)
    rows = [{"head": h, "model": names[h], "val_balanced_acc": round(v, 4), "chosen": h == res["chosen"]}
            for h, v in res["scores"].items()]
    ref = res.get("reference")
    if ref:
        rows.append({"head": "(the base network's own head)", "model": ref["model"],
                     "val_balanced_acc": round(ref["val_balanced_acc"], 4), "chosen": False})
    table(artifact_key(r, "candidates"), rows,
          f"real-only candidates on the val split: {res['chosen']} is the control of every arm")
    return res


@task(name="evaluate", cache_policy=NONE, task_run_name="evaluate {name} on {split}")
def evaluate_task(run: str, name: str, split: str, eval_cfg=None) -> dict:
    """Metrics of one model on one split (eval/<model>-<split>.json), as a table artifact."""
    from tailforge import eval as ev

    r = RunDir(run)
    weights = r.model_dir(name) / "model.safetensors"
    cfg_dump = eval_cfg.model_dump(mode="json") if eval_cfg is not None else {}
    key = settings_key(name, split, cfg_dump, _file_key(weights))
    out = r.eval_dir / f"{name}-{split}.json"
    if is_done(r, f"evaluate-{name}-{split}", key, [out, r.eval_dir / f"{name}-{split}-pred.npy",
                                                   r.eval_dir / f"{name}-{split}-classes.csv"]):
        return cached(f"evaluate {name} {split}", r, read_json(out))
    metrics = ev.evaluate(r, name, split, cfg=eval_cfg)
    mark_done(r, f"evaluate-{name}-{split}", key)
    publish_metrics(r, name, split, metrics)
    return metrics


SUMMARY = ("top1", "balanced_acc", "many", "medium", "few", "macro_f1", "weighted_f1", "mcc", "kappa", "ece")


def publish_metrics(run: RunDir, name: str, split: str, metrics: dict) -> None:
    row = {"model": name, "split": split}
    for k in SUMMARY:
        v = metrics.get(k)
        if isinstance(v, dict):  # e.g. {"many": {"acc": ...}}
            v = v.get("acc", v.get("top1"))
        if isinstance(v, (int, float)) and v is not None:
            row[k] = round(float(v), 4)
    table(artifact_key(run, f"metrics-{name}-{split}"), [row], f"{name}: metrics on the {split} split")


@task(name="compare", cache_policy=NONE, task_run_name="compare on {split}")
def compare_task(run: str, names: list[str], baseline: str, split: str, compare_cfg=None,
                 lead: tuple[str, str] | None = None, oracle: str | None = None, why_no_oracle: str | None = None) -> str:
    """The arms side by side: eval/report.md (+ compare.json), published as a markdown artifact;
    ``lead=(control, treatment)`` opens it with room and capture (``oracle``: the perfect-generator arm, or
    ``why_no_oracle``) and the synthetic-data verdict."""
    from tailforge import eval as ev
    from tailforge.eval.config import CompareConfig

    r = RunDir(run)
    cfg = (compare_cfg or CompareConfig()).model_copy(update={"split": split, "baseline": baseline})
    report = r.eval_dir / "report.md"
    key = settings_key(names, cfg.model_dump(mode="json"), list(lead or []), oracle, why_no_oracle,
                       [_file_key(r.eval_dir / f"{n}-{split}.json") for n in names], _file_key(r.eval_dir / "headroom.json"),
                       _file_key(r.eval_dir / "tracking.json"), _file_key(r.eval_dir / "candidates.json"))  # the report's last line names the curves
    if is_done(r, "compare", key, [report]):
        return cached("compare", r, str(report))
    ev.compare(r, list(names), cfg=cfg, out_dir=r.eval_dir, lead=tuple(lead) if lead else None, oracle=oracle,
               why_no_oracle=why_no_oracle)
    mark_done(r, "compare", key)
    publish_report(r)
    return str(report)


@task(name="headroom", cache_policy=NONE, task_run_name="headroom {run}")
def headroom_task(run: str, points: dict, compare_cfg) -> dict:
    """The estimated room from the learning curve's val predictions: eval/headroom.json, as a table artifact."""
    from tailforge.eval.room import write_headroom

    r = RunDir(run)
    out = r.eval_dir / "headroom.json"
    key = settings_key({str(f): n for f, n in points.items()}, compare_cfg.model_dump(mode="json"),
                       [_file_key(r.eval_dir / f"{n}-val-pred.npy") for n in points.values()], _file_key(r.plan))
    if is_done(r, "headroom", key, [out]):
        return cached("headroom", r, read_json(out))
    res = write_headroom(r, {float(f): n for f, n in points.items()}, compare_cfg.headroom_fit, confidence=0.9,
                         signed=compare_cfg.headroom_signed,
                         calibration=(compare_cfg.headroom_scale, compare_cfg.headroom_spread))
    mark_done(r, "headroom", key)
    rows = [{"set": "balanced accuracy", "room": round(res["room"], 2), "low": round(res["low"], 2),
             "high": round(res["high"], 2)}]
    rows += [{"set": k, "room": round(v["room"], 2), "low": round(v["low"], 2), "high": round(v["high"], 2)}
             for k, v in res["groups"].items()]
    per = sorted((c for c in res.get("classes", []) if c["need"] > 0), key=lambda c: -c["gain"])
    rows += [{"set": f"class {c['label']} ({c['name']})", "room": round(c["gain"], 2), "low": round(c["low"], 2),
              "high": round(c["high"], 2)} for c in (per if len(per) <= 20 else per[:10] + per[-10:])]
    table(artifact_key(r, "headroom"), rows, f"estimated room in points ({res['fit']} fit of the val learning curve, "
          f"90 % interval), from the real train and val splits alone; per class (points of the class's accuracy): "
          f"{'every topped-up class' if len(per) <= 20 else 'the 10 with the most and the 10 with the least room'}")
    return res


def publish_report(run: RunDir) -> None:
    report = run.eval_dir / "report.md"
    text = report.read_text() if report.exists() else "(no report written)"

    def embed(m: re.Match) -> str:  # relative image links -> embedded images, readable in the UI
        p = (report.parent / m.group(2))
        return image_md(p, m.group(1)).strip() if p.exists() else m.group(0)

    text = re.sub(r"!\[([^\]]*)\]\((?!data:|https?:)([^)]+)\)", embed, text)
    markdown(artifact_key(run, "report"), text + f"\n\n_report file: `{report.resolve()}`_\n",
             "baseline, real-only and rebalanced: the comparison report")


# --------------------------------------------------------------------------- tracking

@task(name="mlflow", cache_policy=NONE, task_run_name="mlflow {run}")
def track_task(run: str, uri: str, experiment: str, config: dict) -> dict:
    """The run folder in MLflow (eval/track.py): a parent run for this flow run, a child run per trained model.
    Cached when a finished parent run with the same content is already there."""
    from tailforge.eval.track import log_mlflow

    r = RunDir(run)
    tags = {}
    try:
        from prefect.runtime import flow_run

        tags["prefect.flow_run_id"] = str(flow_run.id or "")
    except Exception:  # outside a flow run: no tag
        pass
    out = log_mlflow(r, uri, config, experiment, tags={k: v for k, v in tags.items() if v})
    if out["cached"]:
        return cached("mlflow", r, out)
    get_run_logger().info("mlflow: parent run %s with %d child runs (%s) in %s", out["parent"], len(out["children"]),
                          ", ".join(out["children"]), uri)
    return out
