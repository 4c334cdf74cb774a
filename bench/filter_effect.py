"""Does the filter help? Fashion-MNIST-LT (IF=100): real only / real + all candidates / real + filtered.

Three classifiers with the same seeds, architecture, epochs and batch size differ only in their
training data; model selection on the val split (balanced accuracy), numbers reported on the TEST
split (balanced / few-shot / medium / many accuracy, top-1; mean ± std over ``--seeds``), val in the
JSON. The filter embeds with the first seed's real-only classifier (train split only).
Writes bench/results/filter_effect_<source>.{md,json}.

Candidate sources (``--source``):
- ``ddpm``: the in-domain class-conditional diffusion generator (``tailforge.gen.generate``), plan by ``tailforge.gen.plan_run``;
- ``planted``: realistic bad cases built from the real TRAIN pool only (images the long-tail
  construction dropped; never val/test): for each class in the plan, good candidates (pool images of
  the class), wrong-class ones (pool images of another class given this label), near copies (the class's
  real train images + pixel noise) and duplicates (a good candidate repeated with faint noise).
  This measures the filter itself when no generator is at hand; the report says which source was used.

    nice python bench/filter_effect.py --source planted
    nice python bench/filter_effect.py --source ddpm --ddpm-steps 3000   # CPU: ~15 min; GPU: --ddpm-preset full
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tailforge.data import (DataConfig, RunDir, build_manifest, measure_run, read_json, read_manifest,  # noqa: E402
                  write_json, write_manifest)
from tailforge.data.atomic import write_text  # noqa: E402
from tailforge.eval.filter.planted import PlantedCandidates  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")


def planted_candidates(run: RunDir, per_class: int, need: int, seed: int = 0) -> pd.DataFrame:
    """Candidates from the TRAIN pool the long-tail construction dropped (see module docstring)."""
    from tailforge.data import load_dataset

    info = run.dataset_info()
    real = read_manifest(run.real)
    raw = load_dataset(DataConfig(dataset="fashion-mnist", root=FASHION))
    pool_x, pool_y = raw.splits["train"].images, raw.splits["train"].labels
    used = {int(u.split("#")[1]) for u in real.loc[real["uri"].str.startswith("data/train.npy"), "uri"]}
    pool = np.array([i for i in range(len(pool_y)) if i not in used])
    planted = PlantedCandidates(run, seed)
    rng, add, noisy = planted.rng, planted.add, planted.noisy
    train = real[real["split"] == "train"]
    counts = np.bincount(train["label"], minlength=info["num_classes"])
    tail = [int(c) for c in np.argsort(counts)[: info["num_classes"] // 2]]  # the rarer half

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
    df = planted.write()
    write_json(run.plan, {"target": "planted", "overgen": per_class / need, "total": len(df), "classes": [
        dict(label=c, class_name=info["class_names"][c], have=int(counts[c]), need=need if c in tail else 0,
             generate=per_class if c in tail else 0) for c in range(info["num_classes"])]})
    return df


def ddpm_candidates(run: RunDir, args) -> pd.DataFrame:
    from tailforge import gen

    gen.plan_run(run, gen.PlanConfig(target="fixed", count=args.need, overgen=args.overgen))
    opts = gen.DDPMOptions(ddpm_preset=args.ddpm_preset, ddpm_train_steps=args.ddpm_steps)
    df = gen.generate(run, gen.GenerateConfig(generator="ddpm", seed=0, ddpm=opts))
    gen.write_sample_grids(run, "ddpm")
    return df


NAMES = ("baseline", "all-candidates", "filtered", "random-same-count")
REWEIGHT = "real-only-balanced-softmax"  # --reweight-arm: no synthetic data, a re-balancing loss instead
SYNTHETIC = {"baseline": "none", "all-candidates": "candidates", "filtered": "filtered",
             "random-same-count": "filtered"}


class random_selection:
    """Control arm: ``filtered.parquet`` temporarily replaced by a random pick of candidates, per class
    the same count the filter accepted (seeded), so "filtered" vs this arm measures the filter's choice
    and not the amount of synthetic data. The filter's own file is restored afterwards."""

    def __init__(self, run: RunDir, filtered: pd.DataFrame, seed: int):
        self.run, self.filtered, self.seed = run, filtered, seed

    def __enter__(self):
        rng = np.random.default_rng(1000 + self.seed)
        df = self.filtered.copy()
        pick = np.zeros(len(df), bool)
        for _, idx in df.groupby("label").groups.items():
            n = int(df.loc[idx, "accepted"].sum())
            pick[df.index.get_indexer(rng.choice(np.asarray(idx), n, replace=False))] = True
        df["accepted"], df["reason"] = pick, np.where(pick, "", "random")
        self.saved = self.run.filtered.read_bytes()
        write_manifest(df, self.run.filtered)

    def __exit__(self, *exc):
        tmp = self.run.filtered.with_suffix(".restore")
        tmp.write_bytes(self.saved)
        tmp.replace(self.run.filtered)
        return False
