"""warp: deformed real tail exemplars, and the recipe's own backbone (recipe.backbone_sampler) that they train."""
from __future__ import annotations

import numpy as np
import pytest

from tailforge.data import load_images, read_manifest
from tailforge.gen import GenerateConfig, PlanConfig, WarpOptions, generate, plan_run, warp_images


def test_warp_is_seeded_small_and_identity_without_options(digits_run):
    import torch

    df = read_manifest(digits_run.real)
    u8 = load_images(df["uri"].iloc[:16], digits_run.root, 1, (8, 8)).reshape(16, 8, 8)
    x = torch.from_numpy(u8).float().div(255)[:, None]
    opts = WarpOptions()
    a, b = warp_images(x, range(16), opts), warp_images(x, range(16), opts)
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(warp_images(x, range(1, 17), opts), a)  # another seed, another map
    assert torch.equal(warp_images(x[3:4], [3], opts), a[3:4])  # a sample's map depends on its seed only
    # no deformation at all: the image comes back (bicubic on the identity grid)
    off = WarpOptions(warp_elastic=0, warp_rotate=0, warp_scale=0, warp_shear=0)
    assert torch.allclose(warp_images(x, range(16), off), x, atol=1e-5)
    # a deformed image stays closer to its parent than to other images of the data
    d_own = (a - x).flatten(1).norm(dim=1)
    d_other = (a - x.roll(1, 0)).flatten(1).norm(dim=1)
    assert (d_own < d_other).float().mean() >= 0.8 and (d_own > 0).all()


def test_warp_generator_writes_deformed_tail_images_with_parents(digits_run_copy):
    run = digits_run_copy
    plan = plan_run(run, PlanConfig(target="fixed", count=60, overgen=1.0))
    cand = generate(run, GenerateConfig(generator="warp", shard_size=16, seed=3))
    assert len(cand) == plan.total > 0 and set(cand["source"]) == {"warp"}
    real = read_manifest(run.real).set_index("sample_id")
    parents = real.loc[cand["parent_id"]]
    assert (parents["label"].to_numpy() == cand["label"].to_numpy()).all()  # a parent of the candidate's class
    assert (parents["split"] == "train").all()  # never a val or test image
    syn = load_images(cand["uri"], run.root, 1, (8, 8)).astype(float).reshape(-1, 8, 8)
    par = load_images(parents["uri"], run.root, 1, (8, 8)).astype(float).reshape(-1, 8, 8)
    assert syn.shape == par.shape and np.abs(syn - par).mean(axis=(1, 2)).min() > 0  # every one changed
    again = generate(run, GenerateConfig(generator="warp", shard_size=16, seed=3))  # finished shards are kept
    assert again["sample_id"].tolist() == cand["sample_id"].tolist()


def test_backbone_sampler_gives_each_arm_its_backbone():
    from tailforge.flows.config import load_config

    cfg = load_config(None, {"generate": {"generator": "warp"},
                             "recipe": {"backbone_sampler": "class_balanced"}})
    assert cfg.crt_base == "backbone"
    bb = cfg.backbone_train()
    assert bb.sampler == "class_balanced" and bb.epoch_samples == "real" and bb.synthetic == "none"
    assert bb.loss == cfg.train.loss and bb.epochs == cfg.train.epochs  # the baseline's settings otherwise
    steps = cfg.arm_trainings(cfg.rebalanced, "filtered")
    assert [n for n, _ in steps] == ["backbone-rebalanced", "rebalanced"]
    assert steps[0][1].synthetic == "filtered" and steps[0][1].epoch_samples == "real"
    assert steps[1][1].stage == "crt" and steps[1][1].base == "backbone-rebalanced"
    assert cfg.real_only_train().base == "backbone" and cfg.real_only_train().synthetic == "none"
    assert cfg.filter_config().model == "backbone"  # the filter embeds with the recipe's backbone
    # feature vectors cannot train a backbone: the rebalanced arm re-trains on the real backbone
    feat = load_config(None, {"recipe": {"backbone_sampler": "class_balanced"},
                              "generate": {"generator": "featcov", "feature_model": "backbone"}})
    assert [n for n, _ in feat.arm_trainings("rebalanced", "filtered")] == ["rebalanced"]
    assert feat.rebalanced_train().base == "backbone"
    # without backbone_sampler nothing changes: the baseline is the backbone
    plain = load_config(None, {"recipe": {"backbone_sampler": None}, "generate": {"feature_model": "baseline"}})
    assert plain.crt_base == "baseline" and plain.rebalanced_train().base == "baseline"


@pytest.mark.parametrize("over, msg", [
    ({"recipe": {"backbone_sampler": "balancd"}}, "backbone_sampler 'balancd'"),
    ({"recipe": {"backbone_sampler": "class_balanced"}, "generate": {"feature_model": "baseline"}},
     "generate.feature_model: backbone"),
    ({"recipe": {"backbone_sampler": "class_balanced", "stage": "full"}, "generate": {"generator": "warp"}},
     "recipe.stage is 'full'"),
])
def test_backbone_sampler_errors_name_the_fix(over, msg):
    from tailforge.data import TailforgeError
    from tailforge.flows.config import load_config

    with pytest.raises(TailforgeError, match=msg):
        load_config(None, over)


def test_real_epoch_samples_give_an_arm_with_synthetic_images_the_real_only_budget(digits_run_copy):
    """epoch_samples=real: the backbone on real + warp images takes the steps of the backbone on real only."""
    from tailforge import train

    run = digits_run_copy
    plan_run(run, PlanConfig(target="balance", overgen=1.0))
    generate(run, GenerateConfig(generator="warp", shard_size=64))
    fast = dict(model="tiny", width=8, epochs=1, batch_size=32, sampler="class_balanced", hflip=False)
    steps = {}
    for name, over in {"real": dict(synthetic="none", epoch_samples="real"),
                       "synth": dict(synthetic="candidates", epoch_samples="real"),
                       "synth-data": dict(synthetic="candidates", epoch_samples="data")}.items():
        train.fit(run, train.TrainConfig(**fast, **over), name)
        meta = train.load_model(run.model_dir(name))[1]
        steps[name] = (meta["steps_per_epoch"], meta["n_synthetic_images"])
    n_real = int((read_manifest(run.real)["split"] == "train").sum())
    assert steps["real"] == (n_real // 32, 0)
    assert steps["synth"][0] == steps["real"][0] and steps["synth"][1] > 0  # same budget, synthetic images in
    assert steps["synth-data"][0] > steps["real"][0]  # counted over the larger set: more steps
