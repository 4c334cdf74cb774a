"""The room estimate checked across datasets: its lean, its interval's coverage, per-class ranking.

For every run folder that has the real-only arm, the oracle arm and headroom's learning-curve models, the
product's estimator (``tailforge.eval.room.estimate_room``) is re-computed from the stored VAL predictions for
each candidate (fit, learning-curve points, clipped or signed exponent) and set against the exact room
(oracle - real-only) on VAL and on TEST. Candidates are ranked on VAL only; TEST is reported.

A candidate's raw estimate is then calibrated across datasets, leave-one-dataset-out (the held-out dataset's
runs never see their own numbers):

* ``scale``: least squares through the origin of the exact VAL room on the raw estimate (Mahmood et al.,
  CVPR 2022, fit a correction factor to power-law data-need estimates for the same upward lean);
* ``spread``: the 90 % quantile of |exact VAL room - scale x estimate| / se over the other datasets' runs, se
  the estimate's own bootstrap standard error (a studentized split-conformal interval: it holds the
  seed-to-seed and evaluation noise of the exact room, which the bootstrap over val images does not).

Sources of runs (each dataset x seed):
  pretrained/<ds>   runs/pretrained/<ds>-s<seed> from bench/pretrained_table.py (head-level oracle; this script
                    runs `tailforge headroom` there with fractions 0.5 and 0.25, seconds each, and evaluates the
                    oracle on VAL)
  pretrained-ft10/<ds>  the same from runs/pretrained-ft10 (Fashion-MNIST-LT IF 100 and IF 10 with the recipe's
                    10 fine-tune epochs; runs/pretrained has them at 2)
  digits<IF>        runs/room-study/digits<IF>-s<seed>: the default (small-images) recipe on scikit-learn's
                    digits, `tailforge run --set compare.headroom=true`, made here
  small/<ds>        bench/results/room_table.json (bench/room_table.py: the small-images recipe on four
                    datasets): VAL and TEST exact room and the default estimate only (the runs are not kept)

    python bench/room_study.py                  # collect (and make what is missing), write the tables

Results: bench/results/room_study.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tailforge.data import ClassStats, RunDir, read_json
from tailforge.eval.evaluate import load_pred
from tailforge.eval.room import estimate_room, per_class_rank

CANDIDATES = {  # name -> (fit, fractions, signed); the unsigned @0.5 ones are in room_table.json too
    **{f"{fit}@0.5": (fit, (0.5,), False) for fit in ("power-span", "log-span", "power", "scale", "quad")},
    "power-span@0.5 signed": ("power-span", (0.5,), True),
    "power@0.5 signed": ("power", (0.5,), True),
    "power-span@0.5,0.25 signed": ("power-span", (0.5, 0.25), True),
    "scale@0.5,0.25": ("scale", (0.5, 0.25), False),
}
Z90 = 1.6449


def tf(*args, log=None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "a") if log else open(os.devnull, "w") as fh:
        subprocess.run([sys.executable, "-m", "tailforge.flows.cli", *args], check=True, stdout=fh,
                       stderr=subprocess.STDOUT, env=env)


def balanced(y, p, c) -> float:
    return 100 * float(np.nanmean([(p[y == k] == k).mean() if (y == k).any() else np.nan for k in range(c)]))


def make_pretrained(run: Path) -> None:
    r = RunDir(run)
    if not (r.model_dir("headroom-f25") / "model.safetensors").exists() or \
            load_pred(r, "headroom-f25", "val") is None:
        tf("headroom", "--run", str(run), "--set", "compare.headroom_fractions=[0.5,0.25]", log=f"{run}.study.log")
    if load_pred(r, "oracle", "val") is None:
        tf("eval", "--run", str(run), "--model-name", "oracle", "--split", "val", "--no-plots", log=f"{run}.study.log")


def make_digits(run: Path, imbalance: int, seed: int) -> None:
    r = RunDir(run)
    if not (r.eval_dir / "report.md").exists():
        run.parent.mkdir(parents=True, exist_ok=True)
        tf("run", "--wait", "--run", str(run), "--set", f"data.imbalance={imbalance}", "--set", f"data.seed={seed}",
           "--set", f"train.seed={seed}", "--set", f"generate.seed={seed}", "--set", "compare.headroom=true",
           "--set", "compare.headroom_fractions=[0.5,0.25]", "--set", "evaluate.plots=false", log=f"{run}.log")
    if load_pred(r, "oracle", "val") is None:
        tf("eval", "--run", str(run), "--model-name", "oracle", "--split", "val", "--no-plots", log=f"{run}.log")


def collect(run: Path) -> dict:
    """Every candidate's VAL estimate of one run, the exact room on VAL and TEST, per-class ranks."""
    r = RunDir(run)
    stats = ClassStats.load(r)
    plan = read_json(r.plan)
    c = stats.num_classes
    need = np.zeros(c)
    for q in plan["classes"]:
        need[int(q["label"])] = q["need"]
    curve = {1.0: "real-only", 0.5: "headroom-f50", 0.25: "headroom-f25"}
    preds = {}
    for f, name in curve.items():
        got = load_pred(r, name, "val")
        if got is not None:
            y, preds[f] = got
    (yo, po), (yt, pt), (_, ot) = load_pred(r, "oracle", "val"), load_pred(r, "real-only", "test"), \
        load_pred(r, "oracle", "test")
    row = {"run": str(run), "room_val": balanced(yo, po, c) - balanced(y, preds[1.0], c),
           "room_test": balanced(yt, ot, c) - balanced(yt, pt, c), "topped": int((need > 0).sum()), "est": {}}
    ev = {(m, s): read_json(r.eval_dir / f"{m}-{s}.json") for m in ("real-only", "oracle") for s in ("val", "test")}
    for name, (fit, fracs, signed) in CANDIDATES.items():
        if any(f not in preds for f in fracs):
            continue
        e = estimate_room(y, {1.0: preds[1.0], **{f: preds[f] for f in fracs}}, stats.counts["train"], need,
                          stats.groups, fit=fit, b=300, confidence=0.9, signed=signed, names=stats.class_names)
        ranks = {s: per_class_rank(e, ev[("real-only", s)], ev[("oracle", s)]) for s in ("val", "test")}
        row["est"][name] = {"room": e["room"], "low": e["low"], "high": e["high"],
                            "se": (e["high"] - e["low"]) / (2 * Z90),
                            "rho_val": ranks["val"]["spearman"], "rho_test": ranks["test"]["spearman"],
                            "class_est": ranks["test"]["estimated"], "class_exact_test": ranks["test"]["exact"],
                            "class_exact_val": ranks["val"]["exact"]}
    return row


