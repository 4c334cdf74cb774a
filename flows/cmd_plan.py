"""``tailforge plan``: per-class quotas of synthetic samples (writes plan.json)."""
from __future__ import annotations

import argparse

from tailforge.gen.config import PlanConfig

from .cliutil import add_model_args, add_run_arg, console, stage_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="decide how many synthetic samples each class gets (plan.json)",
        description="Read counts.json and write plan.json: per class the real train count, the target, the "
        "need and the number to generate (need x over-generation, capped by the budget).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arg(p)
    p.add_argument("--config", metavar="YAML", help="YAML file with a `plan:` section")
    add_model_args(p, PlanConfig, group="plan")
    p.set_defaults(func=run)


def run(args) -> int:
    from tailforge.data import RunDir
    from tailforge.gen import plan_run

    cfg = stage_config(args, PlanConfig, "plan")
    r = RunDir(args.run)
    if cfg.target == "room" and not has_curve(r, cfg):
        return measure_then_plan(r, cfg)
    print_plan(plan_run(r, cfg), r)
    return 0


def has_curve(run, cfg) -> bool:
    """Whether eval/headroom.json holds a learning curve for every class a room plan may top up."""
    import numpy as np

    from tailforge.data import ClassStats, read_json
    from tailforge.gen.planner import check_headroom, plan

    path = run.eval_dir / "headroom.json"
    if not path.exists():
        return False
    caps = plan(ClassStats.load(run), cfg.model_copy(update={"target": "balance", "budget": None}))
    try:
        check_headroom(read_json(path), np.array([q.need for q in caps.classes]))
    except Exception:
        return False
    return True


def measure_then_plan(run, cfg) -> int:
    """A room plan with no learning curve yet: the run's recipe and plan (config.yaml) measure it first (`tailforge
    headroom`'s flow: the real-only recipe and its thinned points), then the room plan is made from it."""
    import time
    from pathlib import Path

    from tailforge.data import TailforgeError
    from tailforge.data.lock import run_lock

    from .config import load_config

    conf = Path(run.root) / "config.yaml"
    if not conf.is_file():
        raise TailforgeError(f"plan target 'room' needs each class's learning curve, and run folder {run.root} has "
                             "neither eval/headroom.json nor a config.yaml to measure it with",
                             f"run `tailforge headroom --run {run.root} --config YAML --set plan.target=room --set "
                             f"plan.budget={cfg.budget}` (or `tailforge run` with them)")
    full = load_config(conf, {"run": str(run.root)})  # the run's own plan: its curve covers the classes below the largest
    console().print("plan target room: no learning curve in eval/headroom.json yet, so measuring it first "
                    "(the recipe with the classes below the largest thinned; `tailforge headroom`) ...")
    with run_lock(full.run, create=True, command="tailforge plan"):
        from . import prefect_env

        prefect_env()
        from .flows import run_flow
        from .guard import quiet_user_errors

        quiet_user_errors()
        t0 = time.perf_counter()
        run_flow(full, "headroom")
        console().print(f"learning curve measured in {time.perf_counter() - t0:.0f} s")
    from tailforge.gen import plan_run

    print_plan(plan_run(run, cfg), run)
    return 0


def print_plan(plan, run) -> None:
    from rich.table import Table

    from tailforge.data.classtable import short_name

    con = console()
    t = Table(title=f"plan: target {plan.target}, over-generation x{plan.overgen:g}"
              + (f", budget {plan.budget:,}" if plan.budget else ""))
    for col in ("class", "name", "have", "target", "need", "generate"):
        t.add_column(col, justify="left" if col == "name" else "right")
    rows = sorted(plan.classes, key=lambda q: q.have)
    if len(rows) > 40:  # thousands of classes: the 20 rarest and the 20 largest; every class is in plan.json
        t.caption = f"the 20 rarest and the 20 largest of {len(rows):,} classes; every class: {run.plan}"
        rows = rows[:20] + rows[-20:]
    for q in rows:
        t.add_row(str(q.label), short_name(q.class_name, 40), str(q.have), str(q.target), str(q.need), str(q.generate))
    con.print(t)
    con.print(f"total to generate: {plan.total:,}; wrote {run.plan}")
    if plan.note:
        con.print(plan.note)
    if plan.total == 0:  # e.g. --classes many, or a fixed count below every class: later stages would do nothing
        con.print("[yellow]note:[/] nothing to generate: every selected class already has its target "
                  "(choose other --classes, a higher --count, or --target balance)")
