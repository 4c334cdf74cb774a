"""The pretrained recipe's input resolution, chosen on VAL within the recipe's cost bound.

Issue 30 asks for the resolution of flows/recipes/pretrained.yaml to be chosen on VAL, with the whole four-arm run
on a 10-class 28 px folder in at most 10 minutes on the 2-core machine. For each size this runs the product's
benchmark flow (`tailforge run --config flows/recipes/pretrained.yaml --set train.input_size=S`, through
bench/pretrained_table.py, so the runs are the same as the table's) on the folders and seeds given, and reads:

* the VAL balanced accuracy of the strongest real-only model (the best of the candidate heads and the fine-tuned
  network's own head: what the recipe would ship), the number the choice is made on;
* the TEST balanced accuracy of the real-only arm, reported, never used;
* the cost: training throughput of EfficientNet-Lite0 (forward + backward + SGD step, batch 64) at each size,
  measured side by side in one process (``--speed``), and the time of the whole run on the issue's 10-class folder:
  measured where a run was made alone (``--quiet SIZE=LOG``), else projected from that run (or the quickest 64 px
  table run) with its fine-tune scaled by the throughput ratio.

The choice: the highest mean VAL score over datasets among the sizes whose projected run fits the bound.

    python bench/pretrained_resolution.py --sizes 64 80 96 --datasets ffold letters --seeds 0 1 2 --speed \
        --quiet 80=bench/results/pretrained_accept_80px.log
    # the log: tailforge run --config flows/recipes/pretrained.yaml --set data.dataset=imagefolder \
    #          --set data.root=/tmp/ffold --set data.imbalance=50   (alone on the 2-core machine)

Runs go to runs/pretrained-r<S>/<dataset>-s<seed> (64 px: runs/pretrained, the table's own runs); results to
bench/results/pretrained_resolution.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import pretrained_table as pt  # noqa: E402

BOUND_S = 600  # issue 30: the four arms on a 10-class 28 px folder in at most 10 minutes (2 cores)
DEFAULT = 64


def runs_dir(size: int) -> str:
    return "runs/pretrained" if size == DEFAULT else f"runs/pretrained-r{size}"


def throughput(sizes, batch: int = 64, warm: int = 2, steps: int = 5) -> dict[int, float]:
    """Images per second of one training step of tf_efficientnet_lite0 at each size, side by side."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out = {}
    for s in sizes:
        x, y = torch.randn(batch, 3, s, s), torch.randint(0, 10, (batch,))
        for i in range(warm + steps):
            if i == warm:
                t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        out[s] = batch * steps / (time.perf_counter() - t0)
    return out


def stamps(log: Path) -> tuple[float, float] | None:
    """(whole run, baseline fine-tune) seconds from a flow log's task stamps (HH:MM:SS.mmm, one day)."""
    def sec(line):
        h, m_, s = line[:12].split(":")
        return int(h) * 3600 + int(m_) * 60 + float(s)
    if not log.exists():
        return None
    lines = [ln for ln in log.read_text().splitlines() if len(ln) > 12 and ln[2] == ":" and ln[5] == ":"]
    start = next((ln for ln in lines if "Beginning flow run" in ln), None)
    base = next((ln for ln in lines if "train baseline" in ln and "Finished" in ln), None)
    plan = next((ln for ln in lines if "Task run 'plan" in ln and "Finished" in ln), None)
    if not (start and base and plan):
        return None
    return sec(lines[-1]) - sec(start), sec(base) - sec(plan)


