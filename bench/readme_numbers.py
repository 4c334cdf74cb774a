"""README's default-run numbers from a fresh run, never from hand copies.

    make readme-numbers                                  # = python bench/readme_numbers.py
    python bench/readme_numbers.py --run runs/readme     # keep the run folder
    python bench/readme_numbers.py --run runs/done --reuse --print   # numbers of a finished run, no timing

Runs ``tailforge run`` (the embedded default config, or ``--config``) into a temporary run folder (or
``--run``), times it and a cached re-run, and rewrites the block of README.md between
``<!-- readme-numbers:default-run -->`` and ``<!-- /readme-numbers -->``: a paragraph naming the
machine (cores, CPU model, GPU or none), the date and the wall times, the filter's counts, and one
table row per evaluated model from ``eval/<model>-<split>.json`` (baseline, real-only, rebalanced
first, then any other model in name order) with top-1, balanced accuracy and few-shot accuracy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = "<!-- readme-numbers:default-run -->"
END = "<!-- /readme-numbers -->"
FIRST = ("baseline", "real-only", "rebalanced", "oracle")  # the benchmark's arms, in the order a reader compares them


class Problem(Exception):
    """Bad input: printed as one line with its fix, no traceback."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} ({fix})")


# --------------------------------------------------------------------------- reading a run folder

