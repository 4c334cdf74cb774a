"""``tailforge filter``: score the synthetic candidates against the real train split and keep the useful ones."""
from __future__ import annotations

import argparse

from tailforge.eval.filter import FilterConfig

from .cliutil import add_model_args, add_run_arg, console, stage_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "filter",
        help="score candidates by embedding similarity (faiss) and keep the best up to each class's quota",
        description="Embed the real TRAIN images and the candidates (classifier, clip or timm embedder), reject "
        "wrong-class, low-fidelity, near-copy and duplicate candidates, keep the best up to the plan's quota, "
        "and write filtered.parquet plus filter/classes.md, filter/scores.png and per tail class "
        "filter/grid_<label>_<class>.png. Val and test images are never read.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arg(p)
    p.add_argument("--config", metavar="YAML", help="YAML file with a `filter:` section (or top-level keys)")
    add_model_args(p, FilterConfig, group="filter")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from tailforge.data import RunDir
    from tailforge.eval.filter import filter_candidates

    cfg = stage_config(args, FilterConfig, "filter", top_level=True)
    run_dir = RunDir(args.run)
    con = console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=con, transient=True) as bar:
        task = bar.add_task("filter", total=1, info="")

        def progress(done: int, total: int, info: dict) -> None:
            what = f"{info.get('stage', '')} {info.get('space', '')}".strip()
            sub = f"{info['done']}/{info['total']}" if "done" in info else ""
            bar.update(task, completed=done, total=total, description=what or "filter", info=sub)

        out = filter_candidates(run_dir, cfg, progress=progress)
    counts = out["reason"].replace("", "accepted").value_counts()
    con.print(f"{int(out['accepted'].sum())} of {len(out)} candidates accepted ("
              + ", ".join(f"{k} {int(v)}" for k, v in counts.items()) + ")")
    con.print(f"wrote {run_dir.filtered} and {run_dir.root / 'filter'}/ (classes.md, scores.png, grids)")
    return 0
