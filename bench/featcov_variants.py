"""Choosing featcov's settings for the pretrained recipe on VAL, through the product (`tailforge run`).

For each finished run of bench/pretrained_table.py (runs/pretrained/<dataset>-s<seed>) and each variant of the
generator, a linked copy of the run (the fine-tuned `baseline` model and its feature cache shared through
symlinks, nothing re-fine-tuned) runs the whole benchmark flow again with the variant's `generate.featcov` settings
and `evaluate.split=val`: the same real-only head chosen on VAL, featcov in the fine-tuned space, the filter, the
rebalanced and oracle heads. It tabulates the VAL gain (rebalanced − real-only) per dataset and the mean over
datasets; the test split is not read.

    python bench/featcov_variants.py --datasets ffold letters --seeds 0 1 2

Results: bench/results/featcov_variants.{md,json}; run copies in runs/featcov-variants/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from pretrained_table import LARGE, RECIPE  # noqa: E402
from room_table import DATASETS, ms, tf  # noqa: E402

from tailforge.data import read_json  # noqa: E402

VARIANTS = {  # name -> generate.featcov settings (the recipe's default first)
    "pooled": {},
    "near2": {"featcov_heads": 2},
    "calib": {"featcov_heads": 2, "featcov_pull": 0.5, "featcov_alpha": 0.2},
    "half": {"featcov_scale": 0.5},
    "copies": {"featcov_scale": 0.0},
}


def linked(src: Path, dst: Path) -> None:
    """A run folder that shares ``src``'s trained baseline (and the recipe's class-balanced backbone, where it has
    one) and feature cache; everything else is its own."""
    (dst / "models").mkdir(parents=True, exist_ok=True)
    for m in ("baseline", "backbone"):
        if not (dst / "models" / m).exists() and (src / "models" / m).exists():
            (dst / "models" / m).symlink_to((src / "models" / m).resolve())
    if not (dst / "features").exists() and (src / "features").exists():
        (dst / "features").symlink_to((src / "features").resolve())


def one(ds: str, seed: int, variant: str, a) -> dict | None:
    src = Path(a.runs) / f"{ds}-s{seed}"
    if not (src / "models" / "baseline" / "model.safetensors").exists():
        return None
    dst = Path(a.out_runs) / f"{ds}-s{seed}-{variant}" if a.split == "val" else \
        Path(a.out_runs) / f"{ds}-s{seed}-{variant}-{a.split}"
    linked(src, dst)
    sets = [s.format(ffold=a.ffold, letters=a.letters) for s in DATASETS[ds] if not s.startswith("data.image_size")]
    sets += [f"data.seed={seed}", f"train.seed={seed}", f"generate.seed={seed}", f"evaluate.split={a.split}",
             "evaluate.plots=false", "track.tensorboard=false"]
    if ds in LARGE:
        sets.append(f"train.epochs={a.ft_epochs_large}")
    sets += [f"generate.featcov.{k}={v}" for k, v in VARIANTS[variant].items()]
    if not (dst / "eval" / "report.md").exists():
        tf("run", "--wait", "--config", RECIPE, "--run", str(dst), *sum((["--set", s] for s in sets), []),
           log=str(dst) + ".log", threads=a.threads)
    ev = {k: 100 * read_json(dst / "eval" / f"{k}-{a.split}.json")["balanced_acc"]
          for k in ("real-only", "rebalanced", "oracle")}
    print(f"{dst}: gain {ev['rebalanced'] - ev['real-only']:+.2f} ({a.split})", flush=True)
    return {"real-only": ev["real-only"], "rebalanced": ev["rebalanced"], "oracle": ev["oracle"],
            "gain": ev["rebalanced"] - ev["real-only"], "room": ev["oracle"] - ev["real-only"],
            "chosen": read_json(dst / "eval" / "candidates.json")["chosen"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["ffold", "letters"], choices=list(DATASETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--runs", default="runs/pretrained")
    ap.add_argument("--out-runs", default="runs/featcov-variants")
    ap.add_argument("--ffold", default="/tmp/ffold")
    ap.add_argument("--letters", default="/tmp/letters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ft-epochs-large", type=int, default=2)
    ap.add_argument("--split", default="val", choices=["val", "test"], help="val chooses; test only reports the "
                    "variant chosen on val (run it with that one variant)")
    ap.add_argument("--out", default="bench/results/featcov_variants")
    a = ap.parse_args(argv)
    res: dict = {}
    for v in a.variants:
        for ds in a.datasets:
            for s in a.seeds:
                row = one(ds, s, v, a)
                if row is not None:
                    res.setdefault(v, {}).setdefault(ds, []).append({"seed": s, **row})
    lines = [f"# featcov settings for the pretrained recipe on the {a.split.upper()} split (`bench/featcov_variants.py`)", "",
             "Linked copies of bench/pretrained_table.py's runs (the same fine-tuned baseline and feature cache), the "
             f"whole benchmark flow again with each variant's `generate.featcov` settings, evaluated on the {a.split.upper()} "
             "split only. Gain = rebalanced − real-only (the real-only head chosen on VAL), points of balanced accuracy, "
             "mean ± std over seeds; the last column is the mean over datasets.", "",
             "| variant | settings | " + " | ".join(a.datasets) + " | mean |", "|---|---|" + "---:|" * (len(a.datasets) + 1)]
    for v, by in res.items():
        cells = [ms([r["gain"] for r in by.get(ds, [])]) if by.get(ds) else "–" for ds in a.datasets]
        mean = np.mean([np.mean([r["gain"] for r in by[ds]]) for ds in a.datasets if by.get(ds)])
        lines.append(f"| {v} | `{json.dumps(VARIANTS[v]) if VARIANTS[v] else 'recipe default'}` | "
                     + " | ".join(cells) + f" | {mean:+.2f} |")
    rooms = {ds: ms([r["room"] for r in res[a.variants[0]].get(ds, [])]) for ds in a.datasets if res.get(a.variants[0])}
    lines += ["", f"{a.split.upper()} room (oracle − real-only) of the same runs: " + ", ".join(f"{d} {r}" for d, r in rooms.items())]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