KEYS = ("top1", "balanced_acc", "many", "medium", "few", "synth_classes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=["planted", "ddpm"], default="planted")
    ap.add_argument("--run", default=None, help="run folder (default: runs/bench-filter-<source>)")
    ap.add_argument("--need", type=int, default=300, help="planned samples kept per tail class")
    ap.add_argument("--overgen", type=float, default=2.0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier training seeds")
    ap.add_argument("--ddpm-preset", default="fast")
    ap.add_argument("--ddpm-steps", type=int, default=None, help="ddpm training steps (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--filter", nargs="*", default=[], metavar="KEY=VALUE",
                    help="FilterConfig overrides, e.g. consistency=prototype (a variant: use with --tag)")
    ap.add_argument("--embedder-loss", default=None, help="train the filter's embedder (real only, first seed) "
                    "with this loss instead of using the CE baseline, e.g. balanced_softmax")
    ap.add_argument("--reweight-arm", action="store_true", help="also train real only with balanced softmax: "
                    "does synthetic data beat re-weighting the real data?")
    ap.add_argument("--tag", default="", help="variant name: the filtered models and results files carry it; "
                    "baseline and all-candidates models are reused")
    ap.add_argument("--out", default=None, help="results stem (default: bench/results/filter_effect_<source>)")
    args = ap.parse_args()
    args.run = args.run or f"runs/bench-filter-{args.source}"
    tag = f"-{args.tag}" if args.tag else ""
    args.out = args.out or str(Path(__file__).parent / "results" / f"filter_effect_{args.source}{tag}")
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.filter)}

    import torch

    from tailforge import train
    from tailforge.eval.evaluate import evaluate
    from tailforge.eval.filter import FilterConfig, filter_candidates

    torch.set_num_threads(args.threads)
    t0 = time.time()
    run = RunDir(args.run)
    build_manifest(DataConfig(dataset="fashion-mnist", root=FASHION, imbalance=100, seed=0), run)
    stats = measure_run(run)
    cfg = dict(model=args.model, epochs=args.epochs, batch_size=128, hflip=False, device="auto")
    first = f"baseline-s{args.seeds[0]}"
    train.fit(run, train.TrainConfig(**cfg, seed=args.seeds[0]), first)  # real only; also the filter's embedder
    t_gen = time.time()
    if not run.candidates.exists():
        if args.source == "planted":
            planted_candidates(run, int(args.need * args.overgen), args.need, 0)
        else:
            ddpm_candidates(run, args)
    t_gen = time.time() - t_gen
    embedder = first
    if args.embedder_loss:
        embedder = f"embedder-{args.embedder_loss}-s{args.seeds[0]}"
        train.fit(run, train.TrainConfig(**cfg, seed=args.seeds[0], loss=args.embedder_loss), embedder)
    filtered = filter_candidates(run, FilterConfig(model=embedder, **overrides))
    topped = sorted({int(c["label"]) for c in read_json(run.plan)["classes"] if c["generate"]})

    names = NAMES + ((REWEIGHT,) if args.reweight_arm else ())
    results: dict[str, list[dict]] = {f"{n}/{sp}": [] for n in names for sp in ("val", "test")}
    for seed in args.seeds:
        for name in names:
            model = f"{name}{tag if name in ('filtered', 'random-same-count') else ''}-s{seed}"
            if name == REWEIGHT:
                train.fit(run, train.TrainConfig(**cfg, seed=seed, loss="balanced_softmax"), model)
            elif name == "random-same-count":
                with random_selection(run, filtered, seed):
                    train.fit(run, train.TrainConfig(**cfg, seed=seed, synthetic="filtered"), model)
            else:
                train.fit(run, train.TrainConfig(**cfg, seed=seed, synthetic=SYNTHETIC[name]), model)
            for split in ("val", "test"):
                m = evaluate(run, model, split)
                m["synth_classes"] = float(np.mean([m["per_class"][c] for c in topped]))
                results[f"{name}/{split}"].append({k: m.get(k) for k in KEYS})
            r = results[f"{name}/test"][-1]
            print(f"seed {seed} {name:15s} test balanced {r['balanced_acc']:.4f} "
                  f"topped-up classes {r['synth_classes']:.4f}", flush=True)

    def ms(name: str, key: str, split: str = "test") -> str:
        v = np.array([r[key] for r in results[f"{name}/{split}"] if r[key] is not None], dtype=float)
        if not len(v):
            return "–"
        return f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1):.1f}" if len(v) > 1 else f"{100 * v.mean():.1f}"

    reasons = filtered["reason"].replace("", "accepted").value_counts().to_dict()
    truth = {}
    if "kind" in filtered and args.source == "planted":
        truth = {k: g["reason"].replace("", "accepted").value_counts().to_dict() for k, g in filtered.groupby("kind")}
    lines = [f"# Filter effect: Fashion-MNIST-LT IF={stats.imbalance_factor:.0f}, candidates: {args.source}"
             + (f", filter variant '{args.tag}': {overrides}" if args.tag else ""), "",
             f"filter embedder: the classifier `{embedder}` (real train split only).", "",
             f"{len(filtered)} candidates for the {len(topped)} topped-up classes {topped} ({args.need} kept per "
             f"class at most); train images per class {stats.counts['train']}; classifier {args.model}, {args.epochs} epochs, "
             f"seeds {args.seeds}, same budget for all three; epoch selected on val balanced accuracy. "
             "TEST split, accuracies in %, mean ± std over seeds (val numbers in the JSON).", "",
             "| training data | balanced acc | topped-up classes | few-shot | medium | many | top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(ms(name, k) for k in ("balanced_acc", "synth_classes", "few",
                                                                          "medium", "many", "top1")) + " |")
    lines += ["", "random-same-count: as many candidates per class as the filter accepted, picked at random "
              "(the control for the amount of synthetic data)."]
    lines += ["", "topped-up classes: mean per-class accuracy of the classes that received candidates; "
              "few/medium/many use the absolute groups (< 20, 20-100, > 100 train images; '–' = empty group)."]
    lines += ["", f"filter decisions: {reasons}"]
    if truth:
        lines += ["", "planted truth -> filter decision:"] + [f"- {k}: {v}" for k, v in truth.items()]
    lines += ["", f"candidate generation {t_gen:.0f} s; wall time {time.time() - t0:.0f} s (CPU, "
              f"{args.threads} torch thread(s))"]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out + ".md", text)
    write_json(args.out + ".json", dict(args=vars(args), results=results, reasons=reasons, planted_truth=truth))


if __name__ == "__main__":
    main()