def size_log(text: str) -> tuple[int, Path]:
    """``--quiet SIZE=LOG``: a size in pixels and a flow log that exists (else argparse's one-line usage error)."""
    size, eq, log = text.partition("=")
    if not (eq and size.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not SIZE=LOG (e.g. 80=bench/results/pretrained_accept_80px.log)")
    if not Path(log).is_file():
        raise argparse.ArgumentTypeError(f"no flow log at {log!r}; give the log of a run made alone at {size} px")
    return int(size), Path(log)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 80])
    ap.add_argument("--datasets", nargs="+", default=["ffold", "letters"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    pt.folder_args(ap)
    ap.add_argument("--speed", action="store_true", help="measure training throughput at each size (side by side)")
    ap.add_argument("--quiet", nargs="*", default=[], metavar="SIZE=LOG", type=size_log,
                    help="the flow log of a run at SIZE px made alone on the machine (the issue's 10-class folder "
                         "command): its time is the measured cost, and it is the reference the other sizes project from")
    ap.add_argument("--collect-only", action="store_true", help="tabulate finished runs, run nothing")
    ap.add_argument("--out", default="bench/results/pretrained_resolution")
    a = ap.parse_args(argv)
    res: dict = {}
    for size in a.sizes:
        ns = Namespace(runs=runs_dir(size), ffold=a.ffold, letters=a.letters, letters26=a.letters26,
                       letters52=a.letters52,
                       ft_epochs_large=2, threads=a.threads, set=[f"train.input_size={size}", "compare.headroom=false"])
        for ds in a.datasets:
            for s in a.seeds:
                run = Path(ns.runs) / f"{ds}-s{s}"
                row = pt.collect(run) if a.collect_only else pt.one(ds, s, ns)
                if row is None:
                    continue
                row["stamps"] = stamps(Path(str(run) + ".log"))
                res.setdefault(size, {}).setdefault(ds, []).append({"seed": s, **row})
    speed = throughput(a.sizes) if a.speed else {}
    quiet = {k: stamps(v) for k, v in a.quiet}
    quiet = {k: v for k, v in quiet.items() if v}
    # the reference: a quiet run if given, else the quickest 64 px table run; split into the fine-tune (scales with
    # the throughput) and the rest
    if quiet:
        rsize, (rwhole, rft) = next(iter(quiet.items()))
        ref_line = (f"Reference: the {rsize} px run made alone ({rwhole / 60:.1f} min, {rft / 60:.1f} of it the "
                    "fine-tune; flow task stamps). Other sizes: that run with the fine-tune scaled by the throughput ratio.")
    else:
        ref = [r["stamps"] for rows in res.get(DEFAULT, {}).values() for r in rows if r.get("stamps")]
        rsize, (rwhole, rft) = (DEFAULT, min(ref)) if ref else (None, (None, None))
        ref_line = (f"Reference: the quickest {DEFAULT} px table run ({rwhole / 60:.1f} min, {rft / 60:.1f} of it the "
                    f"fine-tune; the {len(ref)} runs took {np.mean([r[0] for r in ref]) / 60:.1f} min on average, most "
                    "sharing the CPU with other benches). Other sizes: that run with the fine-tune scaled by the "
                    "throughput ratio.") if ref else ""
    lines = ["# The pretrained recipe's input size, chosen on VAL (`bench/pretrained_resolution.py`)", "",
             "EfficientNet-Lite0 fine-tuned by flows/recipes/pretrained.yaml at each input size (the folders' 28 px "
             "images resized up), the product's four-arm flow per dataset and seed. VAL: the strongest real-only model "
             "(best of the crt / la / taunorm heads and the fine-tuned network's own head), the choice is made on it; "
             "TEST: the real-only arm, reported only. Balanced accuracy in points, mean over seeds.", ""]
    head = "| size | " + " | ".join(f"{ds} VAL | {ds} TEST" for ds in a.datasets) + " | mean VAL | " \
           "train images/s (side by side) | projected run (10-class folder) |"
    lines += [head, "|---:|" + "---:|" * (2 * len(a.datasets) + 3)]
    score = {}
    for size in a.sizes:
        by = res.get(size, {})
        cells, vals = [], []
        for ds in a.datasets:
            rows = by.get(ds, [])
            if rows:
                v = np.mean([max(r["val"].values()) for r in rows])
                vals.append(v)
                cells.append(f"{v:.2f} ({len(rows)})")
                cells.append(f"{np.mean([r['real-only_test'] for r in rows]):.2f}")
            else:
                cells += ["–", "–"]
        mv = float(np.mean(vals)) if len(vals) == len(a.datasets) else float("nan")
        proj = float("nan")
        if size in quiet:
            proj = quiet[size][0]
        elif rsize and speed.get(size) and speed.get(rsize):
            proj = rwhole - rft + rft * speed[rsize] / speed[size]
        score[size] = {"mean_val": mv, "images_per_s": speed.get(size), "projected_s": proj}
        lines.append(f"| {size} px | " + " | ".join(cells) + f" | {mv:.2f} | "
                     + (f"{speed[size]:.0f}" if size in speed else "–") + " | "
                     + (f"{proj / 60:.1f} min" + (" (measured)" if size in quiet else "") if np.isfinite(proj) else "–")
                     + " |")
    # compared on the same runs only: a size with fewer seeds than the others is shown, not chosen
    full = max((sum(len(v) for v in res.get(s, {}).values()) for s in a.sizes), default=0)
    for s in a.sizes:
        score[s]["runs"] = sum(len(v) for v in res.get(s, {}).values())
    ok = [s for s in a.sizes if np.isfinite(score[s]["mean_val"]) and score[s]["runs"] == full
          and not (np.isfinite(score[s]["projected_s"]) and score[s]["projected_s"] > BOUND_S)]
    chosen = max(ok, key=lambda s: score[s]["mean_val"]) if ok else None
    if ref_line:
        lines += ["", ref_line]
    lines += ["", (f"Chosen on VAL within the {BOUND_S // 60}-minute bound, among the sizes run on every dataset and "
                   f"seed ({full} runs): **{chosen} px**") if chosen else "", ""]
    few = [s for s in a.sizes if 0 < score[s]["runs"] < full]
    if few:
        shown = ", ".join(f"{s} px ({score[s]['runs']} runs)" for s in few)
        lines += [f"Run on fewer seeds (shown, not chosen): {shown}."]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    Path(a.out + ".json").write_text(json.dumps({"runs": {str(k): v for k, v in res.items()}, "score": score,
                                                 "chosen": chosen}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