def small_rows(path: Path) -> dict:
    """bench/room_table.py's runs (the small-images recipe): only the default (clipped power-span@0.5) estimate."""
    if not path.exists():
        return {}
    out = {}
    for ds, rows in json.loads(path.read_text()).items():
        out[f"small/{ds}"] = [{"run": r["run"], "room_val": r["room_val"], "room_test": r["room_test"],
                               "est": {n: {"room": r[f"est_{n}"], "low": r[f"est_{n}_low"], "high": r[f"est_{n}_high"],
                                           "se": (r[f"est_{n}_high"] - r[f"est_{n}_low"]) / (2 * Z90)}
                                       for n in CANDIDATES if f"est_{n}" in r}}
                              for r in rows if "est_power-span@0.5" in r]
    return out


def calibrate(points: list[tuple[float, float, float]], level: float = 0.9, scale: bool = True) -> tuple[float, float]:
    """(scale, spread) from (estimate, se, exact VAL room) points: scale by least squares through the origin (1
    without ``scale``); spread the ``level`` quantile of the studentized residuals' absolute values (a
    split-conformal quantile, with the (n + 1) correction)."""
    e, se, v = (np.array(x, dtype=float) for x in zip(*points))
    k = float((e * v).sum() / (e * e).sum()) if scale and (e * e).sum() > 0 else 1.0
    z = np.sort(np.abs(v - k * e) / np.maximum(se, 0.05))
    i = min(len(z) - 1, int(np.ceil(level * (len(z) + 1))) - 1)
    return k, float(z[i])


