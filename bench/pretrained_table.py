"""The pretrained recipe against the small-images recipe, measured by the product (`tailforge run`).

For each dataset and seed it runs the product's benchmark flow with flows/recipes/pretrained.yaml (EfficientNet-
Lite0 from its ImageNet weights, fine-tuned; the real-only head chosen on VAL among crt / la / taunorm; featcov in
the fine-tuned space; the oracle arm) and tabulates, in points of balanced accuracy on the TEST split:

* small-images recipe: real-only, rebalanced, oracle (bench/results/room_table.json, the same datasets, seeds and
  splits: the data seed fixes the split and the long tail);
* pretrained recipe: real-only (with the head chosen on VAL), rebalanced, oracle, room = oracle - real-only,
  gain = rebalanced - real-only, captured = gain / room; the gain per many / medium / few group;
* an appendix: every candidate head's VAL score per run (eval/candidates.json).

Datasets as in bench/room_table.py (folders: IF 50 at 28 px; Fashion-MNIST-LT: IF 100 and 10). On this 2-core CPU
the Fashion-MNIST-LT fine-tunes run 2 epochs instead of 10 (`--ft-epochs-large`; 15-25k train images), which the
table says; the heads, the generator and the arms are the recipe's.

    python bench/make_fashion_folder.py /tmp/ffold && python bench/make_font_folder.py /tmp/letters
    python bench/pretrained_table.py --datasets ffold letters fmnist100 fmnist10 --seeds 0 1 2

The README's table was made at 64 px, before bench/pretrained_resolution.py chose 80 px on VAL (each row names its
size; `--runs runs/pretrained-r80 --set train.input_size=80` gives the 80 px rows). Runs go to
runs/pretrained/<dataset>-s<seed> (finished runs are reused); results to
bench/results/pretrained_table.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from room_table import DATASETS, dataset_sets, m, ms, tf  # noqa: E402  (the same datasets and the same runner)

from tailforge.data import RunDir, read_json  # noqa: E402

RECIPE = "flows/recipes/pretrained.yaml"
LARGE = ("fmnist100", "fmnist10")
ARMS = ("baseline", "real-only", "rebalanced", "oracle")


def one(ds: str, seed: int, a) -> dict | None:
    run = Path(a.runs) / f"{ds}-s{seed}"
    sets = [s for s in dataset_sets(ds, a) if not s.startswith("data.image_size")]  # the recipe's own input size (64 px)
    sets += [f"data.seed={seed}", f"train.seed={seed}", f"generate.seed={seed}"]
    if ds in LARGE:
        sets.append(f"train.epochs={a.ft_epochs_large}")
    sets += a.set or []
    t0 = time.time()
    run.parent.mkdir(parents=True, exist_ok=True)
    if not (run / "eval" / "report.md").exists():
        tf("run", "--wait", "--config", RECIPE, "--run", str(run), *sum((["--set", s] for s in sets), []),
           log=str(run) + ".log", threads=a.threads)
    secs = time.time() - t0
    print(f"{run}: {secs:.0f} s", flush=True)
    return collect(run, secs)


def collect(run: Path, secs: float | None = None) -> dict | None:
    r = RunDir(run)
    if not (r.eval_dir / "oracle-test.json").exists():
        return None
    ev = {k: read_json(r.eval_dir / f"{k}-test.json") for k in ARMS}
    row = {"run": str(run), "seconds": secs, **{f"{k}_test": 100 * v["balanced_acc"] for k, v in ev.items()}}
    for g in ("many", "medium", "few"):
        for k in ("real-only", "rebalanced", "oracle"):
            row[f"{k}_{g}"] = 100 * ev[k][g] if isinstance(ev[k].get(g), (int, float)) else None
    cand = read_json(r.eval_dir / "candidates.json")
    row["chosen"] = cand["chosen"]
    row["input_size"] = (yaml.safe_load((run / "config.yaml").read_text()).get("train") or {}).get("input_size")
    row["val"] = {h: 100 * v for h, v in cand["scores"].items()}
    base = read_json(r.model_dir("baseline") / "best.json")  # the fine-tuned network with its own (LA) head
    row["val"]["finetuned"] = 100 * base["val_balanced_acc"]
    above = row["val"]["finetuned"] > row["val"][row["chosen"]]  # the stronger real-only model on VAL
    row["strongest"] = "baseline" if above else row["chosen"]
    row["strongest_test"] = row["baseline_test"] if above else row["real-only_test"]
    row["room"] = row["oracle_test"] - row["real-only_test"]
    row["gain"] = row["rebalanced_test"] - row["real-only_test"]
    return row


def above_noise(vals) -> bool:
    """The mean is more than two standard errors above 0 (a share of a room within seed noise means nothing)."""
    v = np.asarray(vals, dtype=float)
    return len(v) > 1 and v.mean() - 2 * v.std(ddof=1) / np.sqrt(len(v)) > 0


def table(res: dict, small: dict, a) -> str:
    out = ["| data (IF) | recipe | real-only (head) | rebalanced (featcov) | oracle | room | gain | captured |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for ds, rows in res.items():
        srows = small.get(ds) or []
        if srows:
            sroom = [r["oracle_test"] - r["real-only_test"] for r in srows]
            sgain = [r["rebalanced_test"] - r["real-only_test"] for r in srows]
            cap = f"{100 * np.mean(sgain) / np.mean(sroom):.0f} %" if above_noise(sroom) else "– (room within seed noise)"
            out.append(f"| {ds} | small-images ({len(srows)} seeds) | {m([r['real-only_test'] for r in srows])} (crt) | "
                       f"{m([r['rebalanced_test'] for r in srows])} | {m([r['oracle_test'] for r in srows])} | "
                       f"{ms(sroom)} | {ms(sgain)} | {cap} |")
        heads = ", ".join(f"{h} ×{sum(r['chosen'] == h for r in rows)}" for h in sorted({r["chosen"] for r in rows}))
        cap = f"{100 * np.mean([r['gain'] for r in rows]) / np.mean([r['room'] for r in rows]):.0f} %" \
            if above_noise([r["room"] for r in rows]) else "– (room within seed noise)"
        ep = f", {a.ft_epochs_large} fine-tune epochs" if ds in LARGE else ""
        px = sorted({r.get("input_size") for r in rows if r.get("input_size")})
        ep = (f", {'/'.join(map(str, px))} px" if px else "") + ep
        out.append(f"| {ds} | **pretrained** ({len(rows)} seeds{ep}) | {m([r['real-only_test'] for r in rows])} "
                   f"({heads}) | {m([r['rebalanced_test'] for r in rows])} | {m([r['oracle_test'] for r in rows])} | "
                   f"{ms([r['room'] for r in rows])} | {ms([r['gain'] for r in rows])} | {cap} |")
    out += ["", "Outside knowledge (pretrained real-only − small-images real-only) and the synthetic gain per seed, "
            "with the gain per group (rebalanced − real-only, TEST):", "",
            "| data | Δ real-only (pretrained − small) | gain per seed | many | medium | few | strongest real-only on VAL "
            "(heads and the fine-tuned network) | Δ strongest − small | rebalanced − strongest |",
            "|---|---:|---|---:|---:|---:|---|---:|---:|"]
    for ds, rows in res.items():
        srows = small.get(ds) or []
        d = (f"{np.mean([r['real-only_test'] for r in rows]) - np.mean([r['real-only_test'] for r in srows]):+.2f}"
             if srows else "–")
        per = " / ".join(f"{r['gain']:+.2f}" for r in rows)
        grp = []
        for g in ("many", "medium", "few"):
            v = [r[f"rebalanced_{g}"] - r[f"real-only_{g}"] for r in rows if r[f"real-only_{g}"] is not None]
            grp.append(ms(v) if v else "–")
        st = [r.get("strongest_test", r["real-only_test"]) for r in rows]
        ds_ = (f"{np.mean(st) - np.mean([r['real-only_test'] for r in srows]):+.2f}" if srows else "–")
        who = ", ".join(f"{h} ×{sum(r.get('strongest') == h for r in rows)}"
                        for h in sorted({r.get("strongest", r["chosen"]) for r in rows}))
        out.append(f"| {ds} | {d} | {per} | " + " | ".join(grp) + f" | {m(st)} ({who}) | {ds_} | "
                   f"{ms([r['rebalanced_test'] - s for r, s in zip(rows, st)])} |")
    out += ["", "Appendix: every real-only candidate head's VAL balanced accuracy (the chosen one in bold):", "",
            "| run | crt | la | taunorm | fine-tuned network's own head (baseline; not re-trainable on features) |",
            "|---|---:|---:|---:|---:|"]
    for ds, rows in res.items():
        for r in rows:
            cells = [(f"**{r['val'][h]:.2f}**" if h == r["chosen"] else f"{r['val'][h]:.2f}") if h in r["val"] else "–"
                     for h in ("crt", "la", "taunorm")]
            cells.append(f"{r['val']['finetuned']:.2f}" if "finetuned" in r["val"] else "–")
            out.append(f"| {ds}-s{r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def folder_args(ap: argparse.ArgumentParser) -> None:
    """The folders' locations and the torch threads of each run (shared with bench/pretrained_resolution.py)."""
    ap.add_argument("--ffold", default="/tmp/ffold", help="the Fashion-MNIST folder (bench/make_fashion_folder.py)")
    ap.add_argument("--letters", default="/tmp/letters", help="the letters folder (bench/make_font_folder.py)")
    ap.add_argument("--letters26", default="/tmp/letters26", help="the 26-letter folder")
    ap.add_argument("--letters52", default="/tmp/letters52", help="the 52-class folder (a..z, A..Z)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each run")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["ffold", "letters", "fmnist100", "fmnist10", "letters26"],
                    choices=list(DATASETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="runs/pretrained")
    folder_args(ap)
    ap.add_argument("--ft-epochs-large", type=int, default=2, help="fine-tune epochs on Fashion-MNIST-LT (CPU budget)")
    ap.add_argument("--small", nargs="+", default=["bench/results/room_table.json",
                    "bench/results/room_table_letters26.json"], help="the small-images recipe's results")
    ap.add_argument("--out", default="bench/results/pretrained_table")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="one more run setting for every run "
                    "(repeatable), e.g. train.hflip=false; use its own --runs and --out")
    ap.add_argument("--collect-only", action="store_true", help="tabulate finished run folders, run nothing")
    ap.add_argument("--docs", action="store_true", help="also write the table into README.md and docs/findings.md "
                    "(between their <!-- pretrained-table --> markers)")
    a = ap.parse_args(argv)
    res: dict = {}
    for ds in a.datasets:
        for s in a.seeds:
            row = collect(Path(a.runs) / f"{ds}-s{s}") if a.collect_only else one(ds, s, a)
            if row is not None:
                res.setdefault(ds, []).append({"seed": s, **row})
    small_all = {ds: rows for f in a.small if Path(f).exists() for ds, rows in json.loads(Path(f).read_text()).items()}
    small = {ds: [r for r in small_all.get(ds, []) if r["seed"] in {x["seed"] for x in res[ds]}] for ds in res}
    md = ("# The pretrained recipe vs the small-images recipe (`bench/pretrained_table.py`)\n\n"
          "`tailforge run --config flows/recipes/pretrained.yaml`, one run folder per dataset and seed (data, train "
          "and generate seed alike); the small-images rows are bench/results/room_table.json (same datasets, seeds, "
          "splits). Balanced accuracy in points on the TEST split, mean ± std over seeds; room = oracle − real-only, "
          "gain = rebalanced − real-only, captured = gain / room. The real-only head of the pretrained recipe is "
          "chosen on VAL per run (the count of runs per head in brackets).\n\n" + table(res, small, a))
    Path(a.out + ".md").write_text(md)
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    if a.docs:  # the table into README.md and docs/findings.md, between their pretrained-table markers
        block = table(res, small, a).split("\n\nAppendix")[0].rstrip() + "\n"
        for doc in ("README.md", "docs/findings.md"):
            text = Path(doc).read_text()
            head, mark, rest = text.partition("<!-- pretrained-table -->\n")
            _, end, tail = rest.partition("<!-- /pretrained-table -->")
            if mark and end:
                Path(doc).write_text(head + mark + block + end + tail)
    print(md)


if __name__ == "__main__":
    main()
