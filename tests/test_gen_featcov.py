"""featcov: real tail anchors + borrowed head-class covariance, on arrays and as a generator in the crt recipe."""
from __future__ import annotations

import numpy as np
import pytest

from tailforge.data import TailforgeError, read_json, read_manifest
from tailforge.gen import FeatureCovOversampler, GenerateConfig, PlanConfig, generate, plan_run


def blobs(counts=(300, 200, 5), dim=8, seed=0, nonneg=False):
    """Three Gaussian classes; the head's spread is anisotropic, the tail's 5 points are tight."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 8, size=(len(counts), dim))
    scales = np.linspace(0.3, 2.0, dim)
    X = [centres[0] + rng.normal(size=(counts[0], dim)) * scales, centres[1] + rng.normal(size=(counts[1], dim)) * scales,
         centres[2] + rng.normal(size=(counts[2], dim)) * 0.2]
    X = np.concatenate(X).astype(np.float32)
    if nonneg:
        X = np.maximum(X, 0)
    return X, np.repeat(np.arange(len(counts)), counts), centres, scales


def test_tail_borrows_the_head_covariance_and_stays_in_class():
    X, y, centres, scales = blobs()
    Xr, yr = FeatureCovOversampler(random_state=0).fit_resample(X, y)
    assert np.bincount(yr).tolist() == [300, 300, 300]
    assert np.array_equal(Xr[:len(X)], X)  # real first, untouched
    tail = Xr[len(X):][yr[len(X):] == 2]
    # the synthetic tail spreads like the head (per-dimension std ~ the head's scales), not like its 5 points
    spread = tail.std(0)
    assert np.corrcoef(spread, scales)[0, 1] > 0.9 and spread.mean() > 3 * X[y == 2].std(0).mean()
    nearest = np.argmin(((tail[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest == 2).mean() > 0.95
    # scale 0: copies of the real anchors (class-balanced re-sampling)
    copies = FeatureCovOversampler(scale=0.0).fit(X, y).sample(2, range(50))
    assert all(np.isclose(((X[y == 2] - c) ** 2).sum(1), 0, atol=1e-8).any() for c in copies)


def test_seeded_samples_are_batch_independent_and_respect_the_domain():
    X, y, *_ = blobs(nonneg=True)
    o = FeatureCovOversampler(scale=2.0, heads=1, shrink=0.5).fit(X, y)
    a = o.sample(2, [5, 6, 7])
    assert np.array_equal(a[2:], o.sample(2, [7])) and a.dtype == np.float32 and (a >= 0).all()
    with pytest.raises(TailforgeError, match="no real features"):
        o.sample(9, [1])
    with pytest.raises(TailforgeError, match="scale"):
        FeatureCovOversampler(scale=-1)


def test_calibration_pulls_tail_samples_towards_the_nearest_heads_and_widens_them():
    X, y, centres, _ = blobs(counts=(300, 200, 5))
    tail = X[y == 2]
    near = FeatureCovOversampler(scale=0.0, heads=1, pull=0.5, random_state=0).fit(X, y)
    nearest_head = near._near(2)[0]
    assert nearest_head == int(np.argmin(((centres[:2] - centres[2]) ** 2).sum(1)))
    s = near.sample(2, range(200))
    # scale 0, pull 0.5: every sample lies halfway between a real tail anchor and the nearest head's mean
    mid = 0.5 * (tail + X[y == nearest_head].mean(0))
    assert all(np.isclose(((mid - c) ** 2).sum(1), 0, atol=1e-6).any() for c in s)
    wide = FeatureCovOversampler(scale=1.0, heads=1, alpha=4.0).fit(X, y).sample(2, range(400))
    plain = FeatureCovOversampler(scale=1.0, heads=1).fit(X, y).sample(2, range(400))
    assert wide.std(0).mean() > 1.5 * plain.std(0).mean()  # alpha adds isotropic variance
    with pytest.raises(TailforgeError, match="featcov_heads"):
        FeatureCovOversampler(pull=0.5)


def test_featcov_generator_writes_feature_shards_the_crt_recipe_uses(digits_run_copy):
    """End to end: a tiny CNN, featcov features of its backbone, then cRT on real + featcov features."""
    from tailforge import train

    run = digits_run_copy
    train.fit(run, train.TrainConfig(model="tiny", width=8, epochs=2, batch_size=128), "baseline")
    plan_run(run, PlanConfig(classes=["few"], overgen=1.0, budget=30))
    df = generate(run, GenerateConfig(generator="featcov", shard_size=8))
    assert len(df) == read_json(run.plan)["total"] == 30
    assert (df["source"] == "featcov").all() and (df["feature_model"] == "baseline").all()
    cfg = train.TrainConfig(stage="crt", base="baseline", loss="ce", sampler="class_balanced", epochs=2,
                            synthetic="candidates", batch_size=64)
    out = train.fit(run, cfg, "rebalanced")
    meta = read_json(out / "config.json")["meta"]
    assert meta["n_featdict"] == 30 and meta["n_real"] == len(read_manifest(run.real).query("split == 'train'"))


def test_feature_diffusion_learns_class_conditional_features():
    """fdiff on three well-separated classes: samples land near their class, seeded and batch independent."""
    from tailforge.gen import FeatureDiffusion

    X, y, centres, _ = blobs(counts=(300, 200, 40), dim=4)
    m = FeatureDiffusion(steps=600, width=64, batch=128, lr=3e-3, sample_steps=10, seed=0).fit(X, y)
    s = m.sample(2, list(range(60)))
    assert s.shape == (60, 4) and s.dtype == np.float32 and np.isfinite(s).all()
    nearest = np.argmin(((s[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest == 2).mean() > 0.7  # chance: 1/3 (a CPU-sized model; the tail has 40 samples)
    assert np.allclose(m.sample(2, [5, 7])[1], m.sample(2, [7])[0], atol=1e-5)
    with pytest.raises(TailforgeError, match="no real features"):
        m.sample(9, [1])