def load_evals(run: Path, split: str | None = None) -> list[dict]:
    """The metrics JSONs of ``run/eval`` for one split (default: the run's ``eval_split``, else the only one)."""
    found = []
    for path in sorted((run / "eval").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and {"model", "split", "top1", "balanced_acc"} <= set(data):
            found.append(data)
    if not found:
        raise Problem(f"{run}/eval holds no metrics (<model>-<split>.json)", "let `tailforge run` finish first")
    cfg = run_config(run)
    splits = sorted({d["split"] for d in found})
    if split is None:
        split = (cfg.get("evaluate") or {}).get("split") or (splits[0] if len(splits) == 1 else "test")
    chosen = [d for d in found if d["split"] == split]
    if not chosen:
        raise Problem(f"{run}/eval has no metrics of the {split} split (it has: {', '.join(splits)})",
                      "pass --split with one of those")
    first = [cfg.get("baseline") or FIRST[0], cfg.get("real_only") or FIRST[1], cfg.get("rebalanced") or FIRST[2]]
    return sorted(chosen, key=lambda d: model_order(d["model"], first))


def model_order(name: str, first=FIRST) -> tuple[int, str]:
    first = list(first)
    return (first.index(name), "") if name in first else (len(first), name)


def run_config(run: Path) -> dict:
    import yaml

    path = run / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def describe(ev: dict, generator: str) -> str:
    """``baseline (real only)``, ``rebalanced (real + accepted ddpm, balanced_softmax)``: from the train settings."""
    train = ev.get("train") or {}
    if train.get("synthetic_source") == "oracle":
        generator = "held-back real images (a perfect generator)"
    data = {"filtered": f"real + accepted {generator}", "candidates": f"real + all {generator} candidates"}.get(
        train.get("synthetic") or "none", "real only")
    extra = [train["loss"]] if train.get("loss") not in (None, "ce") else []
    extra += [f"{train['sampler']} sampler"] if train.get("sampler") not in (None, "instance") else []
    extra += [f"cRT on {train.get('base') or 'a frozen backbone'}"] if train.get("stage") == "crt" else []
    return f"{ev['model']} ({', '.join([data, *extra])})"


def few_classes(ev: dict) -> list[str]:
    groups, names = ev.get("groups") or [], ev.get("class_names") or []
    return [str(names[i]) if i < len(names) else str(i) for i, g in enumerate(groups) if g == "few"]


def filter_summary(run: Path) -> str:
    """``Filter: 748 of 1,125 `ddpm` candidates kept; rejected 303 `over_quota`, 37 `wrong_class`.``"""
    import pandas as pd

    path = run / "filtered.parquet"
    if not path.exists():
        return ""
    df = pd.read_parquet(path, columns=["accepted", "reason", "generator"])
    gens = ", ".join(f"`{g}`" for g in sorted(df["generator"].dropna().astype(str).unique())) or "synthetic"
    rejected = df.loc[~df["accepted"].astype(bool), "reason"].value_counts()
    why = ", ".join(f"{int(n):,} `{r}`" for r, n in rejected.items())
    return (f"Filter: {int(df['accepted'].sum()):,} of {len(df):,} {gens} candidates kept"
            + (f"; rejected {why}" if why else "") + ".")


# --------------------------------------------------------------------------- rendering

def _num(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def render_table(evals: list[dict], generator: str = "synthetic") -> str:
    few = few_classes(evals[0]) if evals else []
    head = f"few-shot accuracy (classes {', '.join(few)})" if few else "few-shot accuracy"
    lines = [f"| model | top-1 | balanced accuracy | {head} |", "|---|---:|---:|---:|"]
    for ev in evals:
        lines.append(f"| {describe(ev, generator)} | {_num(ev['top1'])} | {_num(ev['balanced_acc'])} | "
                     f"{_num(ev.get('few'))} |")
    return "\n".join(lines)


def machine() -> str:
    """``2 cores, Intel(R) Xeon(R) ... , no GPU``."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            gpu = f"{n} x {torch.cuda.get_device_name(0)}" if n > 1 else torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{cores} cores, {cpu}, {gpu}"


def render_block(evals: list[dict], run: Path, host: str, date: str, wall: float | None,
                 rerun: float | None) -> str:
    cfg = run_config(run)
    generator = (cfg.get("generate") or {}).get("generator") or "synthetic"
    ev = evals[0]
    data = cfg.get("data") or {}
    imb = data.get("imbalance")
    support = ev.get("support") or []
    balanced = ", balanced" if support and min(support) > 0 and max(support) <= 1.1 * min(support) else ""
    what = f"{ev.get('dataset', 'the dataset')}-LT" + (f" (IF = {imb:g}; {ev.get('n', '?')} images{balanced})"
                                                          if imb else f" ({ev.get('n', '?')} images{balanced})")
    if wall is None:
        timing = "wall time not measured (numbers of an existing run folder)"
    else:
        timing = f"{wall:.0f} s for the flow" + (f"; a re-run is served from the run folder in {rerun:.0f} s"
                                                 if rerun is not None else "")
    text = (f"Output of the default run (`tailforge run`), measured by `make readme-numbers` ({date}; {host}): "
            f"{timing}. {filter_summary(run)} {ev['split'].capitalize()} split of {what}:").replace("  ", " ")
    room = room_line(run)
    return "\n".join([START, wrap(text), "", render_table(evals, generator)] + (["", wrap(room)] if room else [])
                     + [END])


def room_line(run: Path) -> str:
    """The report's room and capture, in one sentence, from eval/compare.json (empty when it has none)."""
    path = run / "eval" / "compare.json"
    if not path.exists():
        return ""
    room = (json.loads(path.read_text()).get("room") or {})
    bal = (room.get("sets") or {}).get("balanced") or {}

    def iv(e):
        return f"{e['value']:+.1f} [{e['low']:+.1f}, {e['high']:+.1f}]"

    parts = []
    if bal.get("room"):
        parts.append(f"room (oracle − real-only) {iv(bal['room'])} points of balanced accuracy, {bal['room']['verdict']}")
    if bal.get("gain"):
        parts.append(f"gain (rebalanced − real-only) {iv(bal['gain'])}, {bal['gain']['verdict']}")
    cap = bal.get("captured")
    if cap:
        parts.append(f"captured {100 * cap['value']:.0f} % of the room")
    if not parts:
        return ""
    level = f"{100 * room.get('confidence', 0.95):.0f} %"
    return f"Report ({room.get('split', 'test')} split, {level} paired bootstrap intervals): " + "; ".join(parts) + "."


def wrap(text: str, width: int = 100) -> str:
    import textwrap

    return textwrap.fill(text, width=width, break_long_words=False, break_on_hyphens=False)


def replace_block(readme: str, block: str) -> str:
    """``readme`` with the text from START to END (markers included) replaced by ``block``."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise Problem(f"README needs exactly one {START} ... {END} block",
                      "put the two markers around the default-run paragraph and table")
    a, b = readme.index(START), readme.index(END) + len(END)
    return readme[:a] + block + readme[b:]


# --------------------------------------------------------------------------- running

def tailforge_run(run: Path, config: str | None) -> float:
    cmd = [sys.executable, "-m", "tailforge.flows", "run", "--run", str(run)] + (["--config", config] if config else [])
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise Problem(f"`{' '.join(cmd[2:])}` failed with exit code {rc}", "its output above says why")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="run folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--config", help="YAML config for `tailforge run` (default: the embedded default)")
    ap.add_argument("--reuse", action="store_true", help="take the numbers of the finished run in --run; do not "
                    "run or time anything")
    ap.add_argument("--no-rerun", action="store_true", help="do not time a cached re-run")
    ap.add_argument("--split", help="split of the metrics (default: the run's evaluate split)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--print", action="store_true", help="print the block instead of rewriting the README")
    args = ap.parse_args(argv)
    tmp = None
    try:
        readme = args.readme.read_text(encoding="utf-8") if not args.print else ""
        if readme:
            replace_block(readme, "")  # the markers are checked before minutes of work
        if args.reuse and args.run is None:
            raise Problem("--reuse needs --run", "name the finished run folder to take the numbers from")
        if args.run is None:
            tmp = Path(tempfile.mkdtemp(prefix="tailforge-readme-"))
            run = tmp / "default"
        else:
            run = args.run
            if not args.reuse and run.exists() and any(run.iterdir()):
                raise Problem(f"run folder {run} is not empty: its results would be served from its cache",
                              "pass a new folder, or --reuse to take its numbers without timing")
        wall = rerun = None
        host = machine()
        if not args.reuse:
            if hasattr(os, "getloadavg"):  # other jobs on the machine stretch the wall time: say how busy it was
                host += f"; load average {os.getloadavg()[0]:.1f} before the run"
            wall = tailforge_run(run, args.config)
            rerun = None if args.no_rerun else tailforge_run(run, args.config)
        evals = load_evals(run, args.split)
        block = render_block(evals, run, host, datetime.date.today().isoformat(), wall, rerun)
        if args.print:
            print(block)
        else:
            args.readme.write_text(replace_block(readme, block), encoding="utf-8")
            print(f"rewrote the default-run block of {args.readme}:\n{block}")
        return 0
    except Problem as exc:
        print(f"readme-numbers: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... --print | head`
        return 0
    except OSError as exc:
        print(f"readme-numbers: error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
