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
    print_plan(plan_run(r, cfg), r)
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
    if plan.total == 0:  # e.g. --classes many, or a fixed count below every class: later stages would do nothing
        con.print("[yellow]note:[/] nothing to generate: every selected class already has its target "
                  "(choose other --classes, a higher --count, or --target balance)")