def evaluate_candidate(res: dict, name: str, scale: bool = True) -> dict:
    """Leave-one-dataset-out calibration of one candidate; per dataset the raw and calibrated 3-seed means against
    the exact room (VAL, TEST), and the coverage of the raw and the calibrated 90 % intervals over the runs."""
    have = {ds: [r for r in rows if name in r["est"]] for ds, rows in res.items()}
    have = {ds: rows for ds, rows in have.items() if rows}
    out = {"datasets": {}, "all": None}
    for ds, rows in have.items():
        train = [(r["est"][name]["room"], r["est"][name]["se"], r["room_val"])
                 for d, rr in have.items() if d != ds for r in rr]
        k, q = calibrate(train, scale=scale) if len(train) >= 3 else (1.0, Z90)
        d = {"scale": k, "spread": q, "runs": []}
        for r in rows:
            e = r["est"][name]
            cal = k * e["room"]
            d["runs"].append({"raw": e["room"], "cal": cal, "val": r["room_val"], "test": r["room_test"],
                              "raw_cover_test": e["low"] <= r["room_test"] <= e["high"],
                              "cal_cover_test": cal - q * e["se"] <= r["room_test"] <= cal + q * e["se"],
                              "cal_cover_val": cal - q * e["se"] <= r["room_val"] <= cal + q * e["se"],
                              "cal_low": cal - q * e["se"], "cal_high": cal + q * e["se"],
                              "rho_test": e.get("rho_test"), "rho_val": e.get("rho_val")})
        out["datasets"][ds] = d
    every = [(r["est"][name]["room"], r["est"][name]["se"], r["room_val"]) for rr in have.values() for r in rr]
    out["all"] = calibrate(every, scale=scale) if len(every) >= 3 else None
    return out


def _err(datasets: dict, key: str, est: str = "cal") -> dict:
    """|3-seed mean estimate - 3-seed mean exact room| per dataset (key: "val" or "test"; est: "cal" or "raw")."""
    return {ds: abs(mean([r[est] for r in d["runs"]]) - mean([r[key] for r in d["runs"]]))
            for ds, d in datasets.items()}


def recipe(ds: str) -> str:
    return "pretrained" if ds.startswith("pretrained") else "small-images"


