"""``tailforge measure``: build the run's real manifest and measure its class frequencies."""
from __future__ import annotations

from tailforge.data.config import DataConfig, MeasureConfig

from .cliutil import add_model_args, add_run_arg, console, load_yaml, stage_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "measure",
        help="build the real manifest (splits, long-tail) and measure class frequencies",
        description="Load a dataset, split it, make the train split long-tailed, write real.parquet, "
        "counts.json and counts.png into the run folder, and print per-class counts and groups.",
    )
    add_run_arg(p)
    p.add_argument("--config", metavar="YAML", help="YAML file with a `data:` and/or `measure:` section")
    add_model_args(p, DataConfig, group="dataset and long-tail construction")
    add_model_args(p, MeasureConfig, prefix="group_", group="groups (many / medium / few)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tailforge.data import RunDir, build_manifest, measure_run

    cfg_file = load_yaml(args.config)
    data_cfg = stage_config(args, DataConfig, "data", file=cfg_file)
    m_cfg = stage_config(args, MeasureConfig, "measure", prefix="group_", file=cfg_file)
    run_dir = RunDir(args.run)
    build_manifest(data_cfg, run_dir)
    stats = measure_run(run_dir, m_cfg)
    print_stats(stats, run_dir)
    return 0


def print_stats(stats, run_dir) -> None:
    from rich.table import Table

    from tailforge.data.classtable import short_name

    con = console()
    t = Table(title=f"{stats.dataset}: images per class and split", show_lines=False)
    for col in ("class", "name", "train", "val", "test", "group"):
        t.add_column(col, justify="right" if col in ("class", "train", "val", "test") else "left")
    order = sorted(range(stats.num_classes), key=lambda i: -stats.counts["train"][i])
    show = order if len(order) <= 40 else order[:20] + order[-20:]
    for i in show:
        t.add_row(str(i), short_name(stats.class_names[i], 40), *(str(stats.counts[s][i]) for s in ("train", "val", "test")),
                  stats.groups[i])
    con.print(t)
    total = {s: sum(stats.counts[s]) for s in ("train", "val", "test")}
    con.print(f"train {total['train']:,} / val {total['val']:,} / test {total['test']:,} images; "
              f"imbalance factor {stats.imbalance_factor:.1f}; Gini {stats.gini:.3f}; groups ({stats.group_rule}): "
              + ", ".join(f"{g} {n}" for g, n in stats.group_sizes.items()))
    con.print(f"wrote {run_dir.real}, {run_dir.counts}, {run_dir.root / 'counts.png'}")
