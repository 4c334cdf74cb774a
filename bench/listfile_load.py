"""How long reading the published split files takes at full size: ImageNet-LT and iNaturalist 2018.

Writes (once, into --work) a tree of *empty* files with the published sizes, and the split files that
name them: ImageNet-LT (1,000 classes; train 115,846 lines, 1,280 down to 5 per class; val 20 and test
50 per class) as `path label` lists, and iNaturalist 2018 (8,142 classes; train 437,513 images, 1,000
down to 2 per class; val 3 per class = 24,426) as COCO-style JSON. The files are empty on purpose: the
loader must not open images (one stat per file), so any decode would fail. Then, in fresh processes,
``repeats`` times each, the three steps of ``tailforge measure``: ``load_dataset`` (parse + checks: inside
the root, image extension, exists, no duplicates, labels), ``build_manifest`` (splits, real.parquet,
dataset.json) and ``measure_run`` (counts.json, counts.png). Prints CPU and wall seconds of each step.

    python bench/listfile_load.py                    # writes bench/results/listfile_load.md
    python bench/listfile_load.py --work /tmp/tf-lists --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "listfile_load.md"

SETS = {  # name: (classes, train total, head, tail, val per class, test per class)
    "imagenet-lt": (1000, 115_846, 1280, 5, 20, 50),
    "inat2018": (8142, 437_513, 1000, 2, 3, 0),
}


def lt_counts(classes: int, total: int, head: int, tail: int) -> list[int]:
    """Per-class train counts from `head` down to `tail`: n_i = head * (tail/head)^((i/(C-1))^p), with p
    found by bisection so that they sum to `total` (the rounding remainder goes to the middle class)."""
    x = np.linspace(0, 1, classes)
    lo, hi = 1e-3, 1.0
    for _ in range(60):
        p = (lo + hi) / 2
        n = np.rint(head * (tail / head) ** (x ** p)).astype(int)
        lo, hi = (lo, p) if n.sum() > total else (p, hi)
    n[classes // 2] += total - n.sum()
    return n.tolist()


def make(name: str, work: Path) -> dict:
    classes, total, head, tail, n_val, n_test = SETS[name]
    root = work / name
    done = root / ".complete"
    if done.exists():
        return json.loads(done.read_text())
    counts = lt_counts(classes, total, head, tail)
    splits = {"train": counts, "val": [n_val] * classes}
    if n_test:
        splits["test"] = [n_test] * classes
    rows: dict[str, list[tuple[str, int]]] = {}
    for split, per in splits.items():
        rows[split] = []
        for k, n in enumerate(per):
            d = root / split / f"c{k:05d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rows[split].append((f"{split}/c{k:05d}/{i}.jpg", k))
                open(root / rows[split][-1][0], "wb").close()
    lists = {}
    if name == "inat2018":
        img = 0
        for split, rs in rows.items():
            images, anns = [], []
            for p, k in rs:
                images.append({"id": img, "file_name": p, "width": 800, "height": 600})
                anns.append({"id": img, "image_id": img, "category_id": k})
                img += 1
            cats = [{"id": k, "name": f"{k:05d}", "supercategory": "Plantae"} for k in range(classes)]
            (root / f"{split}2018.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                                 "categories": cats}))
            lists[split] = f"{split}2018.json"
    else:
        for split, rs in rows.items():
            (root / f"LT_{split}.txt").write_text("".join(f"{p} {k}\n" for p, k in rs))
            lists[split] = f"LT_{split}.txt"
    info = {"dataset": "inaturalist" if name == "inat2018" else "listfile", "root": str(root), "lists": lists,
            "lines": {s: len(r) for s, r in rows.items()}, "classes": classes}
    done.write_text(json.dumps(info))
    return info


CHILD = """
import json, sys, time, shutil
from pathlib import Path
from tailforge.data import DataConfig, RunDir, build_manifest, load_dataset, measure_run
info, run = json.loads(sys.argv[1]), Path(sys.argv[2])
cfg = DataConfig(dataset=info["dataset"], root=info["root"], lists=info["lists"])
shutil.rmtree(run, ignore_errors=True)
out, lines = {}, sum(info["lines"].values())
def timed(what, fn):
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    out[what] = [time.perf_counter() - t, time.process_time() - c]
    return result
raw = timed("load_dataset", lambda: load_dataset(cfg))
assert sum(len(s) for s in raw.splits.values()) == lines
df = timed("build_manifest", lambda: build_manifest(cfg, RunDir(run), raw=raw))
assert len(df) == lines
timed("measure_run", lambda: measure_run(RunDir(run)))
print(json.dumps(out))
"""
STEPS = {"load_dataset": "load_dataset: parse + check every entry (one stat per file)",
         "build_manifest": "build_manifest after it: splits, real.parquet, dataset.json",
         "measure_run": "measure_run: counts.json and the counts.png bar chart"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tailforge-listfile-bench"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lines = ["# Reading the published split files at full size", "",
             f"`python bench/listfile_load.py --repeats {args.repeats}`; {platform.machine()}, "
             f"{os.cpu_count()} CPU cores shared with other jobs (the 1-minute load average is printed: wall times "
             "stretch with it, CPU seconds do not), files on the local disk, empty image files (nothing is "
             "decoded), each repeat a fresh process.", "",
             "| set | classes | lines (train / val / test) | step | CPU s, median (min..max) | wall s, median | load avg |",
             "|---|---|---|---|---|---|---|"]
    for name in SETS:
        t = time.perf_counter()
        info = make(name, args.work)
        print(f"{name}: files ready ({time.perf_counter() - t:.0f} s)", flush=True)
        runs = []
        for _ in range(args.repeats):
            res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(info), str(args.work / f"run-{name}")],
                                 env=env, capture_output=True, text=True, check=False)
            if res.returncode:
                sys.exit(res.stdout + res.stderr)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        load = os.getloadavg()[0]
        n = info["lines"]
        sizes = " / ".join(f"{n[s]:,}" for s in ("train", "val", "test") if s in n)
        for step, label in STEPS.items():
            cpu = [r[step][1] for r in runs]
            wall = [r[step][0] for r in runs]
            row = (f"| {name} | {info['classes']:,} | {sizes} | {label} | {statistics.median(cpu):.1f} "
                   f"({min(cpu):.1f}..{max(cpu):.1f}) | {statistics.median(wall):.1f} | {load:.1f} |")
            print(row, flush=True)
            lines.append(row)
    lines += ["", "iNaturalist has no test labels: its val file is split (stratified, `val_from_test`) into val and "
              "test by `build_manifest`."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