def per_recipe(res: dict, default: str) -> tuple[list[str], dict]:
    """Would choosing the estimator per recipe (the pretrained path vs the small-images CNN) beat one choice for
    all? Within each recipe: every candidate calibrated leave one dataset out, chosen on VAL; and, to judge the
    choice honestly, NESTED: each dataset's estimator chosen on the other datasets of its recipe only. Set against
    the global default on the same datasets (TEST: within 0.5, mean |error|)."""
    names = [(n, sc) for n in CANDIDATES for sc in (True, False)]
    label = lambda n, sc: f"{n}, {'scaled' if sc else 'spread only'}"  # noqa: E731
    lines = ["", "## One estimator per recipe? (chosen on VAL within the recipe; nested: chosen without the held-out "
             "dataset)", "", "| recipe | datasets | chosen on VAL (all its datasets) | its VAL mean abs. err. | "
             "nested: within 0.5 of TEST | nested: mean abs. err. (test) | the global default: within 0.5 of TEST | "
             "the global default: mean abs. err. (test) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    out = {}
    glob = evaluate_candidate(res, default.rsplit(", ", 1)[0], scale=default.endswith("scaled"))["datasets"]
    for fam in sorted({recipe(ds) for ds in res}):
        sub = {ds: rows for ds, rows in res.items() if recipe(ds) == fam}

        def full(rows: dict) -> dict:  # candidates that cover every dataset of ``rows``
            got = {label(n, sc): evaluate_candidate(rows, n, scale=sc)["datasets"] for n, sc in names}
            return {k: v for k, v in got.items() if len(v) == len(rows)}

        cands = full(sub)
        best = min(cands, key=lambda k: mean(_err(cands[k], "val").values()))
        nested = {}
        for ho in sub:
            inner = full({ds: rows for ds, rows in sub.items() if ds != ho})
            pick = min((k for k in inner if k in cands), key=lambda k: mean(_err(inner[k], "val").values()))
            nested[ho] = {"chosen": pick, "err_test": _err({ho: cands[pick][ho]}, "test")[ho]}
        g = _err({ds: glob[ds] for ds in sub if ds in glob}, "test")
        ne = [v["err_test"] for v in nested.values()]
        out[fam] = {"chosen": best, "nested": nested, "default_err_test": g}
        lines.append(f"| {fam} | {len(sub)} | `{best}` | {mean(_err(cands[best], 'val').values()):.2f} | "
                     f"{sum(e <= 0.5 for e in ne)}/{len(ne)} | {mean(ne):.2f} | {sum(e <= 0.5 for e in g.values())}/"
                     f"{len(g)} | {mean(g.values()):.2f} |")
    lines += ["", "Nested choices: " + "; ".join(f"{ds}: `{v['chosen']}` ({v['err_test']:.2f})"
                                                  for f in out.values() for ds, v in f["nested"].items()) + "."]
    return lines, out


def _rho(v: float) -> str:
    return f"{v:+.2f}" if np.isfinite(v) else "– (runs not kept)"


def mean(xs) -> float:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", nargs="*", default=["ffold", "letters", "fmnist100", "fmnist10", "letters26",
                                                          "letters52"])
    ap.add_argument("--pretrained-dirs", nargs="*", default=["pretrained", "pretrained-ft10"],
                    help="folders under --runs with pretrained-recipe runs (pretrained-ft10: bench/pretrained_table.py "
                    "--ft-epochs-large 10, the recipe's fine-tune budget on the larger datasets); a dataset is keyed "
                    "<folder>/<ds>")
    ap.add_argument("--digits", type=int, nargs="*", default=[100, 50], help="digits imbalance factors")
    ap.add_argument("--small-kept", nargs="*", default=["letters26"], help="small-images datasets whose runs are kept "
                    "(bench/room_table.py --runs runs/room): scored on every candidate, with per-class ranks")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--make", action="store_true", help="make missing headroom models / digits runs")
    ap.add_argument("--out", default="bench/results/room_study")
    ap.add_argument("--docs", action="store_true", help="also write the chosen estimator's table into README.md "
                    "(between the <!-- room-study --> markers)")
    a = ap.parse_args(argv)
    res: dict = {}
    for folder in a.pretrained_dirs:
        for ds in a.pretrained:
            for s in a.seeds:
                run = Path(a.runs) / folder / f"{ds}-s{s}"
                if not (run / "eval" / "oracle-test.json").exists():
                    continue
                if a.make:
                    make_pretrained(run)
                if load_pred(RunDir(run), "oracle", "val") is None:
                    continue
                res.setdefault(f"{folder}/{ds}", []).append(collect(run))
    for imb in a.digits:
        for s in a.seeds:
            run = Path(a.runs) / "room-study" / f"digits{imb}-s{s}"
            if a.make:
                make_digits(run, imb, s)
            if load_pred(RunDir(run), "oracle", "val") is None:
                continue
            res.setdefault(f"digits{imb}", []).append(collect(run))
    res.update(small_rows(Path("bench/results/room_table.json")))
    for ds in a.small_kept:  # after the stored rows: a kept run is scored on every candidate
        for s in a.seeds:
            run = Path(a.runs) / "room" / f"{ds}-s{s}"
            if not (run / "eval" / "oracle-test.json").exists():
                continue
            if a.make:
                make_pretrained(run)  # the same two steps: the quarter-data point and the oracle on VAL
            if load_pred(RunDir(run), "oracle", "val") is None:
                continue
            res.setdefault(f"small/{ds}", []).append(collect(run))
    for ds, rows in res.items():
        print(f"{ds}: {len(rows)} runs", flush=True)
    cands = {**{f"{n}, scaled": evaluate_candidate(res, n) for n in CANDIDATES},
             **{f"{n}, spread only": evaluate_candidate(res, n, scale=False) for n in CANDIDATES}}
    lines = ["# The room estimate across datasets (`bench/room_study.py`)", "",
             "Balanced accuracy in points. exact = oracle − real-only of the same run; raw = the estimator on the VAL "
             "learning curve; calibrated = scale × raw with the interval ± spread × se, both fitted on the OTHER "
             "datasets' VAL exact room (leave one dataset out). Coverage: share of runs whose TEST exact room lies "
             "in the 90 % interval.", ""]
    lines += ["## Candidates (chosen on VAL: mean |3-seed mean − exact VAL room| over datasets, calibrated)", "",
              "| estimator | datasets | raw: mean abs. err. (val) | calibrated: mean abs. err. (val) | "
              "calibrated: max abs. err. (test) | raw coverage (test) | calibrated coverage (test) | scale, spread "
              "(all datasets) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    summary = {}
    for n, c in cands.items():
        ds = c["datasets"]
        raw_err = list(_err(ds, "val", "raw").values())
        cal_err = list(_err(ds, "val").values())
        cal_test = list(_err(ds, "test").values())
        runs = [r for d in ds.values() for r in d["runs"]]
        summary[n] = {"datasets": len(ds), "raw_err_val": mean(raw_err), "cal_err_val": mean(cal_err),
                      "cal_max_err_test": max(cal_test) if cal_test else float("nan"),
                      "raw_cover": mean([r["raw_cover_test"] for r in runs]),
                      "cal_cover": mean([r["cal_cover_test"] for r in runs]), "all": c["all"], "n_runs": len(runs)}
        s = summary[n]
        lines.append(f"| `{n}` | {s['datasets']} ({s['n_runs']} runs) | {s['raw_err_val']:.2f} | {s['cal_err_val']:.2f} | "
                     f"{s['cal_max_err_test']:.2f} | {100 * s['raw_cover']:.0f} % | {100 * s['cal_cover']:.0f} % | "
                     + (f"{s['all'][0]:.2f}, {s['all'][1]:.2f}" if s["all"] else "–") + " |")
    best = min((n for n in summary if summary[n]["datasets"] == max(v["datasets"] for v in summary.values())),
               key=lambda n: summary[n]["cal_err_val"])
    lines += ["", f"Chosen on VAL (every dataset, lowest calibrated mean error): **`{best}`**.", "",
              f"## `{best}` per dataset (3-seed means; TEST unless marked)", "",
              "| data | runs | exact room (val) | exact room (test) | raw estimate | calibrated | error (test) | "
              "error against the exact VAL room | exact VAL room − exact TEST room | "
              "calibrated 90 % interval (mean) | coverage (test) | per-class Spearman (test, mean over seeds) | "
              "exact TEST room: se of the 3-seed mean |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    within = {"estimate vs TEST": 0, "estimate vs VAL": 0, "exact VAL vs TEST": 0}
    sharp, sharp_hit = [], []  # datasets whose 3-seed TEST room is known to +-0.5 (90 %), and those the estimate hits
    for ds, d in cands[best]["datasets"].items():
        rr = d["runs"]
        cal, test, val = mean([r["cal"] for r in rr]), mean([r["test"] for r in rr]), mean([r["val"] for r in rr])
        se = float(np.std([r["test"] for r in rr], ddof=1) / np.sqrt(len(rr))) if len(rr) > 1 else float("nan")
        for k, err in zip(within, (cal - test, cal - val, val - test)):
            within[k] += abs(err) <= 0.5
        if Z90 * se <= 0.5:
            sharp.append(ds)
            if abs(cal - test) <= 0.5:
                sharp_hit.append(ds)
        lines.append(f"| {ds} | {len(rr)} | {val:+.2f} | {test:+.2f} | "
                     f"{mean([r['raw'] for r in rr]):+.2f} | {cal:+.2f} | {cal - test:+.2f} | {cal - val:+.2f} | "
                     f"{val - test:+.2f} | "
                     f"[{mean([r['cal_low'] for r in rr]):+.2f}, {mean([r['cal_high'] for r in rr]):+.2f}] | "
                     f"{sum(r['cal_cover_test'] for r in rr)}/{len(rr)} | {_rho(mean([r['rho_test'] for r in rr]))} | "
                     f"{se:.2f} |")
    n = len(cands[best]["datasets"])
    lines += ["", f"Within 0.5 points (3-seed means): the estimate of the TEST room on {within['estimate vs TEST']} of "
              f"{n} datasets; the estimate of the VAL room (what it is fitted on) on {within['estimate vs VAL']} of {n}; "
              f"the exact VAL room itself, the best any estimator from the train and val splits could do, of the "
              f"exact TEST room on {within['exact VAL vs TEST']} of {n}: the rest is the room's own shift between "
              "the val and test images and seeds, which no estimator from VAL can see.", "",
              f"The exact TEST room's 3-seed mean is itself known to ± 0.5 (90 %, 1.645 × its se over seeds) on "
              f"{len(sharp)} of {n} datasets ({', '.join(sharp) or 'none'}); the estimate is within 0.5 of it on "
              f"{len(sharp_hit)} of those ({', '.join(sharp_hit) or 'none'}). On the others a 0.5-point bar is finer "
              "than the target it is checked against."]
    fam_lines, fam = per_recipe(res, best)
    lines += fam_lines
    within["target known to 0.5"] = len(sharp)
    within["estimate within 0.5 where the target is"] = len(sharp_hit)
    out = {"rows": res, "candidates": cands, "summary": summary, "chosen": best, "within_half_point": within,
           "per_recipe": fam}
    Path(a.out + ".json").write_text(json.dumps(out, indent=1, default=float))
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if a.docs:
        readme_table(cands[best], res)


LABELS = {"pretrained/ffold": "pretrained: Fashion-MNIST folder", "pretrained/letters": "pretrained: letters",
          "pretrained/letters26": "pretrained: letters, 26 classes", "pretrained/letters52": "pretrained: letters, 52 "
          "classes", "small/letters26": "small-images: letters, 26 classes",
          "pretrained/fmnist100": "pretrained: Fashion-MNIST-LT IF 100", "pretrained/fmnist10":
          "pretrained: Fashion-MNIST-LT IF 10", "digits100": "small-images: digits IF 100",
          "digits50": "small-images: digits IF 50", "small/letters": "small-images: letters",
          "small/ffold": "small-images: Fashion-MNIST folder", "small/fmnist100": "small-images: Fashion-MNIST-LT IF 100",
          "small/fmnist10": "small-images: Fashion-MNIST-LT IF 10",
          "pretrained-ft10/fmnist100": "pretrained, 10 fine-tune epochs: Fashion-MNIST-LT IF 100",
          "pretrained-ft10/fmnist10": "pretrained, 10 fine-tune epochs: Fashion-MNIST-LT IF 10"}


def readme_table(cand: dict, res: dict) -> None:
    """README's room-study block: the chosen estimator per dataset (TEST, 3-seed means)."""
    sg = lambda v: f"{v:+.2f}".replace("-", "\u2212")  # noqa: E731  (a typographic minus, as README writes it)
    rows = ["| data | runs | exact room | estimated | error | runs covered by the 90 % interval | per-class Spearman |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for ds, d in cand["datasets"].items():
        rr = d["runs"]
        est, ex = mean([r["cal"] for r in rr]), mean([r["test"] for r in rr])
        rho = mean([r["rho_test"] for r in rr])
        rows.append(f"| {LABELS.get(ds, ds)} | {len(rr)} | {sg(ex)} | {sg(est)} | {sg(est - ex)} | "
                    f"{sum(r['cal_cover_test'] for r in rr)}/{len(rr)} | "
                    + ("(runs not kept)" if ds.startswith("small/") else sg(rho) if np.isfinite(rho) else "–") + " |")
    readme = Path("README.md")
    text = readme.read_text()
    a, b = "<!-- room-study -->", "<!-- /room-study -->"
    i, j = text.index(a) + len(a), text.index(b)
    readme.write_text(text[:i] + "\n" + "\n".join(rows) + "\n" + text[j:])

if __name__ == "__main__":
    main()
