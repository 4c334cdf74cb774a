"""``tailforge generate``: run the plan's shards with one generator (writes candidates.parquet)."""
from __future__ import annotations

import argparse

from tailforge.data.errors import TailforgeError
from tailforge.data.manifest import FEATURE_SOURCES
from tailforge.gen.config import DDPMOptions, FDiffOptions, FeatCovOptions, FeatDictOptions, GenerateConfig, SDOptions, WarpOptions

from .cliutil import add_model_args, add_run_arg, build, console, given, load_yaml, section

OPTION_MODELS = (("ddpm", DDPMOptions), ("featdict", FeatDictOptions), ("featcov", FeatCovOptions), ("fdiff", FDiffOptions),
                 ("sd", SDOptions), ("warp", WarpOptions))


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate the planned synthetic samples (ddpm, featdict, featcov, fdiff, sd or warp)",
        description="Run the shards of plan.json with one generator; each shard (one class, an index range) is "
        "written atomically under synthetic/<generator>/ and skipped when re-run; work is handed out in units of "
        "about --shard-size samples (many small class quotas per unit); candidates.parquet is then "
        "rewritten as the union of all finished shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arg(p)
    p.add_argument("--config", metavar="YAML", help="YAML file with a `generate:` section (nested ddpm:/featdict:/sd:)")
    p.add_argument("--shard", metavar="I/N", help="run only every N-th work unit starting at I (parallel workers; "
                   "a unit is consecutive shards of about --shard-size samples, as the flow's tasks)")
    p.add_argument("--grids", action=argparse.BooleanOptionalAction, default=True,
                   help="write a sample-grid PNG per class (image generators)")
    add_model_args(p, GenerateConfig, group="generate")
    for name, model in OPTION_MODELS:
        add_model_args(p, model, group=f"{name} generator")
    p.set_defaults(func=run)


def make_config(args) -> GenerateConfig:
    part = dict(section(load_yaml(args.config), "generate", source=args.config))
    for name, model in OPTION_MODELS:
        opts = given(args, model)
        if opts:
            mine = part.get(name) or {}
            if not isinstance(mine, dict):
                raise TailforgeError(f"generate.{name} in config file {args.config} must be a mapping of keys to "
                                     f"values, got {type(mine).__name__}", f"write `{name}:` followed by indented "
                                     "`key: value` lines")
            part[name] = {**mine, **opts}
    return build(GenerateConfig, part, given(args, GenerateConfig), what="generate config")


def run(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from tailforge.data import RunDir
    from tailforge.gen import generate, write_sample_grids

    cfg = make_config(args)
    r = RunDir(args.run)
    con = console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=con) as bar:
        tasks: dict[str, int] = {}

        def progress(done: int, total: int, info: dict) -> None:
            stage = info.get("stage", "generate")
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info="")
            extra = " ".join(f"{k}={v}" for k, v in info.items() if k in ("loss", "class", "shard"))
            bar.update(tasks[stage], completed=done, total=total, info=extra)

        df = generate(r, cfg, progress=progress, shard=args.shard)
    mine = df[df["generator"] == cfg.generator]
    counts = mine.groupby("class_name", sort=False).size()
    if len(counts) <= 30:
        con.print(f"{cfg.generator}: {len(mine):,} candidates " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    else:  # thousands of classes: a summary, not a line of thousands of counts
        con.print(f"{cfg.generator}: {len(mine):,} candidates in {len(counts):,} classes (per class: min "
                  f"{counts.min()}, median {int(counts.median())}, max {counts.max()})")
    con.print(f"wrote {r.candidates} ({len(df):,} rows, all generators)")
    from tailforge.gen.planner import Plan

    planned = Plan.load(r).total
    if len(mine) < planned:  # --shard i/n: the other workers' shards are not in yet
        con.print(f"[yellow]note:[/] {len(mine):,} of the plan's {planned:,} {cfg.generator} samples are finished; "
                  "run the other --shard workers (or this command without --shard) before `tailforge filter`")
    if args.grids and cfg.generator not in FEATURE_SOURCES and len(mine):
        paths = write_sample_grids(r, cfg.generator)
        con.print(f"sample grids: {paths[0].parent}/ ({len(paths)} classes)")
    return 0
