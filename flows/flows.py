"""Prefect flows: one per stage, ``rebalance`` (every stage on one run folder) and ``benchmark``.

``benchmark`` trains three arms with the same split, seed, architecture and budget: ``baseline``
(real data, the ``train`` settings as given), ``real-only`` (the rebalancing ``recipe`` on real data
only: the control that matters) and ``rebalanced`` (the same recipe on real + accepted synthetic
data); it evaluates all three on the same split and publishes the report, which leads with
rebalanced vs real-only and says plainly when synthetic data did not help. ``tailforge run`` runs it; without ``--config`` on the embedded
digits config (offline, minutes on a laptop CPU).

Generation shards fan out through the flow's task runner: threads in this process by default, or
prefect-dask (``runner: {runner: dask}``): a local Dask cluster with one worker per GPU, or an
existing scheduler (``address``). Every other stage runs in the flow's own process.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import wait

from tailforge.data import DataConfig, MeasureConfig, RunDir, read_json
from tailforge.data.lock import run_lock

from .env import prefect_env
from .config import (FilterConfig, GenerateConfig, PlanConfig, RunConfig, RunnerConfig, TrainConfig,
                     check_run_folder, load_config, write_config)
from .tasks import (ProgressArtifact, artifact_key, export_task, choose_head_task, collect_task, compare_task, evaluate_task, filter_task, forget_generators,
                    generate_unit_task, headroom_task, measure_task, plan_task, prepare_generator_task, track_task,
                    train_task)

# The flows' default parameter: the embedded digits config (flows/default.yaml), so a deployment run
# or a UI run with no parameters does what `tailforge run` does.
DEFAULT_CONFIG = load_config()


# --------------------------------------------------------------------------- environment and runners

def make_runner(rc: RunnerConfig):
    """The task runner of the generation shards."""
    if rc.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if rc.address:
            return DaskTaskRunner(address=rc.address)
        n = rc.workers or _gpus() or 2
        return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=rc.workers or 1)


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:  # pragma: no cover
        return 0


# --------------------------------------------------------------------------- stage steps (called inside flows)

def call(task, *args, **kwargs):
    """Run a task in the flow and return its value, also when it finished as ``Cached`` (a task that
    returns a State hands the State, not its data, to a direct caller)."""
    return task(*args, return_state=True, **kwargs).result()


def _generate_steps(run: str, gen_cfg, rc: RunnerConfig, source: str | None = None) -> int:
    """Prepare the generator, fan the work units (consecutive shards of about ``shard_size`` samples)
    out through the task runner, collect candidates (``source``: into the run's second source of that name,
    sources/<source>/)."""
    from tailforge import gen
    from tailforge.gen.planner import Plan
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if rc.runner == "dask" and ctx is not None and type(ctx.task_runner).__name__ != "DaskTaskRunner":
        # started with another runner (e.g. a deployment): fan out in a subflow that runs on Dask
        return generate_flow.with_options(task_runner=make_runner(rc))(run, gen_cfg, rc, source)
    r = RunDir(run)
    forget_generators(r)
    call(prepare_generator_task, run, gen_cfg)
    units = gen.plan_units(Plan.load(r), gen_cfg.generator, gen_cfg.shard_size)
    total, done = sum(u.size for u in units), 0
    get_run_logger().info("generating %d %s samples: %d shards in %d work units of up to %d samples", total,
                          gen_cfg.generator, sum(len(u.shards) for u in units), len(units), gen_cfg.shard_size)
    prog = ProgressArtifact(artifact_key(r, "generation"), f"generating {total} {gen_cfg.generator} samples in "
                            f"{len(units)} work units", every=0.5)
    task = generate_unit_task.with_options(retries=rc.shard_retries)
    futures = [task.submit(run, gen_cfg, u) for u in units]
    for fut, u in zip(futures, units):
        fut.wait()
        if fut.state.is_completed():
            done += u.size
            prog(done, total, {"unit": u.id})
    wait(futures)
    for fut in futures:
        fut.result()  # raise the first failure (after retries): the flow fails, finished shards stay
    return call(collect_task, run, gen_cfg, source)


def _rebalance_steps(cfg: RunConfig) -> dict:
    run = cfg.run
    check_run_folder(cfg)
    write_config(cfg)
    logger = get_run_logger()
    logger.info("run folder %s (config.yaml written)", Path(run).resolve())
    call(measure_task, run, cfg.data, cfg.measure)
    plan = _plan_steps(cfg)
    # the real-only classifier first: the filter's default embedder and featdict's feature space
    _base_steps(cfg)
    cfg = _choose_head_steps(cfg)
    n = _generate_steps(run, cfg.generate, cfg.runner) if plan["total"] > 0 else 0
    logger.info("%d candidates", n)
    summary = call(filter_task, run, cfg.filter_config(), upstream=cfg.crt_base)
    logger.info("filter: %s", summary)
    if cfg.export.to is not None:  # the rebalanced dataset out for other trainers (off by default)
        call(export_task, run, cfg.export, cfg.recipe.synthetic)
    for name, tc in cfg.arm_trainings(cfg.rebalanced, cfg.recipe.synthetic):  # [own backbone,] the recipe
        call(train_task, run, tc, name)
    metrics = call(evaluate_task, run, cfg.rebalanced, cfg.eval_split, cfg.evaluate)
    return {"run": str(Path(run).resolve()), "candidates": n, "filter": summary, "metrics": {cfg.rebalanced: metrics},
            "config": cfg}


def _base_steps(cfg: RunConfig) -> None:
    """The baseline and, with recipe.backbone_sampler, the recipe's own backbone (both on real data)."""
    call(train_task, cfg.run, cfg.baseline_train(), cfg.baseline)
    if cfg.crt_base != cfg.baseline:
        call(train_task, cfg.run, cfg.backbone_train(), cfg.crt_base)


