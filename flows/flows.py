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

from tailforge.data import DataConfig, MeasureConfig, RunDir
from tailforge.data.lock import run_lock

from .env import prefect_env
from .config import (FilterConfig, GenerateConfig, PlanConfig, RunConfig, RunnerConfig, TrainConfig,
                     check_run_folder, load_config, write_config)
from .tasks import (ProgressArtifact, artifact_key, collect_task, compare_task, evaluate_task, filter_task, forget_generators,
                    generate_unit_task, measure_task, plan_task, prepare_generator_task, train_task)

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


def _generate_steps(run: str, gen_cfg, rc: RunnerConfig) -> int:
    """Prepare the generator, fan the work units (consecutive shards of about ``shard_size`` samples)
    out through the task runner, collect candidates."""
    from tailforge import gen
    from tailforge.gen.planner import Plan
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if rc.runner == "dask" and ctx is not None and type(ctx.task_runner).__name__ != "DaskTaskRunner":
        # started with another runner (e.g. a deployment): fan out in a subflow that runs on Dask
        return generate_flow.with_options(task_runner=make_runner(rc))(run, gen_cfg, rc)
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
    return call(collect_task, run, gen_cfg)


def _rebalance_steps(cfg: RunConfig) -> dict:
    run = cfg.run
    check_run_folder(cfg)
    write_config(cfg)
    logger = get_run_logger()
    logger.info("run folder %s (config.yaml written)", Path(run).resolve())
    call(measure_task, run, cfg.data, cfg.measure)
    plan = call(plan_task, run, cfg.plan)
    # the real-only classifier first: the filter's default embedder and featdict's feature space
    call(train_task, run, cfg.baseline_train(), cfg.baseline)
    if cfg.crt_base != cfg.baseline:  # the recipe's own backbone (recipe.backbone_sampler)
        call(train_task, run, cfg.backbone_train(), cfg.crt_base)
    n = _generate_steps(run, cfg.generate, cfg.runner) if plan["total"] > 0 else 0
    logger.info("%d candidates", n)
    summary = call(filter_task, run, cfg.filter_config(), upstream=cfg.crt_base)
    logger.info("filter: %s", summary)
    for name, tc in cfg.arm_trainings(cfg.rebalanced, cfg.recipe.synthetic):  # [own backbone,] the recipe
        call(train_task, run, tc, name)
    metrics = call(evaluate_task, run, cfg.rebalanced, cfg.eval_split, cfg.evaluate)
    return {"run": str(Path(run).resolve()), "candidates": n, "filter": summary, "metrics": {cfg.rebalanced: metrics}}


# --------------------------------------------------------------------------- flows

FLOW_OPTS = dict(log_prints=True, validate_parameters=True, persist_result=False)


@flow(name="rebalance", description="Every stage on one run folder: measure, plan, generate, filter, train, "
      "evaluate.", **FLOW_OPTS)
def rebalance(config: RunConfig = DEFAULT_CONFIG) -> dict:
    with run_lock(config.run, create=True, command="flow rebalance"):  # re-entrant: `tailforge run` holds it
        return _rebalance_steps(config)


@flow(name="benchmark", description="Three arms on the same split, seed and budget: baseline (real only, plain "
      "training), real-only (the rebalancing recipe on real data) and rebalanced (the recipe on real + accepted "
      "synthetic data); publishes the report, which leads with rebalanced vs real-only.", **FLOW_OPTS)
def benchmark(config: RunConfig = DEFAULT_CONFIG) -> dict:
    with run_lock(config.run, create=True, command="flow benchmark"):  # one run per folder (data/lock.py)
        return _benchmark_steps(config)


def _benchmark_steps(cfg: RunConfig) -> dict:
    """Three arms on one split, seed, architecture and budget: baseline (real, `train` as given),
    real-only (the recipe on real data) and rebalanced (the recipe on real + synthetic data)."""
    out = _rebalance_steps(cfg)
    run, split = cfg.run, cfg.eval_split
    call(train_task, run, cfg.real_only_train(), cfg.real_only)
    for name in (cfg.baseline, cfg.real_only):
        out["metrics"][name] = call(evaluate_task, run, name, split, cfg.evaluate)
    names = [cfg.baseline, cfg.real_only, cfg.rebalanced]
    report = call(compare_task, run, names, cfg.real_only, split, cfg.compare, (cfg.real_only, cfg.rebalanced))
    out["report"] = str(Path(report).resolve())
    logger = get_run_logger()
    m = out["metrics"]
    logger.info("balanced accuracy (%s split): %s", split,
                ", ".join(f"{n} {m[n]['balanced_acc']:.4f}" for n in names))
    logger.info("report: %s", out["report"])
    return out


@flow(name="measure", description="Build the real manifest and measure class frequencies.", **FLOW_OPTS)
def measure_flow(run: str, data: DataConfig = DataConfig(), measure: MeasureConfig = MeasureConfig()) -> dict:
    return call(measure_task, run, data, measure)


@flow(name="plan", description="Per-class quotas of synthetic samples.", **FLOW_OPTS)
def plan_flow(run: str, plan: PlanConfig = PlanConfig()) -> dict:
    return call(plan_task, run, plan)


@flow(name="generate", description="Generate the plan's shards (fanned out through the task runner).", **FLOW_OPTS)
def generate_flow(run: str, generate: GenerateConfig = GenerateConfig(),
                  runner: RunnerConfig = RunnerConfig()) -> int:
    return _generate_steps(run, generate, runner)


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


FLOWS = {"rebalance": rebalance, "benchmark": benchmark}


def run_flow(cfg: RunConfig, which: str = "benchmark") -> dict:
    """Run ``rebalance`` or ``benchmark`` with the task runner the config asks for."""
    prefect_env()
    check_run_folder(cfg)  # before Prefect starts: a contradicting config costs nothing
    fl = FLOWS[which].with_options(task_runner=make_runner(cfg.runner))
    return fl(config=cfg)
