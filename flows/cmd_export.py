"""``tailforge export``: the rebalanced dataset (real + accepted synthetic train samples, val and test) as files
another trainer reads: an image folder, Hugging Face parquet shards or WebDataset tar shards (data/export.py)."""
from __future__ import annotations

import argparse

from tailforge.data.export import ExportConfig

from .cliutil import add_model_args, add_run_arg, console, stage_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write the rebalanced dataset (real + accepted synthetic train samples, val, test) for other trainers",
        description="Write the train split the rebalanced arm trains on (the real images plus the accepted synthetic "
        "ones, with their provenance: source, generator, seed, parent) and the real val and test splits to --to, as "
        "an image folder (DIR/<split>/<class>/, hard links where possible), Hugging Face parquet shards with an Image "
        "and a ClassLabel feature, or WebDataset tar shards. Feature-space samples (featcov, featdict, fdiff) go to "
        "DIR/features/. The folder appears when complete; an interrupted export resumes; a non-empty --to that "
        "holds something else is refused without --overwrite.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arg(p)
    p.add_argument("--config", metavar="YAML", help="YAML file with an `export:` section (or top-level keys)")
    add_model_args(p, ExportConfig, group="export")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tailforge.data import RunDir
    from tailforge.data.export import describe, export_run

    cfg = stage_config(args, ExportConfig, "export", top_level=True)
    run_dir = RunDir(args.run)
    run_dir.require(run_dir.real, "measure")
    con = console()
    with Progress(TextColumn("export {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=con, transient=True) as bar:
        task = bar.add_task(cfg.format, total=None)

        def progress(done: int, total: int, info: dict) -> None:
            bar.update(task, completed=done, total=total, description=f"{cfg.format} {info.get('split', '')}")

        out = export_run(run_dir, cfg, progress=progress)
    if out["up_to_date"]:
        con.print(f"{cfg.to} already holds this export (finished {out.get('finished', '?')}), nothing to do",
                  soft_wrap=True)
    else:
        con.print(describe(out, cfg.to) + f" in {out['seconds']:.1f} s", soft_wrap=True)
    for note in out.get("notes", []):
        con.print(note, soft_wrap=True)
    return 0