def _plan_steps(cfg: RunConfig) -> dict:
    """plan.json. Target ``room`` prices quotas with each class's learning curve, so it measures the curve first:
    a uniform plan of the same budget (it names the classes below the largest, which headroom thins), the
    real-only recipe and its thinned points (eval/headroom.json), then the room plan from them."""
    if cfg.plan.target != "room":
        return call(plan_task, cfg.run, cfg.plan)
    call(plan_task, cfg.run, cfg.plan.model_copy(update={"target": "uniform"}))
    _base_steps(cfg)
    hcfg = _choose_head_steps(cfg)
    call(train_task, cfg.run, hcfg.real_only_train(), hcfg.real_only)
    _headroom_steps(hcfg)
    plan = call(plan_task, cfg.run, cfg.plan)
    get_run_logger().info("%s", plan.get("note", ""))
    return plan


def _choose_head_steps(cfg: RunConfig) -> RunConfig:
    """With ``recipe.candidates``: each head trained on the real features at the recipe's budget
    (models/real-only-<head>), the best on VAL chosen (eval/candidates.json); returns the config whose recipe is
    that head, for every arm. Without: the config as it is."""
    heads = cfg.recipe.candidates
    if not heads:
        return cfg
    names = {h: cfg.candidate_name(h) for h in heads}
    for h, name in names.items():
        call(train_task, cfg.run, cfg.with_head(h).real_only_train(), name)
    res = call(choose_head_task, cfg.run, names, cfg.crt_base)
    get_run_logger().info("real-only control: head %s, the best of %s on the val split (balanced accuracy %s)",
                          res["chosen"], ", ".join(heads), ", ".join(f"{h} {v:.4f}" for h, v in res["scores"].items()))
    if res.get("reference", {}).get("above"):
        get_run_logger().info("the frozen base network's own head (%s) scores %.4f on val, above every re-trained "
                              "head: the report also measures rebalanced against it", cfg.crt_base,
                              res["reference"]["val_balanced_acc"])
    return cfg.with_head(res["chosen"])


# --------------------------------------------------------------------------- flows

FLOW_OPTS = dict(log_prints=True, validate_parameters=True, persist_result=False)


@flow(name="rebalance", description="Every stage on one run folder: measure, plan, generate, filter, train, "
      "evaluate.", **FLOW_OPTS)
def rebalance(config: RunConfig = DEFAULT_CONFIG) -> dict:
    with run_lock(config.run, create=True, command="flow rebalance"):  # re-entrant: `tailforge run` holds it
        out = _rebalance_steps(config)
        out.pop("config")
        return out


@flow(name="benchmark", description="Three arms on the same split, seed and budget: baseline (real only, plain "
      "training), real-only (the rebalancing recipe on real data) and rebalanced (the recipe on real + accepted "
      "synthetic data); publishes the report, which leads with rebalanced vs real-only.", **FLOW_OPTS)
