"""Room and capture, measured by the product: exact room (the oracle arm) vs estimated room (headroom).

For each dataset and seed it runs the product's own benchmark flow with the small-images recipe and
``compare.headroom=true`` (``tailforge run``: baseline, real-only, rebalanced (featcov), oracle, and the
headroom learning curve), then evaluates ``real-only``, ``rebalanced`` and ``oracle`` on VAL too
(``tailforge eval``). From the run folders it tabulates, in points of balanced accuracy:

* test: real-only, rebalanced, oracle; exact room = oracle - real-only; gain = rebalanced - real-only;
* the estimated room of eval/headroom.json (the product's default fit) and its 90 % interval;
* for choosing the fit on VAL: every fit of ``tailforge.eval.room.estimate_room`` re-computed from the
  stored VAL predictions of the learning curve, against the exact room on VAL.

Datasets (the held-out command's settings for folders: IF 50, 28 px):
  fmnist100   Fashion-MNIST-LT IF 100 (Debian's Fashion-MNIST)
  fmnist10    Fashion-MNIST-LT IF 10
  ffold       a 28 px Fashion-MNIST image folder, 1,000 per class (bench/make_fashion_folder.py), IF 50
  letters     the offline letters folder (bench/make_font_folder.py, 1,300 per class), IF 50

    python bench/make_fashion_folder.py /tmp/ffold && python bench/make_font_folder.py /tmp/letters
    python bench/room_table.py --datasets letters ffold fmnist100 fmnist10 --seeds 0 1 2 --jobs 2

Runs go to runs/room/<dataset>-s<seed> (finished runs are reused); results to
bench/results/room_table.{md,json}.
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

from tailforge.data import ClassStats, RunDir, read_json
from tailforge.eval.evaluate import load_pred
from tailforge.eval.room import FITS, estimate_room

RECIPE = "flows/recipes/small-images.yaml"
DATASETS = {
    "fmnist100": ["data.dataset=fashion-mnist", "data.imbalance=100"],
    "fmnist10": ["data.dataset=fashion-mnist", "data.imbalance=10"],
    "ffold": ["data.dataset=imagefolder", "data.root={ffold}", "data.imbalance=50", "data.image_size=28"],
    "letters": ["data.dataset=imagefolder", "data.root={letters}", "data.imbalance=50", "data.image_size=28"],
    # 26 classes (25 topped up: enough for a per-class rank correlation): make_font_folder.py --letters a..z
    "letters26": ["data.dataset=imagefolder", "data.root={letters26}", "data.imbalance=50", "data.image_size=28",
                  "train.hflip=false"],
    # 52 classes (a..z and A..Z, several pairs alike at 28 px): make_font_folder.py --per-class 800 --letters a..zA..Z
    "letters52": ["data.dataset=imagefolder", "data.root={letters52}", "data.imbalance=50", "data.image_size=28",
                  "train.hflip=false"],
}


def tf(*args, log=None, threads=1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "tailforge.flows.cli", *args]
    with open(log, "a") if log else open(os.devnull, "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, env=env)


def dataset_sets(ds: str, a) -> list[str]:
    """The dataset's run settings with the folders' locations filled in from ``a`` (--ffold, --letters, ...)."""
    return [s.format(ffold=a.ffold, letters=a.letters, letters26=a.letters26, letters52=a.letters52)
            for s in DATASETS[ds]]


def one(ds: str, seed: int, a) -> dict:
    run = Path(a.runs) / f"{ds}-s{seed}"
    sets = dataset_sets(ds, a)
    sets += [f"data.seed={seed}", f"train.seed={seed}", f"generate.seed={seed}", "compare.headroom=true"]
    t0 = time.time()
    log = str(run) + ".log"
    run.parent.mkdir(parents=True, exist_ok=True)
    tf("run", "--wait", "--config", RECIPE, "--run", str(run), *sum((["--set", s] for s in sets), []), log=log,
       threads=a.threads)
    for m in ("real-only", "rebalanced", "oracle"):
        if not (run / "eval" / f"{m}-val-pred.npy").exists():
            tf("eval", "--run", str(run), "--model-name", m, "--split", "val", "--no-plots", log=log,
               threads=a.threads)
    secs = time.time() - t0
    print(f"{run}: {secs:.0f} s", flush=True)
    return collect(run, secs)


def collect(run: Path, secs: float | None = None) -> dict:
    r = RunDir(run)
    ev = {(m, s): read_json(r.eval_dir / f"{m}-{s}.json") for m in ("real-only", "rebalanced", "oracle")
          for s in ("val", "test")}
    ba = {k: 100 * v["balanced_acc"] for k, v in ev.items()}
    hr = read_json(r.eval_dir / "headroom.json")
    row = {"run": str(run), "seconds": secs,
           **{f"{m}_{s}": ba[(m, s)] for (m, s) in ba},
           "room_test": ba[("oracle", "test")] - ba[("real-only", "test")],
           "room_val": ba[("oracle", "val")] - ba[("real-only", "val")],
           "gain_test": ba[("rebalanced", "test")] - ba[("real-only", "test")],
           "est": hr["room"], "est_low": hr["low"], "est_high": hr["high"], "est_fit": hr["fit"]}
    # every fit again from the stored VAL predictions (the product's estimator, nothing re-trained)
    stats = ClassStats.load(r)
    plan = read_json(r.plan)
    need = np.zeros(stats.num_classes)
    for q in plan["classes"]:
        need[int(q["label"])] = q["need"]
    preds = {}
    for f, name in hr["models"].items():
        y, preds[float(f)] = load_pred(r, name, "val")
    for name, sub in variants(preds):
        e = estimate_room(y, sub, stats.counts["train"], need, stats.groups, fit=name.split("@")[0], b=200,
                          confidence=0.9)
        row[f"est_{name}"] = e["room"]
        row[f"est_{name}_low"], row[f"est_{name}_high"] = e["low"], e["high"]
    # the product's default estimator (CompareConfig), re-computed from the stored VAL predictions: a run made
    # before the default was chosen on VAL has another fit in its eval/headroom.json
    from tailforge.eval.config import CompareConfig

    d = CompareConfig()
    name = f"{d.headroom_fit}@{','.join(str(f) for f in d.headroom_fractions)}"
    if f"est_{name}" in row:
        row["est"], row["est_low"], row["est_high"], row["est_fit"] = (row[f"est_{name}"], row[f"est_{name}_low"],
                                                                       row[f"est_{name}_high"], name)
    return row


def variants(preds: dict) -> list[tuple[str, dict]]:
    """Every fit on every learning-curve point set the run has: ``power@0.5,0.25`` (all points), ``power@0.5``."""
    out = []
    thinned = sorted((f for f in preds if f < 1), reverse=True)
    sets = [thinned] + [[f] for f in thinned if len(thinned) > 1]
    for fs in sets:
        for fit in FITS:
            out.append((f"{fit}@{','.join(str(f) for f in fs)}", {1.0: preds[1.0], **{f: preds[f] for f in fs}}))
    return out


def ms(vals) -> str:
    v = np.asarray(vals, dtype=float)
    return f"{v.mean():+.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():+.2f}"


def m(vals) -> str:
    v = np.asarray(vals, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def table(res: dict) -> str:
    out = ["| data | seeds | real-only | rebalanced (featcov) | oracle | exact room | estimated room "
           "(default fit) | 90 % interval (mean of seeds) | captured by featcov |", "|---|---:|" + "---:|" * 7]
    for ds, rows in res.items():
        room = np.mean([r["room_test"] for r in rows])
        gain = np.mean([r["gain_test"] for r in rows])
        cap = f"{100 * gain / room:.0f} %" if room > 0 else "– (no room)"
        out.append(f"| {ds} | {len(rows)} | {m([r['real-only_test'] for r in rows])} | "
                   f"{m([r['rebalanced_test'] for r in rows])} | {m([r['oracle_test'] for r in rows])} | "
                   f"{ms([r['room_test'] for r in rows])} | {ms([r['est'] for r in rows])} | "
                   f"[{np.mean([r['est_low'] for r in rows]):+.2f}, {np.mean([r['est_high'] for r in rows]):+.2f}] | "
                   f"{cap} |")
    every = [set(r) for rows in res.values() for r in rows]  # estimators every run has (runs made with fewer
    names = [k[4:] for k in next(iter(res.values()))[0] if k.startswith("est_") and "@" in k  # curve points
             and not k.endswith(("_low", "_high")) and all(k in e for e in every)]  # have fewer)
    out += ["", "Choosing the estimator on VAL: each fit (tailforge.eval.room) on each set of learning-curve points "
            "(`@0.5,0.25`: both thinned models; `@0.5`: the half-data model only), its estimate against the exact "
            "room on VAL, mean over seeds; the last columns: mean |error| over the datasets and the largest:", "",
            "| estimator | " + " | ".join(res) + " | mean abs. error | max abs. error |",
            "|---|" + "---:|" * (len(res) + 2),
            "| exact room (val) | " + " | ".join(f"{np.mean([r['room_val'] for r in rows]):+.2f}" for rows in res.values())
            + " | | |"]
    scored = []
    for n in names:
        ests = [np.mean([r[f"est_{n}"] for r in rows]) for rows in res.values()]
        errs = [abs(e - np.mean([r["room_val"] for r in rows])) for e, rows in zip(ests, res.values())]
        scored.append((np.mean(errs), n, ests, max(errs)))
    for err, n, ests, worst in sorted(scored):
        out.append(f"| `{n}` | " + " | ".join(f"{e:+.2f}" for e in ests) + f" | {err:.2f} | {worst:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["letters", "ffold", "fmnist100", "fmnist10"],
                    choices=list(DATASETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="runs/room")
    ap.add_argument("--ffold", default="/tmp/ffold")
    ap.add_argument("--letters", default="/tmp/letters")
    ap.add_argument("--letters26", default="/tmp/letters26")
    ap.add_argument("--letters52", default="/tmp/letters52")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads torch threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/room_table")
    ap.add_argument("--collect-only", action="store_true", help="tabulate finished run folders, run nothing")
    ap.add_argument("--order", nargs="+", metavar="DATASET:SEED", help="run exactly these, in this order "
                    "(default: every dataset x seed); the table still covers --datasets x --seeds")
    a = ap.parse_args(argv)
    jobs = [(ds, s) for ds in a.datasets for s in a.seeds]
    todo = [(o.split(":")[0], int(o.split(":")[1])) for o in a.order] if a.order else jobs
    if a.collect_only:
        rows = [collect(Path(a.runs) / f"{ds}-s{s}") if (Path(a.runs) / f"{ds}-s{s}" / "eval" / "headroom.json").exists()
                else None for ds, s in jobs]
    else:
        with ThreadPoolExecutor(a.jobs) as ex:
            done = dict(zip(todo, ex.map(lambda j: one(j[0], j[1], a), todo)))
        rows = [done.get(j) or (collect(Path(a.runs) / f"{j[0]}-s{j[1]}")
                                if (Path(a.runs) / f"{j[0]}-s{j[1]}" / "eval" / "oracle-val.json").exists() else None)
                for j in jobs]
    res: dict = {}
    for (ds, s), row in zip(jobs, rows):
        if row is not None and (Path(row["run"]) / "eval" / "oracle-val.json").exists():
            res.setdefault(ds, []).append({"seed": s, **row})
    md = ("# Room and capture, measured by the product (`bench/room_table.py`)\n\n"
          "Small-images recipe, `tailforge run ... --set compare.headroom=true`, one run folder per dataset and "
          "seed (data, train and generate seed alike). Balanced accuracy in points, TEST split unless marked; "
          "mean ± std over seeds. exact room = oracle − real-only; estimated room = `tailforge headroom` from the "
          "train and val splits alone.\n\n" + table(res))
    Path(a.out + ".md").write_text(md)
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    print(md)


if __name__ == "__main__":
    main()
