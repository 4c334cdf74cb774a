"""How long does ``tailforge export`` take, next to copying the dataset's files with ``cp -r``? (issue 32)

Makes (or reuses) bench/scale.py's 1,000-class folder (75,822 32 px colour PNGs, n_max 320, n_min 5), measures it
as a run (``data.dataset: imagefolder``, ``profile: none``: 70/15/15, every image exported), then times in one run,
on the same file system:

* ``cp -r FOLDER DEST`` (before and after the exports; the faster of the two is the baseline),
* ``tailforge export --format imagefolder`` (hard links), ``--files copy`` (copies), ``--format hf`` (parquet
  shards, the PNG bytes copied as they are) and ``--format webdataset`` (tar shards),

each as the whole command (a fresh process: Python start-up and imports included) and checks that every export
holds 75,822 images. The disk's write-back makes single copies vary several-fold on a shared machine, so every
step starts after a ``sync`` and is timed until its data is on disk (the command, then ``sync``), and the steps
run interleaved for ``--rounds`` rounds (median reported). Writes bench/results/export_speed.md and .json.

    python bench/export_speed.py                      # the issue's folder (made once in /tmp/tailforge-scale)
    python bench/export_speed.py --classes 100 --n-max 100 --n-min 5 --out /tmp/e.md   # a quick check

Done when (issue 32): every format's export takes less than 2x the time of ``cp -r``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from scale import make_folder  # noqa: E402  (bench/scale.py: the issue-25 folders)

FORMATS = [("imagefolder (hard links)", ["--format", "imagefolder"]),
           ("imagefolder (copies)", ["--format", "imagefolder", "--files", "copy"]),
           ("hf (parquet shards)", ["--format", "hf"]),
           ("webdataset (tar shards)", ["--format", "webdataset"])]


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds of the command, seconds of the command and a ``sync`` after it), after a ``sync``."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    t1 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return t1 - t0, time.perf_counter() - t0


def count_images(dest: Path, fmt: str) -> int:
    info = json.loads((dest / "export.json").read_text())
    if fmt == "imagefolder":
        return sum(1 for s in ("train", "val", "test") for _ in (dest / s).rglob("*.png"))
    if fmt == "hf":
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(dest / f).num_rows for fs in info["shards"].values() for f in fs)
    import tarfile

    n = 0
    for fs in info["shards"].values():
        for f in fs:
            with tarfile.open(dest / f) as t:
                n += sum(1 for m in t.getmembers() if m.name.endswith(".png"))
    return n


def render(res: dict, note: str = "") -> str:
    times, rows = res["times"], res["exports"]

    def med(name: str, k: int) -> float:
        return float(statistics.median(t[k] for t in times[name]))

    def each(name: str) -> str:
        return ", ".join(f"{t[1]:.1f}" for t in times[name])

    base = med("cp -r", 1)
    fastest = min(t[1] for t in times["cp -r"])
    lines = ["| what | seconds to disk (median) | × cp -r | each round | × fastest cp -r | command alone (median) | "
             "files written |", "|---|---:|---:|---|---:|---:|---:|",
             f"| `cp -r` | {base:.2f} | 1.00 | {each('cp -r')} | {base / fastest:.2f} | {med('cp -r', 0):.2f} | "
             f"{res['images']:,} |"]
    for name, _ in FORMATS:
        r = rows[name]
        lines.append(f"| `tailforge export` {name} | {med(name, 1):.2f} | {med(name, 1) / base:.2f} | {each(name)} | "
                     f"{med(name, 1) / fastest:.2f} | {med(name, 0):.2f} (in export_run {r['inside']:.2f}) | "
                     f"{r['files']:,} |")
    worst = max(med(n, 1) for n, _ in FORMATS) / base
    worst_fast = max(med(n, 1) for n, _ in FORMATS) / fastest
    res["worst_ratio"], res["worst_ratio_fastest_cp"] = worst, worst_fast
    return (f"# Export vs `cp -r` (`python bench/export_speed.py`, {res['date']})\n\n"
            f"bench/scale.py's {res['classes']:,}-class folder: {res['images']:,} PNGs of 32 px, "
            f"{res['bytes'] / 2**20:.0f} MiB, measured as a run with `profile: none` (70/15/15: every image is exported, "
            f"none synthetic). Each export is the whole command in a fresh process (start-up and imports included; in "
            f"parentheses the time inside `export_run` of the last round). Every step starts after `sync` and is timed "
            f"until a `sync` after it returns (its data on disk); {res['rounds']} rounds, steps interleaved; page cache "
            f"warm. {res['machine']}. The disk's write speed varied several-fold between rounds on this shared machine "
            f"(see `cp -r`'s rounds), so the table also divides by the fastest `cp -r` round.\n\n" + "\n".join(lines)
            + f"\n\nSlowest export: **{worst:.2f}× `cp -r`** (median), {worst_fast:.2f}× its fastest round (issue 32 "
            "asks for less than 2×).\n" + (f"\n{note}\n" if note else ""))


def write(res: dict, out: Path, note: str = "") -> None:
    text = render(res, note)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--n-max", type=int, default=320)
    ap.add_argument("--n-min", type=int, default=5)
    ap.add_argument("--data", default="/tmp/tailforge-scale", help="where the PNG folder is made (reused)")
    ap.add_argument("--work", default="/tmp/tailforge-export-bench", help="run folder and copies (removed after)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/export_speed.md"))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every step (median reported)")
    ap.add_argument("--note", default="", help="a line about the machine for the results")
    ap.add_argument("--render", action="store_true", help="only write the .md again from the .json of --out")
    a = ap.parse_args(argv)
    if a.render:
        res = json.loads(Path(a.out).with_suffix(".json").read_text())
        write(res, Path(a.out), a.note)
        return 0

    folder = Path(a.data) / f"scale-{a.classes}"
    t0 = time.perf_counter()
    meta = make_folder(folder, a.classes, a.n_max, a.n_min)
    print(f"folder {folder}: {meta['images']:,} images in {a.classes:,} classes ({time.perf_counter() - t0:.0f} s)")
    work = Path(a.work)
    run = work / "run"
    if not (run / "counts.json").exists():  # measure once (every image is decoded to verify it)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tailforge.flows", "measure", "--run", str(run), "--dataset", "imagefolder",
                        "--root", str(folder), "--profile", "none", "--image-size", "32"], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"measured in {time.perf_counter() - t0:.0f} s")
    size = sum(p.stat().st_size for p in folder.rglob("*.png"))

    steps = [("cp -r", None)] + FORMATS
    times: dict[str, list[tuple[float, float]]] = {n: [] for n, _ in steps}
    rows = {}
    for rnd in range(a.rounds):
        for name, args in steps:
            dest = work / "out"
            shutil.rmtree(dest, ignore_errors=True)
            if args is None:
                t = timed(["cp", "-r", str(folder), str(dest)])
            else:
                t = timed([sys.executable, "-m", "tailforge.flows", "export", "--run", str(run), "--to", str(dest),
                           *args])
                n = count_images(dest, args[1])
                assert n == meta["images"], (name, n)
                info = json.loads((dest / "export.json").read_text())
                rows[name] = {"export": name, "images": n, "inside": info["seconds"],
                              "files": sum(1 for p in dest.rglob("*") if p.is_file()),
                              "bytes": sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())}
            times[name].append(t)
            print(f"round {rnd + 1}: {name}: {t[0]:.2f} s, with sync {t[1]:.2f} s", flush=True)
            shutil.rmtree(dest)

    res = {"classes": a.classes, "images": meta["images"], "bytes": size, "rounds": a.rounds, "times": times,
           "exports": rows, "date": f"{datetime.now():%Y-%m-%d}",
           "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, one file system (/tmp)"}
    write(res, Path(a.out), a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