def benchmark(config: RunConfig = DEFAULT_CONFIG) -> dict:
    with run_lock(config.run, create=True, command="flow benchmark"):  # one run per folder (data/lock.py)
        return _benchmark_steps(config)


def oracle_blocker(cfg: RunConfig) -> str | None:
    """Why the benchmark has no oracle arm (one line), or None when it has one."""
    from tailforge.data import read_json
    from tailforge.data.heldout import heldout_reason

    if not getattr(cfg.compare, "oracle", True):
        return "it is turned off (compare.oracle: false)"
    if getattr(cfg.generate, "generator", None) == "oracle":
        return "the run's own generator is the oracle (its rebalanced arm is the perfect generator)"
    r = cfg.run_dir
    if r.plan.exists() and read_json(r.plan).get("total", 0) == 0:
        return "the plan tops up no class"
    return heldout_reason(r)


def _oracle_steps(cfg: RunConfig) -> None:
    """The oracle arm through the product's own path: the `oracle` source draws the long tail's held-back real
    images to the same plan, the filter keeps the quota (its broken-sample rules only: the images are real, and
    the selection rules would drop the hard tail images that perfect data is worth most for), and the recipe
    trains on them at the same budget."""
    run = cfg.run
    _generate_steps(run, cfg.generate.model_copy(update={"generator": "oracle"}), cfg.runner, source="oracle")
    fc = cfg.filter_config()
    fc = fc.model_copy(update={"image_rules": "guard"}) if "image_rules" in type(fc).model_fields else fc
    summary = call(filter_task, run, fc, upstream=cfg.crt_base, source="oracle")
    get_run_logger().info("oracle filter: %s", summary)
    for name, tc in cfg.oracle_trainings():
        call(train_task, run, tc, name)


def _headroom_steps(cfg: RunConfig) -> dict:
    """Headroom's learning curve: the real-only recipe with the topped-up classes thinned to each of
    compare.headroom_fractions (same steps), every point and the full recipe predicted on VAL, the curve
    extrapolated to the plan's quota: eval/headroom.json."""
    run = cfg.run
    ev = cfg.evaluate.model_copy(update={"split": "val", "plots": False})
    points = {1.0: cfg.real_only}
    for f in cfg.compare.headroom_fractions:
        for name, tc in cfg.headroom_trainings(f):
            call(train_task, run, tc, name)
        points[f] = name
    for name in points.values():
        call(evaluate_task, run, name, "val", ev)
    return call(headroom_task, run, points, cfg.compare)


def _benchmark_steps(cfg: RunConfig) -> dict:
    """Three arms on one split, seed, architecture and budget: baseline (real, `train` as given),
    real-only (the recipe on real data) and rebalanced (the recipe on real + synthetic data); a fourth,
    oracle (the recipe on real + the held-back real tail images), where the run made its long tail."""
    _check_tracking(cfg)
    out = _rebalance_steps(cfg)
    cfg = out.pop("config")  # the recipe with the real-only head chosen on val (recipe.candidates)
    run, split = cfg.run, cfg.eval_split
    logger = get_run_logger()
    call(train_task, run, cfg.real_only_train(), cfg.real_only)
    names = [cfg.baseline, cfg.real_only, cfg.rebalanced]
    cand = cfg.run_dir.eval_dir / "candidates.json"
    ref = (read_json(cand).get("reference") or {}) if cfg.recipe.candidates and cand.is_file() else {}
    if ref.get("above") and ref["model"] not in names:  # the stronger real-only model on VAL: on the report too
        names.append(ref["model"])
    why = oracle_blocker(cfg)
    if why is None:
        _oracle_steps(cfg)
        names.append(cfg.oracle)
    else:
        logger.info("no oracle arm: %s", why)
        out["no_oracle"] = why
    for name in names:
        if name != cfg.rebalanced:
            out["metrics"][name] = call(evaluate_task, run, name, split, cfg.evaluate)
    if getattr(cfg.compare, "headroom", False):
        hr = _headroom_steps(cfg)
        out["headroom"] = {k: hr[k] for k in ("room", "low", "high")}
        logger.info("estimated room (headroom, from train and val): %+.1f [%+.1f, %+.1f] points", hr["room"],
                    hr["low"], hr["high"])
    uri = _write_tracking(cfg)  # before the report, whose last line names the curves
    report = call(compare_task, run, names, cfg.real_only, split, cfg.compare, (cfg.real_only, cfg.rebalanced),
                  cfg.oracle if why is None else None, why)
    out["report"] = str(Path(report).resolve())
    if uri:  # every trained model of the run, from its files (eval/track.py)
        out["mlflow"] = call(track_task, run, uri, cfg.track.experiment, cfg.model_dump(mode="json"))
    m = out["metrics"]
    logger.info("balanced accuracy (%s split): %s", split,
                ", ".join(f"{n} {m[n]['balanced_acc']:.4f}" for n in names))
    logger.info("report: %s", out["report"])
    return out


