"""Does synthetic data beat the best real-only recipe? The table of issue 12, over seeds and imbalance factors.

For every (imbalance factor, seed), one ``tailforge run`` of the benchmark flow with a recipe (default
``flows/recipes/small-images.yaml``) and the first generator (the winner) gives the three arms
``baseline``, ``real-only`` and ``rebalanced``. Every further generator runs in a linked copy of that
run folder (the same split, baseline backbone, plan and recipe; its own candidates, filter and
``rebalanced`` model, made with the stage CLIs), so generators differ in nothing but the generator.
In the winner's run folder the bench adds:

- ``balanced_softmax`` and ``ldam_drw``: full training with those losses on real data (the loss table);
- ``crt-bs``: cRT with balanced softmax and instance sampling on real features (the other classic cRT);
- ``all-candidates``: the recipe on real + every candidate (no filter);
- ``random-same-count``: the recipe on real + a random subset of the candidates with the filter's
  accepted count per class (a seeded draw; the filter's control).

Every model is evaluated on VAL and TEST. Settings were chosen on VAL (bench/feature_study.py); the
TEST columns are the reported result. Output: ``<out>.json`` and ``<out>.md``.

    nice python bench/synthetic_table.py --imbalance 100 10 --seeds 0 1 2 --epochs 4 \\
        --generators featcov featdict fdiff
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")


def linked_copy(src: Path, dst: Path, own: tuple[str, ...]) -> None:
    """A run folder sharing ``src``'s inputs through symlinks, with its own ``own`` files."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name in own or p.name.startswith(".") or p.name in ("eval", "models", "config.yaml"):
            continue
        if not (dst / p.name).exists():
            (dst / p.name).symlink_to(p.resolve())
    (dst / "models").mkdir(exist_ok=True)
    for name in ("baseline", "backbone"):  # the recipe's frozen backbone is one of them
        base = dst / "models" / name
        if not base.exists() and (src / "models" / name).exists():
            base.symlink_to((src / "models" / name).resolve())


def fit_once(run, name: str, tc, log: Path) -> None:
    """Train ``models/<name>`` of ``run`` with ``tc`` unless it is there; log the time."""
    from tailforge.train import fit

    if not (run.model_dir(name) / "model.safetensors").exists():
        t0 = time.time()
        fit(run, tc, name)
        with open(log, "a") as f:
            f.write(f"trained {name} in {run.root} ({time.time() - t0:.0f} s)\n")


def extra_arms(run_dir: Path, seed: int, log: Path, loss_arms: bool = True) -> list[str]:
    """Train the extra arms in the winner's run folder; returns (run folder, model) pairs to evaluate."""
    from tailforge.data import RunDir, read_manifest, write_manifest
    from tailforge.flows.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    run = RunDir(run_dir)
    out = []

    def train(r, name, tc, report=True):
        fit_once(r, name, tc, log)
        if report:
            out.append((r.root, name))

    def arm(r, name, synthetic):  # the recipe arm, with its own backbone first when the recipe trains one
        steps = cfg.arm_trainings(name, synthetic)
        for k, (n, tc) in enumerate(steps):
            train(r, n, tc, report=k == len(steps) - 1)

    base = cfg.baseline_train()
    if loss_arms:
        train(run, "balanced_softmax", base.model_copy(update={"loss": "balanced_softmax"}))
        train(run, "ldam_drw", base.model_copy(update={"loss": "ldam_drw"}))
    train(run, "crt-bs", cfg.real_only_train().model_copy(update={"loss": "balanced_softmax", "sampler": "instance",
                                                                   "prior": "all"}))
    arm(run, "all-candidates", "candidates")
    # random-same-count: the filter's accepted count per class, drawn at random from the candidates
    rdir = run_dir.parent / (run_dir.name + "-random")
    linked_copy(run_dir, rdir, own=("filtered.parquet",))
    rrun = RunDir(rdir)
    if not rrun.filtered.exists():
        filt = read_manifest(run.filtered)
        rng = np.random.default_rng(1000 + seed)
        acc = np.zeros(len(filt), bool)
        for c, g in filt.groupby("label"):
            n = int(g["accepted"].sum())
            acc[rng.choice(g.index.to_numpy(), n, replace=False)] = True
        rand = filt.assign(accepted=acc, reason=np.where(acc, "", "random_control"))
        write_manifest(rand, rrun.filtered)
    arm(rrun, "random-same-count", "filtered")
    return out


def other_generator(first: Path, rd: Path, generator: str, log: Path) -> None:
    """``generator`` in a linked copy of the first generator's run folder: the same split, baseline backbone,
    plan and recipe; its own candidates, filter and ``rebalanced`` model (stage CLIs, then the recipe's fit)."""
    from tailforge.data import RunDir
    from tailforge.flows.config import load_config, write_config

    linked_copy(first, rd, own=("candidates.parquet", "filtered.parquet", "synthetic", "filter"))
    cfg = load_config(first / "config.yaml", {"run": str(rd), "generate": {"generator": generator}})
    write_config(cfg)
    sh(["tailforge", "generate", "--run", str(rd), "--config", str(rd / "config.yaml")], log)
    sh(["tailforge", "filter", "--run", str(rd), "--config", str(rd / "config.yaml")], log)
    run = RunDir(rd)
    for name, tc in cfg.arm_trainings("rebalanced", cfg.recipe.synthetic):
        fit_once(run, name, tc, log)


