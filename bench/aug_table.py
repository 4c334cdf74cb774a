"""Does loss-guided augmentation (train.aug_policy: loss_guided) beat the small-images recipe's real-only arm?

The loss-guided row of issue 24's table. Fashion-MNIST-LT (IF 100), the product's recipe
(flows/recipes/small-images.yaml) through ``tailforge run``, seeds ``data.seed = train.seed = s``:

- ``real-only``: the recipe's real-only arm: cRT (class-balanced sampling, CE, 10 epochs) on the frozen backbone
  of the tiny CNN trained 20 epochs with class-balanced re-sampling (the recipe's ``backbone``);
- ``loss-guided``: the same, with the backbone trained with loss-guided augmentation (BCL's per-sample
  momentum loss -> RandAugment probability and magnitude, train/lossaug.py, its defaults).

Both arms take the same optimizer steps (the backbone: the real train set per epoch, 20 epochs; the cRT head:
``epoch_samples: balanced``). Each arm is its own run folder; its ``real-only`` model is evaluated on TEST by
the flow (the reported numbers) and selected on VAL (best epoch by val balanced accuracy, ``best.json``).

CPU cost. In the recipe, the ``baseline`` (plain CE, instance sampling) is trained besides the backbone and
does not enter this comparison. With ``--mode shared`` (default) each arm's backbone IS its ``baseline``
(``train.sampler: class_balanced``, ``train.epoch_samples: real``, ``recipe.backbone_sampler: null``,
``generate.feature_model: baseline``): the same training settings as the recipe's ``backbone`` (the script
asserts that the two configs have the same identity, the name aside), one CNN training per arm instead of two.
``--mode recipe`` runs the recipe file as it is, plus ``recipe.backbone_aug_policy: loss_guided`` for the
second arm.

    OMP_NUM_THREADS=1 nice -n 5 python bench/aug_table.py --seeds 0 1 2 --parallel 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "flows" / "recipes" / "small-images.yaml"
ARMS = ("real-only", "loss-guided")


def overrides(seed: int, arm: str, mode: str, imbalance: int) -> list[str]:
    sets = [f"data.dataset=fashion-mnist", f"data.imbalance={imbalance}", f"data.seed={seed}", f"train.seed={seed}",
            "evaluate.plots=false"]
    if mode == "shared":
        sets += ["train.sampler=class_balanced", "train.epoch_samples=real", "recipe.backbone_sampler=null",
                 "generate.feature_model=baseline"]
        if arm == "loss-guided":
            sets.append("train.aug_policy=loss_guided")
    elif arm == "loss-guided":
        sets.append("recipe.backbone_aug_policy=loss_guided")
    return sets


def parse_sets(sets: list[str]) -> dict:
    from tailforge.flows.config import parse_set

    return parse_set(sets)


def check_shared_is_the_recipe(imbalance: int) -> None:
    """``--mode shared``'s backbone (its baseline) has the recipe's backbone training settings."""
    from tailforge.flows.config import load_config

    for arm in ARMS:
        recipe = load_config(RECIPE, parse_sets(overrides(0, arm, "recipe", imbalance)))
        shared = load_config(RECIPE, parse_sets(overrides(0, arm, "shared", imbalance)))
        a, b = recipe.backbone_train().identity(), shared.baseline_train().identity()
        assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert recipe.real_only_train().identity() == {**shared.real_only_train().identity(),
                                                       "base": recipe.crt_base}


def run_arm(work: Path, seed: int, arm: str, mode: str, imbalance: int) -> dict:
    run = work / f"fm{imbalance}-s{seed}-{arm}"
    log = work / f"fm{imbalance}-s{seed}-{arm}.log"
    sets = overrides(seed, arm, mode, imbalance)
    cmd = [str(Path(sys.executable).with_name("tailforge")), "run", "--config", str(RECIPE), "--run", str(run)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PREFECT_HOME=str(work / f"prefect-{seed}-{arm}"))
    t0 = time.time()
    if not (run / "eval" / "real-only-test.json").is_file():
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if r.returncode != 0:
            raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    test = json.loads((run / "eval" / "real-only-test.json").read_text())
    best = json.loads((run / "models" / "real-only" / "best.json").read_text())
    bb = "baseline" if mode == "shared" else "backbone"
    bb_best = json.loads((run / "models" / bb / "best.json").read_text())
    bb_log = [json.loads(x) for x in (run / "models" / bb / "log.jsonl").read_text().splitlines()]
    meta = json.loads((run / "models" / bb / "config.json").read_text())["meta"]
    return {"seed": seed, "arm": arm, "mode": mode, "run": str(run), "sets": sets, "wall_s": round(time.time() - t0),
            "test": {k: test[k] for k in ("balanced_acc", "top1", "macro_f1", "many", "medium", "few")},
            "val_balanced_acc": best["val_balanced_acc"], "backbone_val_balanced_acc": bb_best["val_balanced_acc"],
            "backbone_steps_per_epoch": meta["steps_per_epoch"],
            "backbone_epoch_s": round(float(np.mean([r["time_s"] for r in bb_log])), 1),
            "lossaug_last": bb_log[-1].get("lossaug")}


def table(rows: list[dict]) -> str:
    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        return f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals, ddof=1):.2f}" if len(vals) > 1 else \
            f"{100 * vals[0]:.2f}"

    out = ["| arm | seeds | TEST balanced acc | TEST top-1 | TEST many | TEST medium | TEST few | VAL balanced acc "
           "(cRT) | VAL balanced acc (backbone) |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        t = [r["test"] for r in rs]
        out.append(f"| {arm} | {','.join(str(r['seed']) for r in rs)} | {ms([x['balanced_acc'] for x in t])} | "
                   f"{ms([x['top1'] for x in t])} | {ms([x['many'] for x in t])} | {ms([x['medium'] for x in t])} | "
                   f"{ms([x['few'] for x in t])} | {ms([r['val_balanced_acc'] for r in rs])} | "
                   f"{ms([r['backbone_val_balanced_acc'] for r in rs])} |")
    pairs = []
    for s in sorted({r["seed"] for r in rows}):
        a = [r for r in rows if r["seed"] == s and r["arm"] == "real-only"]
        b = [r for r in rows if r["seed"] == s and r["arm"] == "loss-guided"]
        if a and b:
            pairs.append((s, b[0]["test"]["balanced_acc"] - a[0]["test"]["balanced_acc"]))
    if pairs:
        out.append("")
        out.append("Paired TEST balanced-accuracy difference (loss-guided - real-only), per seed: "
                   + ", ".join(f"s{s}: {100 * d:+.2f}" for s, d in pairs)
                   + (f"; mean {100 * np.mean([d for _, d in pairs]):+.2f}" if len(pairs) > 1 else ""))
    return "\n".join(out)


def status(work: Path, seeds: list[int], mode: str, imbalance: int) -> str:
    """Unfinished runs: the epochs their backbone has done and its VAL balanced accuracy per epoch (no TEST)."""
    bb = "baseline" if mode == "shared" else "backbone"
    out = []
    for s in seeds:
        for arm in ARMS:
            run = work / f"fm{imbalance}-s{s}-{arm}"
            if (run / "eval" / "real-only-test.json").is_file():
                continue
            logf = next((f for f in (run / "models" / bb / "log.jsonl", run / "models" / f".work-{bb}" / "log.jsonl")
                         if f.is_file()), None)
            recs = [json.loads(x) for x in logf.read_text().splitlines()] if logf else []
            curve = ", ".join(f"{100 * r['val_balanced_acc']:.1f}" for r in recs)
            out.append(f"| s{s} {arm} | {len(recs)} of 20 | {curve or '-'} |")
    if not out:
        return ""
    return "\n".join(["Unfinished runs (backbone epochs done; VAL balanced accuracy of the backbone after each epoch, "
                      "no TEST number):", "", "| run | backbone epochs | VAL balanced acc per epoch (%) |",
                      "|---|---|---|"] + out)


def preamble(args, finished: int) -> str:
    """What the table is and what ran (written above it by ``--status --write-status``)."""
    import datetime

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# Loss-guided augmentation vs the small-images recipe's real-only arm\n\n"
            f"Fashion-MNIST-LT, IF {args.imbalance}, `flows/recipes/small-images.yaml` through `tailforge run` "
            f"(mode `{args.mode}`: see the docstring of bench/aug_table.py), seeds {args.seeds} "
            f"(data.seed = train.seed), TEST reported, VAL for selection. Arms: `real-only` (the recipe's cRT on its "
            f"class-balanced backbone) and `loss-guided` (the same with train.aug_policy loss_guided, BCL's "
            f"defaults, in the backbone's training); the same optimizer steps.\n\n"
            f"Status at {when}: {finished} of {2 * len(args.seeds)} arm runs finished. Written by "
            f"`python bench/aug_table.py --status --write-status --seeds {' '.join(map(str, args.seeds))}`."
            + (" **No verdict**: fewer than 3 seeds have both arms finished; an unfinished run resumes from its last "
               "epoch when `python bench/aug_table.py` is run again (its work folders are kept)." if finished < 6
               else "") + "\n\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--imbalance", type=int, default=100)
    ap.add_argument("--mode", choices=("shared", "recipe"), default="shared")
    ap.add_argument("--parallel", type=int, default=2, help="run folders trained at once")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "aug_table")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "aug_table")
    ap.add_argument("--status", action="store_true", help="only collect: finished runs into the table, unfinished "
                    "ones as their VAL curves so far (runs nothing)")
    ap.add_argument("--write-status", action="store_true", help="with --status: write it to --out .md/.json")
    args = ap.parse_args(argv)
    if args.status:
        rows = []
        for s in args.seeds:
            for arm in ARMS:
                if (args.work / f"fm{args.imbalance}-s{s}-{arm}" / "eval" / "real-only-test.json").is_file():
                    rows.append(run_arm(args.work, s, arm, args.mode, args.imbalance))
        text = table(rows) + "\n\n" + status(args.work, args.seeds, args.mode, args.imbalance)
        print(text)
        if args.write_status:
            from tailforge.data.atomic import write_json, write_text

            bb = "baseline" if args.mode == "shared" else "backbone"
            curves = {}
            for s in args.seeds:
                for arm in ARMS:
                    d = args.work / f"fm{args.imbalance}-s{s}-{arm}" / "models"
                    f = next((x for x in (d / bb / "log.jsonl", d / f".work-{bb}" / "log.jsonl") if x.is_file()), None)
                    curves[f"s{s}-{arm}"] = [json.loads(x)["val_balanced_acc"] for x in f.read_text().splitlines()] \
                        if f else []
            write_json(args.out.with_suffix(".json"), {
                "dataset": "fashion-mnist", "imbalance": args.imbalance, "recipe": str(RECIPE.relative_to(ROOT)),
                "mode": args.mode, "split_reported": "test", "selection_split": "val", "rows": rows,
                "unfinished_backbone_val_balanced_acc_per_epoch": {k: v for k, v in curves.items()
                                                                   if not any(r["run"].endswith(k) for r in rows)}})
            write_text(args.out.with_suffix(".md"), preamble(args, len(rows)) + text + "\n")
        return 0
    if args.mode == "shared":
        check_shared_is_the_recipe(args.imbalance)
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(s, arm) for s in args.seeds for arm in ARMS]
    rows = []

    def write() -> None:
        from tailforge.data.atomic import write_json, write_text

        done = sorted(rows, key=lambda r: (r["seed"], ARMS.index(r["arm"])))
        write_json(args.out.with_suffix(".json"), {"dataset": "fashion-mnist", "imbalance": args.imbalance,
                                                   "recipe": str(RECIPE.relative_to(ROOT)), "mode": args.mode,
                                                   "split_reported": "test", "selection_split": "val",
                                                   "rows": done})
        write_text(args.out.with_suffix(".md"), table(done) + "\n")

    with ThreadPoolExecutor(args.parallel) as ex:
        for row in ex.map(lambda j: run_arm(args.work, j[0], j[1], args.mode, args.imbalance), jobs):
            rows.append(row)
            print(json.dumps(row), flush=True)
            write()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
