"""``tailforge eval`` (metrics of one model on one split) and ``tailforge compare`` (models side by side)."""
from __future__ import annotations

import argparse

from tailforge.eval.config import CompareConfig, EvalConfig

from .cliutil import add_model_args, add_run_arg, console, stage_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a trained model on a split (metrics JSON + plots)",
        description="Predict one split with a trained model and write eval/<model>-<split>.json (top-1/top-5, "
        "balanced accuracy, many/medium/few, per-class, macro/weighted F1, MCC, kappa, ECE) plus a confusion "
        "matrix, per-class accuracy vs train count and a reliability diagram.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arg(p)
    p.add_argument("--model-name", required=True, metavar="NAME", help="model folder under models/ (see `ls RUN/models`)")
    p.add_argument("--config", metavar="YAML", help="YAML file with an `evaluate:` (or `eval:`) section")
    add_model_args(p, EvalConfig, group="evaluation")
    p.set_defaults(func=run_eval)

    c = sub.add_parser(
        "compare",
        help="compare evaluated models: mean ± std over seeds, deltas vs a baseline",
        description="Put evaluations side by side. ITEMs are run folders (every model evaluated on the split), "
        "RUN:MODEL specs, or eval JSON files. Models differing only by a -s<seed> suffix are one method "
        "(mean ± std over seeds). Writes report.md and compare.json (default: the first run's eval/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("items", nargs="+", metavar="ITEM", help="run folder, RUN:MODEL or eval JSON")
    c.add_argument("--out", metavar="DIR", help="where to write report.md and compare.json")
    c.add_argument("--config", metavar="YAML", help="YAML file with a `compare:` section")
    add_model_args(c, CompareConfig, group="comparison")
    c.set_defaults(func=run_compare)


def run_eval(args) -> int:
    from tailforge.data import RunDir
    from tailforge.eval import evaluate

    # `evaluate:` is the section's name in a run config (config.yaml); `eval:` is accepted too
    cfg = stage_config(args, EvalConfig, "eval", "evaluate")
    res = evaluate(RunDir(args.run), args.model_name, cfg.split, cfg)
    con = console()
    keys = ("top1", "top5", "balanced_acc", "many", "medium", "few", "macro_f1", "weighted_f1", "mcc", "kappa", "ece")
    con.print(f"{args.model_name} on the {cfg.split} split ({res['n']} images): " + ", ".join(
        f"{k} {res[k]:.4f}" for k in keys if res.get(k) is not None))
    con.print(f"wrote {RunDir(args.run).eval_dir / (args.model_name + '-' + cfg.split + '.json')} and "
              + ", ".join(res["plots"]))
    return 0


def run_compare(args) -> int:
    from tailforge.eval import compare

    cfg = stage_config(args, CompareConfig, "compare")
    res = compare(args.items, cfg=cfg, out_dir=args.out)
    console().print(res["markdown"], markup=False)
    console().print("wrote " + ", ".join(res["written"]))
    return 0
