"""Long-tail loss table on Fashion-MNIST-LT (IF = 100): CE vs re-weighting vs logit adjustment vs cRT.

    nice python bench/loss_table.py                 # the documented CPU budget (<= ~20 min on 2 busy cores)
    python bench/loss_table.py --model resnet32 --width 16 --n-max 6000 --size 28 --epochs 60   # GPU budget

Every method trains on the same long-tailed split with the same seeds, selects its epoch by val
balanced accuracy, and is reported on the (balanced) test split: overall top-1, balanced accuracy,
many / medium / few accuracy (absolute groups: > 100 and < 20 train images) and macro F1,
mean ± std over seeds. cRT re-trains the head of the CE model of the same seed with class-balanced
sampling (Kang et al. 2020).

CPU budget (documented, because the machine has 2 cores shared with other jobs): the balanced
Fashion-MNIST train split is first subsampled to ``--n-max`` images per class (default 500, seeded),
then made long-tailed with IF = 100 (500 ... 5 images per class, 1,235 in all); the official test
set is subsampled to ``--n-test`` per class and split into val (20 %) and test. Images are fed at
``--size`` 14 px (the model resizes 28 -> 14 inside), ``--epochs`` 12, batch 64. The default model is
the small ``tiny`` CNN (3 conv blocks, width 32), one torch thread: measured on the shared 2-core machine, ResNet-32 ran
at 26 images/s even at width 8 and 14 px (31 thin layers are overhead-bound on CPU), which would take
hours for 24 runs; the tiny CNN runs at ~300 images/s. On a GPU use ``--model resnet32`` (the
literature's backbone) with the full data (``--n-max 6000 --size 28``).
Writes ``bench/results/loss_table.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {  # label -> TrainConfig overrides
    "ce": {"loss": "ce"},
    "weighted_ce": {"loss": "weighted_ce", "class_weights": "inverse"},
    "focal": {"loss": "focal"},
    "class_balanced": {"loss": "class_balanced", "cb_beta": 0.999},
    "balanced_softmax": {"loss": "balanced_softmax"},
    "ldam_drw": {"loss": "ldam_drw"},
    # not in the default table: the DRW-timing study (see bench/results/ldam_drw.md)
    "ldam": {"loss": "ldam"},
    "ldam_drw_80": {"loss": "ldam_drw", "drw_frac": 0.8},  # Cao et al.'s 160/200, the old default
    "logit_adjust": {"loss": "logit_adjust", "la_tau": 1.0},
    "crt": {"stage": "crt", "sampler": "class_balanced"},
}
COLUMNS = ("top1", "balanced_acc", "many", "medium", "few", "macro_f1")


def build_run(args) -> "RunDir":  # noqa: F821
    """Fashion-MNIST subsampled to n_max per class, then long-tailed with IF = 100 (see the module doc)."""
    from tailforge.data import DataConfig, RunDir, build_manifest, measure_run
    from tailforge.data.datasets import RawDataset, RawSplit, load_dataset

    cfg = DataConfig(dataset="fashion-mnist", root=args.root, imbalance=100, seed=0, val_from_test=0.2)
    run = RunDir(args.out_runs / f"fmnist-lt100-n{args.n_max}-t{args.n_test}")
    if not run.real.exists():
        raw = load_dataset(cfg)
        rng = np.random.default_rng(0)

        def sub(split: RawSplit, per_class: int) -> RawSplit:
            idx = np.concatenate([rng.permutation(np.flatnonzero(split.labels == c))[:per_class]
                                  for c in range(raw.num_classes)])
            idx.sort()
            return RawSplit(labels=split.labels[idx], images=split.images[idx])

        small = RawDataset(raw.name, raw.class_names, {"train": sub(raw.splits["train"], args.n_max),
                                                        "test": sub(raw.splits["test"], args.n_test)},
                           raw.channels, raw.image_size, raw.root)
        build_manifest(cfg, run, raw=small)
        measure_run(run)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out-runs", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--size", type=int, default=14, help="input side fed to the model")
    ap.add_argument("--n-max", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--crt-epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m not in ("ldam", "ldam_drw_80")],
                    choices=list(METHODS))
    ap.add_argument("--name", default="loss_table", help="results file stem in bench/results/")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is ~20x faster than 2 on a machine whose cores are shared")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from tailforge.data import ClassStats
    from tailforge.eval import evaluate
    from tailforge.train import TrainConfig, fit

    t_all = time.perf_counter()
    run = build_run(args)
    stats = ClassStats.load(run)
    print(f"run {run.root}: train counts {stats.counts['train']}, groups {stats.group_sizes}", flush=True)
    common = dict(model=args.model, width=args.width, input_size=args.size, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, weight_decay=5e-4, warmup=1, hflip=True,
                  augment="basic", device=args.device, overwrite=True)
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    speed = []
    for seed in args.seeds:
        for method in args.methods:
            over = dict(METHODS[method])
            if "drw_frac" in over:  # DRW start as a fraction of the epochs
                over["drw_epoch"] = int(round(over.pop("drw_frac") * args.epochs))
            t0 = time.perf_counter()
            if over.get("stage") == "crt":
                cfg = TrainConfig(**{**common, "epochs": args.crt_epochs, **over, "base": f"ce-s{seed}",
                                     "seed": seed})
            else:
                cfg = TrainConfig(**{**common, **over, "seed": seed})
            path = fit(run, cfg, f"{method}-s{seed}")
            res = evaluate(run, f"{method}-s{seed}", "test")
            log = [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]
            if over.get("stage") != "crt":
                speed.append(np.median([r["images_per_s"] for r in log]))
            results[method].append(res)
            print(f"seed {seed} {method:16s} " + " ".join(f"{c} {res[c]:.3f}" for c in COLUMNS)
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = render(results, args, stats, float(np.median(speed)) if speed else None, time.perf_counter() - t_all)
    print(table)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    from tailforge.data.atomic import write_json, write_text

    write_text(out / f"{args.name}.md", table)
    write_json(out / f"{args.name}.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                         "train_counts": stats.counts["train"], "groups": stats.groups,
                                         "results": {m: [{c: r[c] for c in COLUMNS} for r in rs]
                                                     for m, rs in results.items()}})
    return 0


def render(results, args, stats, img_s, total_s) -> str:
    lines = [f"## Fashion-MNIST-LT (IF = 100), {args.model} width {args.width} at {args.size} px, "
             f"{args.epochs} epochs, seeds {args.seeds}: TEST split (balanced, "
             f"{sum(stats.counts['test'])} images), epoch selected on val balanced accuracy",
             "", f"train images per class: {stats.counts['train']} (groups: {stats.group_sizes})", "",
             "| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for m, rs in results.items():
        cells = []
        for c in COLUMNS:
            v = [r[c] for r in rs if r.get(c) is not None]
            cells.append(f"{100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1) if len(v) > 1 else 0:.1f}" if v else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"(accuracies in %, mean ± std over {len(args.seeds)} seeds; training throughput "
              f"{img_s:.0f} images/s median on {args.device}; whole table {total_s / 60:.1f} min)"
              if img_s else ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