def evaluate_all(pairs, splits=("val", "test")) -> dict:
    from tailforge.data import RunDir, read_json
    from tailforge.eval import evaluate
    from tailforge.eval.config import EvalConfig

    res = {}
    for root, name in pairs:
        run = RunDir(root)
        for split in splits:
            p = run.eval_dir / f"{name}-{split}.json"
            m = read_json(p) if p.exists() else evaluate(run, name, split, cfg=EvalConfig(plots=False))
            res.setdefault(name, {})[split] = m
    return res


def rare3(m: dict) -> float:
    counts = np.asarray(m["real_train_counts"] if "real_train_counts" in m else m["train_counts"])
    idx = np.argsort(counts, kind="stable")[:3]
    return float(np.mean([m["per_class"][i] for i in idx]))


ORDER = ["baseline", "balanced_softmax", "ldam_drw", "crt-bs", "real-only"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "flows/recipes/small-images.yaml"))
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--root", default=None, help="data.root (imagefolder)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--imbalance", type=float, nargs="+", default=[100, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--generators", nargs="+", default=["featcov", "featdict"],
                    help="the first one is the winner: the filter controls run on it")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs of the baseline (default: the recipe's)")
    ap.add_argument("--no-extras", action="store_true", help="skip the loss-table and filter-control arms")
    ap.add_argument("--no-loss-arms", action="store_true", help="skip the full-training balanced_softmax and "
                    "ldam_drw arms (two more backbone trainings per seed)")
    ap.add_argument("--set", action="append", default=[], help="more --set overrides for tailforge run")
    ap.add_argument("--work", default="runs/bench-synthetic")
    ap.add_argument("--out", default=str(ROOT / "bench/results/synthetic_table"))
    ap.add_argument("--readme", nargs="*", default=None, metavar="JSON",
                    help="only rewrite docs/findings.md's synthetic-table block from these result JSONs "
                    "(default: bench/results/synthetic_table_if*.json)")
    a = ap.parse_args(argv)
    if a.readme is not None:
        return readme(a.readme or sorted(str(p) for p in (ROOT / "bench/results").glob("synthetic_table_if*.json")))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    results: dict = {}
    t_all = time.time()
    for imb in a.imbalance:
        for seed in a.seeds:
            key = f"if{imb:g}-s{seed}"
            per: dict = {}
            for gi, g in enumerate(a.generators):
                rd = work / f"{a.dataset}-{key}-{g}"
                sets = [f"data.dataset={a.dataset}", f"data.imbalance={imb}", f"data.seed={seed}",
                        f"train.seed={seed}", f"generate.seed={seed}", f"generate.generator={g}"]
                sets += [f"data.root={a.root}"] if a.root else []
                sets += [f"data.image_size={a.image_size}"] if a.image_size else []
                sets += [f"train.epochs={a.epochs}"] if a.epochs else []
                sets += a.set
                t0 = time.time()
                if gi == 0:
                    sh(["tailforge", "run", "--config", a.config, "--run", str(rd)]
                       + [x for s in sets for x in ("--set", s)], log)
                    first = rd
                else:  # the same baseline backbone, only the generator differs
                    other_generator(first, rd, g, log)
                run_s = time.time() - t0
                pairs = [(rd, "baseline"), (rd, "real-only"), (rd, "rebalanced")] if gi == 0 else [(rd, "rebalanced")]
                if gi == 0 and not a.no_extras:
                    pairs += extra_arms(rd, seed, log, loss_arms=not a.no_loss_arms)
                ev = evaluate_all(pairs)
                for name, m in ev.items():
                    label = f"recipe + {g}" if name == "rebalanced" else name
                    if name in ("baseline", "real-only") and gi > 0:
                        continue
                    if name in ("all-candidates", "random-same-count"):
                        label = f"recipe + {g}, {name}"
                    if name == "rebalanced" and gi == 0:
                        label = f"recipe + {g} (filtered)"
                    per[label] = {s: {"balanced_acc": m[s]["balanced_acc"], "top1": m[s]["top1"],
                                      "rare3": rare3(m[s]), "few": m[s].get("few"), "medium": m[s].get("medium"),
                                      "many": m[s].get("many")} for s in m}
                per.setdefault("_time_s", {})[g] = round(run_s, 1)
                filt = json.loads((rd / "eval" / "compare.json").read_text()) if (rd / "eval" / "compare.json").exists() else {}
                per.setdefault("_verdict", {})[g] = filt.get("verdict", {}).get("helped")
                print(f"{key} {g}: " + ", ".join(f"{k} {v['test']['balanced_acc']:.4f}" for k, v in per.items()
                                                if not k.startswith("_")), flush=True)
            results[key] = per
            write(results, a, time.time() - t_all)
    write(results, a, time.time() - t_all)


def write(results: dict, a, wall: float) -> None:
    from tailforge.data.atomic import write_json, write_text

    write_json(a.out + ".json", {"args": vars(a), "results": results, "wall_s": round(wall, 1)})
    write_text(a.out + ".md", "\n".join(render(results, a, wall)) + "\n")


def readme(paths: list[str], readme_path: Path = ROOT / "docs" / "findings.md") -> None:
    """Rewrite the block between ``<!-- synthetic-table -->`` markers of docs/findings.md from the result JSONs."""
    from tailforge.data.atomic import write_text

    lines = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        a = argparse.Namespace(**d["args"])
        lines += [f"From [{Path(p).with_suffix('.md').name}](../bench/results/{Path(p).with_suffix('.md').name}):", ""]
        lines += [("#### " + x[3:]) if x.startswith("## ") else x for x in render(d["results"], a, d["wall_s"])[2:]]
    text = readme_path.read_text()
    start, end = "<!-- synthetic-table -->", "<!-- /synthetic-table -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise SystemExit(f"{readme_path} must hold one {start} ... {end} block")
    i, j = text.index(start) + len(start), text.index(end)
    write_text(readme_path, text[:i] + "\n" + "\n".join(lines).rstrip() + "\n" + text[j:])


def recipe_epochs(config: str) -> str:
    """train.epochs of a recipe file, for the table's header."""
    import yaml

    try:
        return f"{yaml.safe_load(Path(config).read_text())['train']['epochs']} (the recipe's)"
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "as in the recipe"


def render(results: dict, a, wall: float) -> list[str]:
    lines = [f"# Synthetic data vs the best real-only recipe: {a.dataset}-LT", "",
             f"Recipe `{Path(a.config).name}`" + f", baseline epochs {a.epochs or recipe_epochs(a.config)}"
             + f"; generators {', '.join(a.generators)}; seeds {', '.join(map(str, a.seeds))}. "
             "Balanced accuracy in %, mean ± std over seeds; `rare3` = mean accuracy of the three classes with "
             "the fewest real train images. Settings were chosen on VAL; TEST is the reported result. "
             f"Made by `bench/synthetic_table.py` ({wall / 60:.0f} min on a shared 2-core CPU).", ""]
    for imb in a.imbalance:
        keys = [k for k in results if k.startswith(f"if{imb:g}-")]
        if not keys:
            continue
        labels = []
        for k in keys:
            for lab in results[k]:
                if not lab.startswith("_") and lab not in labels:
                    labels.append(lab)
        first_seen = list(labels)
        labels.sort(key=lambda x: (ORDER.index(x) if x in ORDER else len(ORDER), first_seen.index(x)))
        has_few = any(results[k][lab]["test"].get("few") is not None for k in keys for lab in labels
                      if lab in results[k])
        ref = {k: results[k]["real-only"]["test"]["balanced_acc"] for k in keys if "real-only" in results[k]}
        lines += [f"## IF = {imb:g} ({len(keys)} seeds)", "",
                  "| arm | val bal. acc | test bal. acc | Δ test vs real-only | test rare3 |"
                  + (" test few |" if has_few else ""),
                  "|---|---:|---:|---:|---:|" + ("---:|" if has_few else "")]
        for lab in labels:
            vals = {s: [results[k][lab][s][m] for k in keys if lab in results[k]]
                    for s, m in (("val", "balanced_acc"), ("test", "balanced_acc"))}
            d = [results[k][lab]["test"]["balanced_acc"] - ref[k] for k in keys if lab in results[k] and k in ref]
            r3 = [results[k][lab]["test"]["rare3"] for k in keys if lab in results[k]]
            few = [results[k][lab]["test"]["few"] for k in keys if lab in results[k]
                   and results[k][lab]["test"]["few"] is not None]

            def ms(v):
                v = 100 * np.asarray(v, float)
                return "–" if not len(v) else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"

            dd = 100 * np.asarray(d)
            dtxt = "–" if not len(dd) else f"{dd.mean():+.1f}" + (f" ({dd.min():+.1f} … {dd.max():+.1f})" if len(dd) > 1 else "")
            lines.append(f"| {lab} | {ms(vals['val'])} | {ms(vals['test'])} | {dtxt} | {ms(r3)} |"
                         + (f" {ms(few)} |" if has_few else ""))
        lines.append("")
    if "ddpm" not in a.generators:
        lines += ["`ddpm` has no row: its CPU presets are sized for images of at most 16 px and refuse 28 px ones "
                  "(the `full` preset is a GPU job). Measured before that refusal, on this dataset at IF = 100: "
                  "CE on real + every ddpm candidate 65.2 vs balanced softmax on real only 70.7 (test, 3 seeds, "
                  "bench/results/filter_effect_ddpm.md).", ""]
    return lines


if __name__ == "__main__":
    main()
