"""Does distilling the recipe's model into a student help the long tail? The KD table of issue 24.

Fashion-MNIST-LT (imbalance factor 100, Debian's Fashion-MNIST), the product's small-images recipe
(flows/recipes/small-images.yaml), per seed s (data.seed = train.seed = s):

- ``real-only`` (the control and the TEACHER): the recipe's real-only arm exactly as the benchmark flow
  builds it (``RunConfig.backbone_train()`` -> ``backbone``: the tiny CNN, 20 epochs, class-balanced
  re-sampling, ``epoch_samples: real``; then ``RunConfig.real_only_train()`` -> ``real-only``: cRT, a
  re-initialised linear head on the frozen backbone, 10 balanced epochs). The flow's ``baseline`` and
  ``rebalanced`` arms are not trained: the table does not need them (they would double the CPU time).
- ``backbone`` (student without a teacher): the recipe's backbone with its own head, reported as the
  no-distillation control of the students (the same network, data, sampler and steps as every student).
- students, each through the product's CLI (``tailforge train --config <run>/config.yaml --teacher real-only
  --sampler class_balanced --epoch-samples real --kd ...``): the same tiny CNN, the backbone's settings
  and optimizer steps (20 epochs x real train samples / batch), plus the distillation term:

  ``kd-hinton``  --kd hinton (T 4, alpha 0.5)
  ``kd-bkd``     --kd bkd (T 2 and alpha 0.5 = the official code's CE : KD = 1 : 1; instance sampling,
                 because BKD is instance-balanced CE + a class-balanced KD term: re-sampling as well
                 would balance twice)
  ``kd-dkd``     --kd dkd (T 4, alpha 1, beta 8, warm-up 20/240 of the epochs: mdistiller's CIFAR setting)
  ``kd-groups``  --kd hinton --kd-group-weights {many: 0.3, medium: 0.7, few: 0.9}: the head leans on its
                 labels, the tail on the (class-balanced) teacher
  ``kd-patch``   --kd hinton --kd-patch 1 (16 random 1x1 locations of the last feature map per image)
  ``lossaug``    no teacher: the recipe with ``recipe.backbone_aug_policy: loss_guided`` (its backbone
                 ``backbone-lg`` with train/lossaug.py's defaults, then the recipe's cRT head on it), the
                 loss-guided augmentation row of the issue's table

Each student trains in its own run folder (``<run>-<arm>``: the data, split, counts and teacher linked from
``<run>``), so arms can train in parallel processes (``--arms`` one each; a last pass with every arm only
evaluates and writes the table).

No setting was tuned (CPU): the defaults are the papers'; the epoch of every model is chosen on VAL by
the trainer; TEST is reported. Every model is evaluated on VAL and TEST.

    OMP_NUM_THREADS=1 nice -n 5 python bench/kd_table.py --seeds 0 1 2
    # the teachers of bench/room_table.py's runs (same recipe, data and seeds), nothing trained twice:
    OMP_NUM_THREADS=1 nice -n 5 python bench/kd_table.py --seeds 0 1 2 --teachers runs/room
    python bench/kd_table.py --seeds 0 1 2 --collect-only    # the table from whatever has finished

Results: bench/results/kd_table.md and .json (rewritten after every seed, so a partial run is reported).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TAILFORGE = str(Path(sys.executable).parent / "tailforge")

ARMS = {
    "kd-hinton": ["--kd", "hinton"],
    "kd-bkd": ["--kd", "bkd", "--kd-temperature", "2", "--sampler", "instance"],
    "kd-dkd": ["--kd", "dkd"],
    "kd-groups": ["--kd", "hinton", "--kd-group-weights", "{many: 0.3, medium: 0.7, few: 0.9}"],
    "kd-patch": ["--kd", "hinton", "--kd-patch", "1"],
}


def log_line(log: Path, text: str) -> None:
    with open(log, "a") as f:
        f.write(text + "\n")
    print(text, flush=True)


def sh(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")


def teacher(rd: Path, seed: int, config: str, log: Path, teachers: Path | None = None):
    """The run folder, its measure, and the recipe's ``backbone`` and ``real-only`` (the benchmark flow's).

    With ``teachers`` (e.g. runs/room, bench/room_table.py's run folders): where ``<teachers>/fmnist100-s<seed>``
    has finished its ``backbone`` and ``real-only`` (the same recipe, data and seeds), ``rd`` is a linked copy of
    it and nothing is trained again; that folder is only read."""
    from tailforge.data import RunDir, TailforgeError
    from tailforge.flows.config import check_run_folder, load_config, write_config
    from tailforge.train import fit

    cfg = load_config(config, {"run": str(rd), "data": {"dataset": "fashion-mnist", "imbalance": 100, "seed": seed},
                               "train": {"seed": seed}, "generate": {"seed": seed}})
    src = teachers / f"fmnist100-s{seed}" if teachers else None
    if src is not None and all((src / "models" / n / "model.safetensors").exists() for n in ("backbone", "real-only")):
        try:  # the same settings as its outputs were made with, or the teacher is not the recipe's
            check_run_folder(cfg.model_copy(update={"run": str(src)}))
        except TailforgeError as e:
            raise SystemExit(f"--teachers {src}: {e}") from None
        if not (rd / "config.yaml").exists():
            linked_copy(src, rd)
            log_line(log, f"teacher of seed {seed}: {src} (backbone, real-only) linked into {rd}")
        return load_config(rd / "config.yaml", {"run": str(rd)})
    check_run_folder(cfg)
    write_config(cfg)
    run = RunDir(rd)
    if not run.counts.exists():
        sh([TAILFORGE, "measure", "--run", str(rd), "--config", str(rd / "config.yaml")], log)
    for name, tc in ((cfg.crt_base, cfg.backbone_train()), (cfg.real_only, cfg.real_only_train())):
        if not (run.model_dir(name) / "model.safetensors").exists():
            t0 = time.time()
            fit(run, tc, name)
            log_line(log, f"trained {name} in {rd} ({time.time() - t0:.0f} s)")
    return cfg


def arm_folder(rd: Path, name: str) -> Path:
    """The run folder of student ``name``: ``rd`` itself when trained there, else its own linked copy."""
    return rd if (rd / "models" / name / "model.safetensors").exists() else rd.parent / f"{rd.name}-{name}"


def linked_copy(rd: Path, dst: Path) -> None:
    """A run folder sharing ``rd``'s data, split, counts and teacher through symlinks, with its own models/ and
    eval/: arms train in parallel (a run folder takes one `tailforge train` at a time)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in rd.iterdir():
        if p.name.startswith(".") or p.name in ("models", "eval", "config.yaml") or (dst / p.name).exists():
            continue
        (dst / p.name).symlink_to(p.resolve())
    if not (dst / "config.yaml").exists():
        shutil.copy(rd / "config.yaml", dst / "config.yaml")
    (dst / "models").mkdir(exist_ok=True)
    for name in ("backbone", "real-only"):
        if not (dst / "models" / name).exists():
            (dst / "models" / name).symlink_to((rd / "models" / name).resolve())


def student(rd: Path, name: str, extra: list[str], log: Path) -> None:
    if (arm_folder(rd, name) / "models" / name / "model.safetensors").exists():
        return
    own = rd.parent / f"{rd.name}-{name}"
    linked_copy(rd, own)
    rd = own
    t0 = time.time()
    sh([TAILFORGE, "train", "--run", str(rd), "--config", str(rd / "config.yaml"), "--name", name,
        "--teacher", "real-only", "--sampler", "class_balanced", "--epoch-samples", "real", *extra], log)
    log_line(log, f"trained {name} in {rd} ({time.time() - t0:.0f} s)")


def lossaug(rd: Path, cfg, log: Path) -> None:
    """The recipe with loss-guided augmentation: ``recipe.backbone_aug_policy: loss_guided`` (its backbone
    ``backbone-lg``, the backbone's settings and steps plus train/lossaug.py with its defaults), then the
    recipe's cRT head on it (``lossaug``), as the flow builds them from that config."""
    from tailforge.data import RunDir
    from tailforge.train import fit

    if (arm_folder(rd, "lossaug") / "models" / "lossaug" / "model.safetensors").exists():
        return
    own = rd.parent / f"{rd.name}-lossaug"
    linked_copy(rd, own)
    run = RunDir(own)
    lg = cfg.model_copy(update={"recipe": cfg.recipe.model_copy(update={"backbone_aug_policy": "loss_guided"})})
    bb = lg.backbone_train()
    assert bb.aug_policy == "loss_guided"
    t0 = time.time()
    if not (run.model_dir("backbone-lg") / "model.safetensors").exists():
        fit(run, bb, "backbone-lg")
    fit(run, lg.real_only_train().model_copy(update={"base": "backbone-lg"}), "lossaug")
    log_line(log, f"trained backbone-lg + lossaug in {own} ({time.time() - t0:.0f} s)")


def evaluate_all(rd: Path, names: list[str]) -> dict:
    from tailforge.data import RunDir, read_json
    from tailforge.eval import evaluate
    from tailforge.eval.config import EvalConfig

    out = {}
    for name in names:
        run = RunDir(arm_folder(rd, name))
        if not (run.model_dir(name) / "model.safetensors").exists():
            continue
        for split in ("val", "test"):
            p = run.eval_dir / f"{name}-{split}.json"
            m = read_json(p) if p.exists() else evaluate(run, name, split, cfg=EvalConfig(plots=False))
            steps = read_json(run.model_dir(name) / "config.json")["meta"].get("steps_per_epoch")
            epochs = read_json(run.model_dir(name) / "config.json")["train"]["epochs"]
            out.setdefault(name, {})[split] = {k: m.get(k) for k in ("balanced_acc", "top1", "many", "medium", "few")}
            out[name]["steps"] = steps * epochs if steps else None
            log = [json.loads(x) for x in (run.model_dir(name) / "log.jsonl").read_text().splitlines() if x.strip()]
            out[name]["train_s"] = round(sum(r.get("time_s", 0) for r in log), 1)
    return out


ORDER = ["real-only", "backbone", *ARMS, "lossaug"]


def table(results: dict) -> str:
    seeds = sorted(results, key=int)
    lines = ["# Distillation for the long tail (issue 24): Fashion-MNIST-LT, IF 100, the small-images recipe", "",
             "Made by `bench/kd_table.py` (its docstring has the arms and settings). TEST split, mean +- std over "
             f"the seeds that ran: {', '.join(seeds)} (data.seed = train.seed = s); VAL chose every model's epoch; "
             "nothing else was tuned. bal = balanced accuracy, many/medium = the groups' mean class accuracy "
             "(counts.json groups: many > 100 train images, medium 20-100; IF 100 leaves no few class). "
             "d(real-only) = the arm minus real-only per seed, mean and [min, max].", "",
             "| arm | seeds | test bal | test top-1 | test many | test medium | d(real-only) bal | val bal | "
             "optimizer steps | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    verdict = []
    for arm in ORDER:
        have = [s for s in seeds if arm in results[s]]
        if not have:
            continue

        def ms(split, key):
            v = [results[s][arm][split][key] for s in have if results[s][arm][split].get(key) is not None]
            return f"{100 * np.mean(v):.2f} +- {100 * np.std(v):.2f}" if v else "-"

        d = [results[s][arm]["test"]["balanced_acc"] - results[s]["real-only"]["test"]["balanced_acc"]
             for s in have if "real-only" in results[s]]
        dtxt = "-" if arm == "real-only" else (f"{100 * np.mean(d):+.2f} [{100 * min(d):+.2f}, {100 * max(d):+.2f}]"
                                               if d else "-")
        steps = sorted({results[s][arm].get("steps") for s in have})
        secs = [results[s][arm].get("train_s") or 0 for s in have]
        lines.append(f"| {arm} | {len(have)} | {ms('test', 'balanced_acc')} | {ms('test', 'top1')} | "
                     f"{ms('test', 'many')} | {ms('test', 'medium')} | {dtxt} | {ms('val', 'balanced_acc')} | "
                     f"{', '.join(str(x) for x in steps)} | {np.mean(secs):.0f} |")
        if arm != "real-only" and d:
            verdict.append((arm, np.mean(d), min(d), max(d), len(d)))
    lines += ["", "real-only's and lossaug's steps: their head's cRT steps; their frozen backbones (`backbone`, and "
              "`backbone-lg`: the same with loss-guided augmentation) took the `backbone` row's steps before, so "
              "every network saw the same full-model steps as every student.", ""]
    if verdict:
        diffs = "; ".join(f"{a} {m * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}] ({n} seed{'s' * (n > 1)})"
                          for a, m, lo, hi, n in verdict)
        beat = [a for a, m, lo, hi, n in verdict if n >= 2 and lo > 0]
        if beat:
            lines.append(f"Above real-only on every seed (>= 2 seeds): {', '.join(beat)}. ")
        elif max(v[4] for v in verdict) >= 2:
            lines.append("**No student is above the real-only recipe (its own teacher) on every seed.** ")
        else:
            lines.append("**One seed only: no verdict can be drawn (no spread).** ")
        lines[-1] += f"Test balanced accuracy minus real-only's, mean [min, max]: {diffs}."
    lines += ["", "train s: the training loops' wall time (validation excluded), 1 torch thread on 2 cores shared "
              "with 3 to 30 other jobs: a cost indication, not a benchmark.", ""]
    return "\n".join(lines)


def curves(rd: Path) -> dict:
    """Per model of seed folder ``rd``: the VAL balanced accuracy of every finished epoch (finished models'
    log.jsonl, or the resumable state's log of a training still running)."""
    out = {}
    for name in ORDER:
        logs = [f / "models" / sub / "log.jsonl" for f in (rd, rd.parent / f"{rd.name}-{name}")
                for sub in (name, f".work-{name}")]
        for log in logs:
            if log.exists():
                out[name] = [json.loads(x)["val_balanced_acc"] for x in log.read_text().splitlines() if x.strip()]
                break
    return out


def partial_table(work: Path, seeds: list[int]) -> str:
    lines = ["# KD table, trainings still running: VAL balanced accuracy by epoch", "",
             "Made by `bench/kd_table.py --partial` from the models' logs while the students were still training "
             "(the machine's 2 cores were shared by ~35 runnable processes). VAL split only, no TEST, no verdict. "
             "Every student and `backbone` follow the same 20-epoch cosine schedule with the same steps per epoch, "
             "so the same epoch is the same point of training; `real-only` is the teacher (its cRT head's epochs).",
             ""]
    for seed in seeds:
        cur = curves(work / f"fmnist-if100-s{seed}")
        if not cur:
            continue
        n = max(len(v) for v in cur.values())
        lines += [f"## seed {seed}", "", "| model | epochs done | " + " | ".join(f"ep {e + 1}" for e in range(n)) + " |",
                  "|---|---|" + "---|" * n]
        for name, v in cur.items():
            lines.append(f"| {name} | {len(v)} | " + " | ".join(f"{100 * x:.2f}" for x in v) + " |" * (n - len(v) + 1))
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "flows/recipes/small-images.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--work", default="runs/bench-kd")
    ap.add_argument("--teachers", default=None, help="reuse the recipe's backbone and real-only of these run folders "
                    "(bench/room_table.py's runs/room: <dir>/fmnist100-s<seed>) instead of training them again")
    ap.add_argument("--no-lossaug", action="store_true", help="leave out the loss-guided augmentation arm")
    ap.add_argument("--collect-only", action="store_true", help="train nothing: evaluate the finished models of "
                    "every arm and write the table (arms still training elsewhere are left out)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/kd_table"))
    ap.add_argument("--partial", action="store_true", help="only write <out>_partial.md: VAL curves of the "
                    "trainings so far (from their logs), while they still run")
    a = ap.parse_args(argv)
    if a.partial:
        from tailforge.data.atomic import write_text

        write_text(Path(a.out + "_partial.md"), partial_table(Path(a.work), a.seeds))
        return 0
    import torch

    from tailforge.data.atomic import write_text

    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    out = Path(a.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    results = old.get("results", {})
    for seed in a.seeds:
        rd = work / f"fmnist-if100-s{seed}"
        if not a.collect_only:
            cfg = teacher(rd, seed, a.config, log, Path(a.teachers) if a.teachers else None)
            for arm in a.arms:
                student(rd, arm, ARMS[arm], log)
            if not a.no_lossaug:
                lossaug(rd, cfg, log)
        elif not (rd / "models" / "real-only").exists():
            continue
        results[str(seed)] = {**results.get(str(seed), {}), **evaluate_all(rd, ORDER)}
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out.with_suffix(".json"), json.dumps({"results": results, "arms": ARMS,
                                                        "dataset": "fashion-mnist IF 100", "split_reported": "test",
                                                        "selection": "val"}, indent=1) + "\n")
        write_text(out.with_suffix(".md"), table(results))
        log_line(log, f"seed {seed} done: " + ", ".join(
            f"{k} {v['test']['balanced_acc']:.4f}" for k, v in results[str(seed)].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
