"""The published-schedule recipes (flows/recipes/cifar-lt.yaml, mini-imagenet-lt.yaml) on tiny generated files.

Fake CIFAR-10 in torchvision's python-pickle format (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
``batches.meta``) and a fake mini-ImageNet in its folder layout (``root/{train,val,test}/<class>/*.jpg``);
each recipe is loaded as ``tailforge run --config ... --set ...`` loads it, shrunk by overrides (1 epoch,
narrow nets, few images), and measure + the recipe's models train through the real stage functions.
The whole ``tailforge run`` of the CIFAR recipe (Prefect, tiny ddpm, filter, three arms) is marked slow.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from tailforge.data import build_manifest, measure_run, read_json, read_manifest
from tailforge.flows.config import load_config, parse_set
from tailforge.train.ddp import launch_fit

RECIPES = Path(__file__).resolve().parents[1] / "flows" / "recipes"
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar10(root: Path, per_class_batch: int = 6, per_class_test: int = 4, seed: int = 0) -> Path:
    """ROOT/cifar-10-batches-py in torchvision's format: 5 train batches, a test batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(per_class: int, name: str) -> None:
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        base = (labels[:, None] * 23 % 256).astype(np.int16)  # a class-dependent grey level + noise
        data = np.clip(base + rng.integers(-40, 40, (len(labels), 3072)), 0, 255).astype(np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({"batch_label": name, "labels": labels.tolist(), "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}, fh)

    for i in range(1, 6):
        batch(per_class_batch, f"data_batch_{i}")
    batch(per_class_test, "test_batch")
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": 10 * per_class_batch, "num_vis": 3072}, fh)
    return root


def write_fake_mini_imagenet(root: Path, classes: int = 5, counts=(20, 4, 4), size: int = 24, seed: int = 0) -> Path:
    """ROOT/{train,val,test}/<wnid>/*.jpg with the same classes in every split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), counts):
        for c in range(classes):
            d = root / split / f"n0{c:07d}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(c * 50 + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"n0{c:07d}_{i:05d}.jpg", quality=90)
    return root


def recipe(name: str, sets: list[str]):
    """The recipe as `tailforge run --config flows/recipes/NAME --set ...` resolves it."""
    return load_config(RECIPES / name, parse_set(sets))


def test_cifar_recipe_holds_the_published_schedule(tmp_path):
    cfg = recipe("cifar-lt.yaml", [f"data.root={tmp_path}"])
    t, r = cfg.train, cfg.rebalanced_train()
    assert (cfg.data.dataset, cfg.data.profile, cfg.data.imbalance) == ("cifar10", "exp", 100)
    assert (t.model, t.epochs, t.batch_size, t.optimizer, t.lr, t.weight_decay, t.warmup) == \
        ("resnet32", 200, 128, "sgd", 0.1, 2e-4, 5)
    assert (t.augment, t.hflip, t.clip_grad, t.loss) == ("basic", True, None, "ce")
    assert (r.stage, r.loss, r.sampler, r.epochs, r.drw_epoch, r.scale, r.ldam_max_margin, r.synthetic) == \
        ("full", "ldam_drw", "instance", 200, 160, 30, 0.5, "filtered")
    assert cfg.real_only_train().synthetic == "none" and cfg.real_only_train().loss == "ldam_drw"
    assert cfg.generate.generator == "ddpm" and cfg.generate.ddpm.ddpm_preset == "full"
    m = recipe("mini-imagenet-lt.yaml", [f"data.root={tmp_path}"])
    assert (m.data.dataset, m.train.model, m.train.epochs, m.train.weight_decay) == \
        ("mini-imagenet", "resnet10", 90, 5e-4)
    assert (m.recipe.stage, m.recipe.sampler, m.recipe.epochs, m.generate.generator) == \
        ("crt", "class_balanced", 10, "featcov")
    for f in RECIPES.glob("*.yaml"):  # every recipe names where its settings come from
        assert "Where the settings come from" in f.read_text(), f.name


CIFAR_SMALL = ["train.epochs=1", "train.width=4", "train.batch_size=32", "train.warmup=0", "train.drw_epoch=1",
               "train.device=cpu", "train.eval_batch_size=256", "recipe.epochs=1"]


def test_cifar_recipe_measures_and_trains_fake_cifar10(tmp_path, one_torch_thread):
    root = write_fake_cifar10(tmp_path / "data")
    cfg = recipe("cifar-lt.yaml", [f"data.root={root}", f"run={tmp_path / 'run'}", "data.imbalance=10",
                                   *CIFAR_SMALL])
    run = cfg.run_dir
    build_manifest(cfg.data, run)
    stats = measure_run(run, cfg.measure)
    real = read_manifest(run.real)
    counts = np.bincount(real[real["split"] == "train"]["label"], minlength=10)
    assert counts[0] == 30 and counts[-1] == 3 and stats.imbalance_factor == pytest.approx(10)
    assert set(real["split"]) == {"train", "val", "test"} and read_json(run.dataset)["image_size"] == [32, 32]
    base = launch_fit(run, cfg.baseline_train(), cfg.baseline)  # ResNet-32 (width 4), plain CE, 1 epoch
    meta = read_json(base / "config.json")["meta"]
    assert meta["arch"] == "resnet32" and meta["head"] == "linear" and meta["n_real"] == counts.sum()
    ro = launch_fit(run, cfg.real_only_train(), cfg.real_only)  # the recipe: LDAM-DRW, full stage
    meta = read_json(ro / "config.json")["meta"]
    assert meta["head"] == "cosine" and meta["scale"] == 30 and meta["arch"] == "resnet32"
    log = [json.loads(x) for x in (ro / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"])


def test_mini_imagenet_recipe_measures_and_trains_fake_folders(tmp_path, one_torch_thread):
    root = write_fake_mini_imagenet(tmp_path / "mini")
    cfg = recipe("mini-imagenet-lt.yaml", [f"data.root={root}", f"run={tmp_path / 'run'}", "data.imbalance=5",
                                           "data.image_size=16", "train.epochs=1", "train.batch_size=16",
                                           "train.warmup=0", "train.device=cpu", "recipe.epochs=1"])
    run = cfg.run_dir
    build_manifest(cfg.data, run)
    measure_run(run, cfg.measure)
    real = read_manifest(run.real)
    counts = np.bincount(real[real["split"] == "train"]["label"])
    assert counts[0] == 20 and counts[-1] == 4 and (np.diff(counts) <= 0).all()
    assert (real[real["split"] == "val"].groupby("label").size() == 4).all()  # val/ and test/ as given
    base = launch_fit(run, cfg.baseline_train(), cfg.baseline)  # ResNet-10, 1 epoch
    assert read_json(base / "config.json")["meta"]["arch"] == "resnet10"
    crt = launch_fit(run, cfg.real_only_train(), cfg.real_only)  # the recipe: cRT on the frozen backbone
    conf = read_json(crt / "config.json")
    assert conf["train"]["stage"] == "crt" and conf["train"]["base"] == cfg.baseline
    assert conf["train"]["sampler"] == "class_balanced"


@pytest.mark.slow
def test_cifar_recipe_full_tailforge_run(tmp_path, capsys):
    from tailforge.flows.cli import main

    root = write_fake_cifar10(tmp_path / "data")
    args = ["run", "--config", str(RECIPES / "cifar-lt.yaml"), "--run", str(tmp_path / "run"),
            "--set", f"data.root={root}", "--set", "data.imbalance=10", "--set", "plan.budget=20",
            "--set", "generate.device=cpu", "--set", "generate.batch_size=16",
            "--set", "generate.ddpm.ddpm_preset=tiny",
            "--set", "generate.ddpm.ddpm_train_steps=5", "--set", "generate.ddpm.ddpm_sample_steps=2",
            "--set", "evaluate.plots=false", "--set", "evaluate.device=cpu"]
    for s in CIFAR_SMALL:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "benchmark finished" in out and "rebalanced" in out
    run = tmp_path / "run"
    for name in ("baseline", "real-only", "rebalanced"):
        assert (run / "eval" / f"{name}-test.json").exists()
    assert read_manifest(run / "candidates.parquet")["source"].eq("ddpm").all()
