"""Where to spend a budget: `plan.target: room` against balance-shaped and uniform quotas, with a perfect generator.

For each finished source run (the pretrained recipe's runs/pretrained/<ds>-s<seed>, and the default recipe on
digits in runs/room-study/digits<IF>-s<seed>) the whole benchmark flow (`tailforge run`, the source run's own
config.yaml) runs again three times at ONE total budget, a quarter (``--fraction``) of what the source's balance plan
generates:

* ``balance``: balance's quotas capped to the budget (in proportion to each class's distance to the largest);
* ``uniform``: the same number for every class below the largest;
* ``room``: the room plan (each class's learning curve from `tailforge headroom`, measured by the flow itself
  from train and val, the budget water-filled where the estimated gain per image is largest).

The measured arm is the oracle (the long tail's held-back real images through the same plan, filter and
recipe): what each split gives when the generator is perfect. Pretrained runs and bench/room_table.py's kept
small-images runs (runs/room/) are linked copies (the trained baseline, backbone and feature cache shared; heads
re-trained), digits runs are re-made whole (seconds).
TEST balanced accuracy, the split the runs report; no setting here is chosen on it (the planner has none).

    python bench/room_plan.py --jobs 2

Results: bench/results/room_plan.{md,json}; runs in runs/room-plan/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tailforge.data import read_json

sys.path.insert(0, str(Path(__file__).parent))
from featcov_variants import linked  # noqa: E402  (a run folder sharing a source's fine-tuned baseline)

TARGETS = ("balance", "uniform", "room")


def tf(*args, log=None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "a") if log else open(os.devnull, "w") as fh:
        subprocess.run([sys.executable, "-m", "tailforge.flows.cli", *args], check=True, stdout=fh,
                       stderr=subprocess.STDOUT, env=env)


def one(src: Path, target: str, out_runs: Path, fraction: float = 0.25) -> dict:
    budget = int(round(read_json(src / "plan.json")["total"] * fraction))
    tag = "" if fraction == 0.25 else f"-x{fraction:g}"  # the quarter's runs keep their names
    dst = out_runs / f"{src.parent.name}-{src.name}-{target}{tag}"
    if "pretrained" in str(src) or src.parent.name == "room":  # runs whose trained backbones can be shared
        linked(src, dst)
    from tailforge.eval.config import CompareConfig

    d = CompareConfig()  # the product's default learning curve (a source's config.yaml pins the one of its day)
    sets = [f"plan.target={target}", f"plan.budget={budget}", "evaluate.plots=false", "compare.headroom=false",
            "track.tensorboard=false", f"compare.headroom_fit={d.headroom_fit}",
            f"compare.headroom_fractions={json.dumps(d.headroom_fractions)}"]
    if not (dst / "eval" / "report.md").exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tf("run", "--wait", "--config", str(src / "config.yaml"), "--run", str(dst),
           *sum((["--set", s] for s in sets), []), log=f"{dst}.log")
    ev = {m: read_json(dst / "eval" / f"{m}-test.json") for m in ("real-only", "oracle")}
    plan = read_json(dst / "plan.json")
    row = {"run": str(dst), "budget": budget, "added": sum(q["need"] for q in plan["classes"]),
           "real-only": 100 * ev["real-only"]["balanced_acc"], "oracle": 100 * ev["oracle"]["balanced_acc"],
           "need": [q["need"] for q in plan["classes"]], "note": plan.get("note", "")}
    row["room"] = row["oracle"] - row["real-only"]
    full = {m: 100 * read_json(src / "eval" / f"{m}-test.json")["balanced_acc"] for m in ("real-only", "oracle")}
    row["full_room"] = full["oracle"] - full["real-only"]  # the source run's oracle: balance's whole quota
    print(f"{dst.name}: oracle {row['oracle']:.2f} (real-only {row['real-only']:.2f}, {row['added']} added)", flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="*", default=None, help="source run folders (default: every finished one)")
    ap.add_argument("--out-runs", default="runs/room-plan")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--fraction", type=float, default=0.25, help="the budget: this share of balance's total quota")
    ap.add_argument("--out", default="bench/results/room_plan")
    a = ap.parse_args(argv)
    srcs = [Path(s) for s in a.sources] if a.sources else sorted(
        p for p in list(Path("runs/pretrained").glob("*-s[0-9]")) + list(Path("runs/room-study").glob("digits*-s[0-9]"))
        if (p / "eval" / "oracle-test.json").exists())
    jobs = [(s, t) for s in srcs for t in TARGETS]
    with ThreadPoolExecutor(a.jobs) as ex:
        rows = list(ex.map(lambda j: one(j[0], j[1], Path(a.out_runs), a.fraction), jobs))
    res: dict = {}
    for (s, t), r in zip(jobs, rows):
        ds = f"{s.parent.name}/{s.name.rsplit('-s', 1)[0]}"
        res.setdefault(ds, {}).setdefault(t, []).append({"seed": int(s.name.rsplit("-s", 1)[1]), **r})
    share = "a quarter" if a.fraction == 0.25 else f"{a.fraction:g}"
    lines = ["# Where to spend the budget: room-guided vs balance-shaped vs uniform quotas (`bench/room_plan.py`)", "",
             "The oracle arm (perfect synthetic data: the tail's held-back real images) at ONE total budget per run, "
             f"{share} of what the balance plan generates, split three ways. TEST balanced accuracy in points, mean ± "
             "std over seeds; the last columns: room − balance and uniform − balance, mean over seeds [95 % t interval over "
             "seeds] (per seed).", "",
             "| data | seeds | budget | real-only | balance | uniform | room | room − balance | uniform − balance | "
             f"room at balance's full quota ({1 / a.fraction:g}× the budget) | left for a better split |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def half(d):  # half-width of the 95 % t interval of a mean over seeds
        from scipy.stats import t

        return t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")

    def tiv(d):  # mean, 95 % t interval over seeds, per-seed values
        h = half(d)
        return f"{d.mean():+.2f} [{d.mean() - h:+.2f}, {d.mean() + h:+.2f}] ({' / '.join(f'{x:+.2f}' for x in d)})"

    def ms(v):
        v = np.asarray(v, float)
        return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"

    below = []  # datasets where less is left than a 3-seed interval can resolve
    for ds, by in res.items():
        acc = {t: [r["oracle"] for r in sorted(by[t], key=lambda r: r["seed"])] for t in TARGETS if t in by}
        d = np.array(acc["room"]) - np.array(acc["balance"])
        u = np.array(acc["uniform"]) - np.array(acc["balance"])
        full = np.mean([r["full_room"] for r in by["balance"]])
        took = np.mean(acc["balance"]) - np.mean([r["real-only"] for r in by["balance"]])  # balance-shaped, this budget
        if full - took < half(d):
            below.append(f"{ds} ({full - took:+.2f} left, ± {half(d):.2f})")
        lines.append(f"| {ds} | {len(d)} | {by['room'][0]['budget']} | {ms([r['real-only'] for r in by['balance']])} | "
                     + " | ".join(ms(acc[t]) for t in TARGETS) + f" | {tiv(d)} | {tiv(u)} | "
                     + f"+{full:.2f} (at {share}, balance-shaped: +{took:.2f}) | {full - took:+.2f} |")
    lines += ["", "Left for a better split = the room at balance's full quota − what balance-shaped quotas already took at "
              f"{share} of it: roughly the most a better split of this budget could add (a split could pass the "
              "full quota's room only where balance's shape is far from the best). On "
              f"{len(below)} of {len(res)} datasets it is below the half-width of room − balance's 95 % interval over "
              "the seeds, so no split could show a gain there with these seeds: " + "; ".join(below) + "."]
    lines += ["", "How the room plans split their budget (seed 0 of each):", ""]
    for ds, by in res.items():
        lines.append(f"- {ds}: {by['room'][0]['note']}")
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
