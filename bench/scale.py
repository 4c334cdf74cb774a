"""Does a run cost what its images cost, or what its classes squared cost? (issue 25)

Makes two already long-tailed 32 px colour PNG folders (class c: a random 4 x 4 colour template scaled
to 32 px, plus Gaussian noise of sigma 60 per image; n_c = round(n_max * (n_min / n_max) ** (c / (C - 1)))),
runs the benchmark flow (the small-images recipe, one epoch per stage, ``profile: none``) on each,
times every stage from the task stamps the flow writes (``<run>/.flows/*.json``: each holds when the
task finished; a stage's time is the gap to the stamp before it), measures the run folder's eval outputs
and prints the stage-by-stage ratios.

    python bench/scale.py --classes 1000 8142                 # the issue's sizes (folders made once)
    python bench/scale.py --classes 100 800 --out /tmp/s.md   # a quick check

Default sizes reproduce the issue's folders: 1,000 classes (n_max 320, n_min 5: 75,822 images) and
8,142 classes (n_max 40, n_min 3: 116,268 images). Folders are seeded: the same arguments write the same
bytes, and a folder already complete is reused. Some class names are long (up to 80 characters), as in
iNaturalist, so the plots' name handling is exercised.

Done when (issue 25): the large flow takes at most 2.5x the small one, no stage's ratio is above 3, and
the large run's eval outputs take less than 10x the small one's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = {1000: (320, 5), 8142: (40, 3)}  # classes -> (n_max, n_min) of the folders
SYLL = ["ar", "bo", "ca", "di", "el", "fu", "go", "hi", "ix", "ju", "ka", "lo", "mi", "nu", "or", "pa",
        "qu", "ru", "si", "to", "um", "ve", "wa", "xe", "yo", "za"]


def counts(c: int, n_max: int, n_min: int) -> np.ndarray:
    k = np.arange(c)
    return np.round(n_max * (n_min / n_max) ** (k / max(c - 1, 1))).astype(int)


def class_name(c: int, rng: np.random.Generator) -> str:
    """``00042-<genus> <species>...``: 12 to 80 characters, a few long ones as iNaturalist has."""
    words = [("".join(rng.choice(SYLL, rng.integers(2, 6)))) for _ in range(int(rng.integers(1, 9)))]
    name = f"{c:05d}-" + " ".join(words).capitalize()
    return name[:80]


def make_folder(out: Path, c: int, n_max: int, n_min: int, seed: int = 0) -> dict:
    """Write ``out/<class>/<i>.png``; returns {"classes", "images"}. Reuses a folder made with the same args."""
    from PIL import Image

    n = counts(c, n_max, n_min)
    meta = {"classes": c, "n_max": n_max, "n_min": n_min, "seed": seed, "images": int(n.sum())}
    done = out / ".scale.json"
    if done.exists() and json.loads(done.read_text()) == meta:
        return meta
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k in range(c):
        rng = np.random.default_rng([seed, k])
        d = tmp / class_name(k, rng)
        d.mkdir()
        template = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
        big = np.repeat(np.repeat(template, 8, 0), 8, 1)
        for i in range(int(n[k])):
            img = np.clip(big + rng.normal(0, 60, big.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:04d}.png", compress_level=1)
    (tmp / ".scale.json").write_text(json.dumps(meta))
    tmp.rename(out)
    return meta


# --------------------------------------------------------------------------- running and timing

STAGES = [  # (row label, stamp the stage ends with)
    ("measure", "measure"), ("plan", "plan"), ("train baseline (1 epoch)", "train-baseline"),
    ("train backbone (1 epoch)", "train-backbone"), ("prepare generator", "prepare-featcov"),
    ("generate (units + collect)", "candidates"), ("filter", "filter"), ("train rebalanced (cRT)", "train-rebalanced"),
    ("evaluate rebalanced", "evaluate-rebalanced-test"), ("train real-only (cRT)", "train-real-only"),
    ("evaluate baseline", "evaluate-baseline-test"), ("evaluate real-only", "evaluate-real-only-test"),
    ("compare + report", "compare"),
]


def run_flow(data: Path, run: Path, threads: int) -> dict:
    """``tailforge run`` on ``data``; returns the wall time, the time of the first flow log line and
    the log (each line with the time it arrived)."""
    if run.exists():
        shutil.rmtree(run)
    cmd = [str(Path(sys.executable).with_name("tailforge")), "run", "--config", str(ROOT / "flows/recipes/small-images.yaml"),
           "--run", str(run), "--set", "data.dataset=imagefolder", "--set", f"data.root={data}",
           "--set", "data.profile=none", "--set", "data.image_size=32", "--set", "train.epochs=1",
           "--set", "recipe.epochs=1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append((time.time(), line.rstrip("\n")))
    rc = proc.wait()
    wall = time.time() - t0
    log = run.with_suffix(".log")
    log.write_text("\n".join(f"{t - t0:8.1f}  {s}" for t, s in lines) + "\n")
    if rc != 0:
        raise SystemExit(f"tailforge run failed (exit {rc}); log: {log}")
    start = next((t for t, s in lines if "run folder" in s and "config.yaml written" in s), t0)
    return {"wall_s": wall, "start": start, "t0": t0, "log": str(log)}


def stage_times(run: Path, start: float) -> dict[str, float]:
    """Seconds per stage: the gap between the stamp that ends it and the stamp (or flow start) before it."""
    fin = {}
    for p in (run / ".flows").glob("*.json"):
        d = json.loads(p.read_text())
        if "finished" in d:
            fin[p.stem] = datetime.strptime(d["finished"], "%Y-%m-%dT%H:%M:%S").timestamp()
    out, prev = {}, start
    for label, stamp in STAGES:
        if stamp not in fin:
            continue
        t = fin[stamp]
        out[label] = max(t - prev, 0.0)
        prev = t
    out["flow (first log line to last stamp)"] = prev - start
    return out


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def units(log: str) -> str:
    for line in Path(log).read_text().splitlines():
        if "generation units" in line or "work units" in line:
            return line.split("|")[-1].strip()[:160]
    return ""


def measure_one(c: int, data_root: Path, runs: Path, threads: int, n_max: int, n_min: int) -> dict:
    t = time.time()
    meta = make_folder(data_root / f"scale-{c}", c, n_max, n_min)
    made = time.time() - t
    print(f"[{c} classes] folder {data_root / f'scale-{c}'}: {meta['images']:,} images ({made:.0f} s)", flush=True)
    run = runs / f"scale-{c}"
    r = run_flow(data_root / f"scale-{c}", run, threads)
    st = stage_times(run, r["start"])
    ev = {f.name: f.stat().st_size for f in sorted((run / "eval").iterdir()) if f.is_file()}
    cand = run / "candidates.parquet"
    n_cand = 0
    if cand.exists():
        import pandas as pd

        n_cand = len(pd.read_parquet(cand, columns=["sample_id"]))
    out = {"classes": c, "images": meta["images"], "n_max": n_max, "n_min": n_min, "wall_s": round(r["wall_s"], 1),
           "stages_s": {k: round(v, 1) for k, v in st.items()}, "eval_bytes": sum(ev.values()), "eval_files": ev,
           "candidates": n_cand, "units": units(r["log"]), "log": r["log"], "run": str(run)}
    print(f"[{c} classes] flow {out['wall_s']:.0f} s wall; eval outputs {out['eval_bytes'] / 1e6:.2f} MB", flush=True)
    return out


def table(small: dict, large: dict) -> tuple[str, dict]:
    a, b = small["classes"], large["classes"]
    lines = [f"| stage | {a:,} classes, {small['images']:,} images | {b:,} classes, {large['images']:,} images | ratio |",
             "|---|---:|---:|---:|"]
    ratios = {}
    for k in small["stages_s"]:
        if k not in large["stages_s"]:
            continue
        x, y = small["stages_s"][k], large["stages_s"][k]
        ratio = y / x if x >= 1 else None  # a stage under a second (stamps have 1 s resolution) has no ratio
        ratios[k] = ratio
        lines.append(f"| {k} | {x:.0f} | {y:.0f} | {'–' if ratio is None else f'{ratio:.2f}'} |")
    wr = large["wall_s"] / small["wall_s"]
    er = large["eval_bytes"] / max(small["eval_bytes"], 1)
    lines.append(f"| whole command (wall, with Prefect's start) | {small['wall_s']:.0f} | {large['wall_s']:.0f} | {wr:.2f} |")
    lines.append(f"| eval outputs (MB, every file in eval/) | {small['eval_bytes'] / 1e6:.2f} | "
                 f"{large['eval_bytes'] / 1e6:.2f} | {er:.2f} |")
    lines.append(f"| candidates | {small['candidates']:,} | {large['candidates']:,} | |")
    flow_ratio = large["stages_s"]["flow (first log line to last stamp)"] / small["stages_s"]["flow (first log line to last stamp)"]
    stage_max = max((v for k, v in ratios.items() if v is not None and not k.startswith("flow")), default=0.0)
    verdict = {"flow_ratio": round(flow_ratio, 3), "wall_ratio": round(wr, 3), "max_stage_ratio": round(stage_max, 3),
               "eval_bytes_ratio": round(er, 3),
               "done": bool(flow_ratio <= 2.5 and stage_max <= 3 and er < 10)}
    return "\n".join(lines) + "\n", verdict


def split_sizes(n: np.ndarray, frac: float = 0.15) -> np.ndarray:
    """Test images per class under the default 70/15/15 stratified split (at least one when n >= 3)."""
    t = np.floor(n * frac).astype(int)
    return np.where(n >= 3, np.maximum(t, 1), t)


def eval_outputs(c: int, n_max: int, n_min: int, out: Path, seed: int = 0) -> dict:
    """What ``evaluate`` writes for one arm at this size, from simulated predictions (half right, the rest a
    random class) on a test split of the folder's size: the compact JSON, the per-class CSV and the three
    plots, with the time it takes. No training: the size and cost of the outputs alone."""
    from tailforge.data.atomic import write_json
    from tailforge.data.classtable import write_csv
    from tailforge.data.config import MeasureConfig
    from tailforge.data.measure import assign_groups
    from tailforge.eval import plots
    from tailforge.eval.evaluate import class_rows
    from tailforge.eval.metrics import calibration_bins, compute

    rng = np.random.default_rng(seed)
    n = counts(c, n_max, n_min)
    train = n - 2 * split_sizes(n)
    y = np.repeat(np.arange(c), split_sizes(n))
    pred = np.where(rng.random(len(y)) < 0.5, y, rng.integers(0, c, len(y)))
    probs = np.full((len(y), c), 0.2 / c, dtype=np.float32)
    probs[np.arange(len(y)), pred] += 0.8
    groups = assign_groups(train, MeasureConfig())[0]
    names = [class_name(k, np.random.default_rng([0, k])) for k in range(c)]
    t0 = time.perf_counter()
    m = compute(y, probs, groups)
    d = {**m, "model": "sim", "split": "test", "groups": groups, "train_counts": train.tolist(),
         "real_train_counts": train.tolist(), "class_names": names, "calibration": calibration_bins(y, probs)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sim-test.json", d, compact=True)
    write_csv(out / "sim-test-classes.csv", class_rows(d))
    plots.confusion_matrix(d["confusion"], train, names, out / "sim-test-confusion.png", "sim")
    plots.per_class_accuracy(d["per_class"], train.tolist(), groups, names, out / "sim-test-per_class.png", "sim")
    plots.reliability(d["calibration"], out / "sim-test-reliability.png", "sim")
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    return {"classes": c, "test_images": int(len(y)), "seconds": round(time.perf_counter() - t0, 2),
            "bytes": sum(files.values()), "files": files}


def generation_only(c: int, n_max: int, n_min: int, root: Path, shard_size: int = 512, dim: int = 64) -> dict:
    """The generation stage's own machinery at this size, without Prefect and without a model: the
    small-images recipe's plan (balance to the largest class, x1.5), a stand-in feature generator (one
    float32 .npy per shard, as featcov writes) run unit by unit, then ``collect_candidates``."""
    from tailforge.data import RunDir
    from tailforge.gen.base import Generator
    from tailforge.gen.planner import ClassQuota, Plan
    from tailforge.gen.shards import base_row, clean_partial, collect_candidates, finished_folders, make_units, make_shards, run_unit

    class Features(Generator):
        name = source = "featcov"

        def __init__(self):
            pass

        def run_shard(self, shard, out_dir):
            rng = np.random.default_rng([shard.label, shard.start])
            np.save(out_dir / "features.npy", rng.standard_normal((shard.size, dim)).astype(np.float32))
            return [{**base_row(shard, i, 0, "featcov", self.uri(shard, f"features.npy#{k}")),
                     "feature_model": "backbone"} for k, i in enumerate(shard.indices())]

    n = counts(c, n_max, n_min)
    have = n - 2 * split_sizes(n)
    gen_n = np.ceil((have.max() - have) * 1.5 - 1e-9).astype(int)
    plan = Plan("balance", 1.5, [ClassQuota(k, f"c{k}", int(have[k]), int(have.max()), int(have.max() - have[k]),
                                            int(gen_n[k])) for k in range(c)], int(gen_n.sum()))
    shutil.rmtree(root, ignore_errors=True)
    run = RunDir(root)
    gen_dir = run.synthetic("featcov")
    gen_dir.mkdir(parents=True)
    t = {}
    t0 = time.perf_counter()
    shards = make_shards(plan, "featcov", shard_size)
    units = make_units(shards, shard_size)
    clean_partial(gen_dir, units)
    finished_folders(gen_dir)
    t["plan to units"] = time.perf_counter() - t0
    g = Features()
    t0 = time.perf_counter()
    for u in units:
        run_unit(g, u, gen_dir)
    t["run units"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    df = collect_candidates(run, plan)
    t["collect"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for u in units:  # a rerun: every shard found finished
        run_unit(g, u, gen_dir)
    t["rerun (all done)"] = time.perf_counter() - t0
    return {"classes": c, "samples": int(gen_n.sum()), "candidates": len(df), "shards": len(shards), "units": len(units),
            "seconds": {k: round(v, 2) for k, v in t.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, nargs=2, default=[1000, 8142], metavar=("SMALL", "LARGE"))
    ap.add_argument("--sizes", type=int, nargs=4, metavar=("NMAX_S", "NMIN_S", "NMAX_L", "NMIN_L"),
                    help="n_max n_min of each folder (default: the issue's 320 5 and 40 3)")
    ap.add_argument("--data", default="/tmp/tailforge-scale", help="where the PNG folders are made (reused)")
    ap.add_argument("--runs", default="/tmp/tailforge-scale/runs", help="where the run folders go (rebuilt)")
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads of the flow")
    ap.add_argument("--note", default="", help="a line about the machine (e.g. the CPU was shared) for the results")
    ap.add_argument("--out", default=str(ROOT / "bench/results/scale.md"))
    ap.add_argument("--generation-only", action="store_true",
                    help="only the generation machinery at each size (stand-in feature generator, no Prefect, no model)")
    ap.add_argument("--outputs-only", action="store_true",
                    help="only what one arm's evaluation writes at each size (simulated predictions, no flow)")
    a = ap.parse_args(argv)
    sizes = a.sizes or [*SIZES[1000], *SIZES[8142]]
    if a.generation_only:
        import tempfile

        res = [generation_only(c, *sz, Path(tempfile.mkdtemp()) / f"gen-{c}")
               for c, sz in zip(a.classes, (sizes[:2], sizes[2:]))]
        keys = list(res[0]["seconds"])
        lines = ["| | " + " | ".join(f"{r['classes']:,} classes" for r in res) + " | ratio |", "|---|---:|---:|---:|"]
        for k in ("samples", "shards", "units"):
            lines.append(f"| {k} | " + " | ".join(f"{r[k]:,}" for r in res) + f" | {res[1][k] / res[0][k]:.2f} |")
        for k in keys:
            x, y = res[0]["seconds"][k], res[1]["seconds"][k]
            lines.append(f"| {k} (s) | {x} | {y} | {y / x if x else float('nan'):.2f} |")
        tot = [sum(r["seconds"][k] for k in keys if k != "rerun (all done)") for r in res]
        lines.append(f"| units + collect (s) | {tot[0]:.2f} | {tot[1]:.2f} | {tot[1] / tot[0]:.2f} |")
        text = ("Generation machinery alone (`python bench/scale.py --generation-only`): the recipe's plan, a stand-in "
                "feature generator (one float32 .npy of 64-d rows per shard, as featcov writes), every unit run in "
                "this process (no Prefect: one task per unit adds its own overhead per unit), then collect.\n\n"
                + "\n".join(lines) + "\n")
        print(text)
        out = Path(a.out).with_name(Path(a.out).stem + "_generation")
        out.with_suffix(".md").write_text(text + (f"\n{a.note}\n" if a.note else ""))
        out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        return 0
    if a.outputs_only:
        import tempfile

        res = [eval_outputs(c, *sz, Path(tempfile.mkdtemp()) / f"eval-{c}")
               for c, sz in zip(a.classes, (sizes[:2], sizes[2:]))]
        lines = ["| classes | test images | seconds (metrics, JSON, CSV, plots) | bytes | files |", "|---:|---:|---:|---:|---|"]
        lines += [f"| {r['classes']:,} | {r['test_images']:,} | {r['seconds']} | {r['bytes']:,} | "
                  + ", ".join(f"{k.removeprefix('sim-test')} {v:,}" for k, v in r["files"].items()) + " |" for r in res]
        text = ("One arm's evaluation outputs, simulated predictions (`python bench/scale.py --outputs-only`):\n\n"
                + "\n".join(lines) + f"\n\nratio of bytes {res[1]['bytes'] / res[0]['bytes']:.2f}, of seconds "
                f"{res[1]['seconds'] / max(res[0]['seconds'], 1e-9):.2f}\n")
        print(text)
        out = Path(a.out).with_name(Path(a.out).stem + "_outputs")
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        return 0
    data, runs = Path(a.data), Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    small = measure_one(a.classes[0], data, runs, a.threads, sizes[0], sizes[1])
    large = measure_one(a.classes[1], data, runs, a.threads, sizes[2], sizes[3])
    text, verdict = table(small, large)
    cmd = "python bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"# Scale: {a.classes[0]:,} vs {a.classes[1]:,} classes (bench/scale.py)\n\n"
          f"`{cmd}`, {time.strftime('%Y-%m-%d')}, torch threads {a.threads}, one run each, seconds from the "
          "flow's task stamps (1 s resolution; a stage is the gap to the stamp before it). "
          f"{a.note}\n\nGeneration: {small['units']} / {large['units']}\n\n" + text
          + f"\nflow ratio {verdict['flow_ratio']:.2f} (done at <= 2.5), largest stage ratio "
          f"{verdict['max_stage_ratio']:.2f} (<= 3), eval outputs ratio {verdict['eval_bytes_ratio']:.2f} (< 10): "
          f"**{'done' if verdict['done'] else 'not done'}**.\n")
    print(md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(a), "small": small, "large": large,
                                                    "verdict": verdict}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