def _check_tracking(cfg: RunConfig) -> None:
    """MLflow asked for but missing: one line before any work."""
    if cfg.track.mlflow:
        from tailforge.eval.track import require_mlflow

        require_mlflow()


def _write_tracking(cfg: RunConfig) -> str | None:
    """eval/tracking.json: the MLflow URI (or null) and the TensorBoard folders of the run's models."""
    from tailforge.eval.track import tracking_uri, write_tracking

    uri = tracking_uri(cfg.run_dir, cfg.track.mlflow)
    write_tracking(cfg.run_dir, uri)
    return uri


@flow(name="measure", description="Build the real manifest and measure class frequencies.", **FLOW_OPTS)
def measure_flow(run: str, data: DataConfig = DataConfig(), measure: MeasureConfig = MeasureConfig()) -> dict:
    return call(measure_task, run, data, measure)


@flow(name="plan", description="Per-class quotas of synthetic samples.", **FLOW_OPTS)
def plan_flow(run: str, plan: PlanConfig = PlanConfig()) -> dict:
    return call(plan_task, run, plan)


@flow(name="generate", description="Generate the plan's shards (fanned out through the task runner).", **FLOW_OPTS)
def generate_flow(run: str, generate: GenerateConfig = GenerateConfig(),
                  runner: RunnerConfig = RunnerConfig(), source: str | None = None) -> int:
    return _generate_steps(run, generate, runner, source)


@flow(name="filter", description="Score and accept candidates by embedding similarity.", **FLOW_OPTS)
def filter_flow(run: str, filter: FilterConfig = FilterConfig()) -> dict:
    return call(filter_task, run, filter)


@flow(name="train", description="Train one classifier on the run's manifest.", **FLOW_OPTS)
def train_flow(run: str, name: str = "rebalanced", train: TrainConfig = TrainConfig()) -> str:
    return call(train_task, run, train, name)


@flow(name="evaluate", description="Evaluate models on a split and compare them with the baseline.", **FLOW_OPTS)
def evaluate_flow(run: str, models: list[str] | None = None, baseline: str = "baseline", split: str = "test") -> dict:
    models = models or RunDir(run).models()
    out = {m: call(evaluate_task, run, m, split) for m in models}
    if baseline in models and len(models) > 1:
        out["report"] = call(compare_task, run, models, baseline, split)
    return out


@flow(name="headroom", description="Estimate the room a perfect generator would give the recipe from the real "
      "train and val splits alone: the recipe re-run with the topped-up classes thinned, its val learning curve "
      "extrapolated to the plan's quota (eval/headroom.json).", **FLOW_OPTS)
def headroom_flow(config: RunConfig = DEFAULT_CONFIG) -> dict:
    with run_lock(config.run, create=True, command="flow headroom"):
        cfg = config
        check_run_folder(cfg)
        write_config(cfg)
        run = cfg.run
        call(measure_task, run, cfg.data, cfg.measure)
        _plan_steps(cfg)
        if cfg.recipe.stage == "crt":
            call(train_task, run, cfg.baseline_train() if cfg.crt_base == cfg.baseline else cfg.backbone_train(),
                 cfg.crt_base)
        cfg = _choose_head_steps(cfg)
        call(train_task, run, cfg.real_only_train(), cfg.real_only)
        return _headroom_steps(cfg)


FLOWS = {"rebalance": rebalance, "benchmark": benchmark, "headroom": headroom_flow}


def run_flow(cfg: RunConfig, which: str = "benchmark") -> dict:
    """Run ``rebalance`` or ``benchmark`` with the task runner the config asks for."""
    prefect_env()
    check_run_folder(cfg)  # before Prefect starts: a contradicting config costs nothing
    _check_tracking(cfg)
    fl = FLOWS[which].with_options(task_runner=make_runner(cfg.runner))
    return fl(config=cfg)
