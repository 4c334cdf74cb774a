"""Does the filter help? Fashion-MNIST-LT (IF=100): real only / real + all candidates / real + filtered.

Three classifiers with the same seed, architecture, epochs and batch size differ only in their
training data; model selection on the val split (balanced accuracy), numbers reported on the TEST
split (balanced accuracy and few-shot accuracy), plus val. Writes bench/results/filter_effect.json/.md.

Candidate sources (``--source``):
- ``ddpm``: the in-domain class-conditional diffusion generator (``gen.generate``), plan by ``gen.plan_run``;
- ``planted``: realistic bad cases built from the real TRAIN pool only (images the long-tail
  construction dropped; never val/test): for each class in the plan, good candidates (pool images of
  the class), wrong-class ones (pool images of another class given this label), near copies (the class's
  real train images + pixel noise) and duplicates (a good candidate repeated with faint noise).
  This measures the filter itself when no generator is at hand; the report says which source was used.

    nice python bench/filter_effect.py --source planted --epochs 4
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import (DataConfig, RunDir, build_manifest, measure_run, read_manifest, save_png,  # noqa: E402
                  write_json, write_manifest)

FASHION = Path("/usr/share/datasets/fashion-mnist")


def planted_candidates(run: RunDir, per_class: int, need: int, seed: int = 0) -> pd.DataFrame:
    """Candidates from the TRAIN pool the long-tail construction dropped (see module docstring)."""
    from data import load_dataset

    info = run.dataset_info()
    real = read_manifest(run.real)
    raw = load_dataset(DataConfig(dataset="fashion-mnist", root=FASHION))
    pool_x, pool_y = raw.splits["train"].images, raw.splits["train"].labels
    used = {int(u.split("#")[1]) for u in real.loc[real["uri"].str.startswith("data/train.npy"), "uri"]}
    pool = np.array([i for i in range(len(pool_y)) if i not in used])
    rng = np.random.default_rng(seed)
    train = real[real["split"] == "train"]
    counts = np.bincount(train["label"], minlength=info["num_classes"])
    tail = [int(c) for c in np.argsort(counts)[: info["num_classes"] // 2]]  # the rarer half
    folder = run.root / "synthetic" / "planted" / "s0"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(img, label, kind, parent):
        sid = f"planted-{len(rows):06d}"
        save_png(img, folder / f"{sid}.png")
        rows.append(dict(sample_id=sid, uri=f"synthetic/planted/s0/{sid}.png", label=label,
                         class_name=info["class_names"][label], split="train", source="ddpm", generator="planted",
                         seed=len(rows), prompt=kind, parent_id=parent, shard="s0"))

    def noisy(img, a):
        return np.clip(img.astype(int) + rng.integers(-a, a + 1, img.shape), 0, 255).astype(np.uint8)

    n_good, n_wrong, n_copy = int(per_class * 0.5), int(per_class * 0.2), int(per_class * 0.2)
    n_dup = per_class - n_good - n_wrong - n_copy
    for c in tail:
        own = rng.permutation(pool[pool_y[pool] == c])
        others = rng.permutation(pool[pool_y[pool] != c])
        for i in own[:n_good]:
            add(pool_x[i], c, "good", f"pool-{i}")
        for i in others[:n_wrong]:
            add(pool_x[i], c, "wrong_class", f"pool-{i}")
        real_c = train[train["label"] == c]["uri"].to_numpy()
        for uri in rng.choice(real_c, n_copy):
            add(noisy(pool_x[int(uri.split("#")[1])], 6), c, "near_copy", uri)
        for i in rng.choice(own[:n_good], n_dup):
            add(noisy(pool_x[i], 3), c, "duplicate", f"pool-{i}")
    df = pd.DataFrame(rows)
    write_manifest(df, run.candidates)
    write_json(run.plan, {"target": "planted", "overgen": per_class / need, "total": len(df), "classes": [
        dict(label=c, class_name=info["class_names"][c], have=int(counts[c]), need=need if c in tail else 0,
             generate=per_class if c in tail else 0) for c in range(info["num_classes"])]})
    return df


def ddpm_candidates(run: RunDir, args) -> pd.DataFrame:
    import gen

    gen.plan_run(run, gen.PlanConfig(target="fixed", count=args.need, overgen=args.overgen))
    return gen.generate(run, gen.GenerateConfig(generator="ddpm", seed=args.seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/bench-filter-fmnist-lt")
    ap.add_argument("--source", choices=["planted", "ddpm"], default="planted")
    ap.add_argument("--need", type=int, default=300, help="planned samples kept per tail class")
    ap.add_argument("--overgen", type=float, default=2.0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "filter_effect"))
    args = ap.parse_args()

    import train
    from eval.evaluate import evaluate
    from eval.filter import FilterConfig, filter_candidates

    t0 = time.time()
    run = RunDir(args.run)
    build_manifest(DataConfig(dataset="fashion-mnist", root=FASHION, imbalance=100, seed=args.seed), run)
    stats = measure_run(run)
    cfg = dict(model=args.model, epochs=args.epochs, batch_size=128, seed=args.seed, hflip=False, device="auto")
    train.fit(run, train.TrainConfig(**cfg), "baseline")  # real only; also the filter's embedder
    if not run.candidates.exists():
        if args.source == "planted":
            planted_candidates(run, int(args.need * args.overgen), args.need, args.seed)
        else:
            ddpm_candidates(run, args)
    filtered = filter_candidates(run, FilterConfig())
    train.fit(run, train.TrainConfig(**cfg, synthetic="candidates"), "all-candidates")
    train.fit(run, train.TrainConfig(**cfg, synthetic="filtered"), "filtered")

    results = {}
    for name in ("baseline", "all-candidates", "filtered"):
        for split in ("val", "test"):
            m = evaluate(run, name, split)
            results[f"{name}/{split}"] = {k: m.get(k) for k in ("top1", "balanced_acc", "many", "medium", "few")}
    reasons = filtered["reason"].replace("", "accepted").value_counts().to_dict()
    truth = {}
    if "prompt" in filtered and args.source == "planted":
        truth = {k: g["reason"].replace("", "accepted").value_counts().to_dict() for k, g in filtered.groupby("prompt")}
    lines = [f"# Filter effect: Fashion-MNIST-LT IF={stats.imbalance_factor:.0f}, candidates: {args.source}", "",
             f"model {args.model}, {args.epochs} epochs, seed {args.seed}, same budget for all three; selected on val "
             "balanced accuracy; TEST split numbers below (val in the JSON).", "",
             "| training data | test balanced acc | test few-shot acc | test many | test top-1 |", "|---|---|---|---|---|"]
    for name in ("baseline", "all-candidates", "filtered"):
        r = results[f"{name}/test"]
        lines.append(f"| {name} | {r['balanced_acc']:.4f} | {r['few'] if r['few'] is not None else float('nan'):.4f} | "
                     f"{r['many'] if r['many'] is not None else float('nan'):.4f} | {r['top1']:.4f} |")
    lines += ["", f"filter decisions: {reasons}"]
    if truth:
        lines += ["", "planted truth -> filter decision:"] + [f"- {k}: {v}" for k, v in truth.items()]
    lines += ["", f"wall time {time.time() - t0:.0f} s"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(dict(args=vars(args), results=results, reasons=reasons,
                                                        planted_truth=truth), indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
