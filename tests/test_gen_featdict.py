"""Feature-dictionary oversampling: the algorithm on plain arrays, and the generator's feature shards."""
from __future__ import annotations

import numpy as np
import pytest

from tailforge.data import TailforgeError, load_images, read_json, read_manifest
from tailforge.gen import FeatureDictOversampler, GenerateConfig, PlanConfig, generate, plan_run


def blobs(counts=(200, 50, 5), dim=16, seed=0, nonneg=False):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, size=(len(counts), dim))
    X = np.concatenate([c + rng.normal(0, 1, size=(n, dim)) for c, n in zip(centres, counts)]).astype(np.float32)
    y = np.repeat(np.arange(len(counts)), counts)
    if nonneg:
        X = np.maximum(X, 0)
    return X, y, centres


def test_fit_resample_balances_and_stays_in_class():
    X, y, centres = blobs()
    Xr, yr = FeatureDictOversampler(random_state=0).fit_resample(X, y)
    assert np.bincount(yr).tolist() == [200, 200, 200]
    assert np.array_equal(Xr[:len(X)], X)  # real first, untouched
    syn, ys = Xr[len(X):], yr[len(X):]
    nearest = np.argmin(((syn[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest == ys).mean() > 0.98
    d = np.sqrt(((syn[:, None] - X[None]) ** 2).sum(-1)).min(1)
    assert (d > 1e-4).all()  # new points, not copies
    tail = syn[ys == 2]
    assert len(np.unique(tail.round(4), axis=0)) == len(tail)  # 195 distinct samples from 5 real ones


def test_variation_transfer_widens_the_tail_beyond_its_hull():
    X, y, _ = blobs()
    xt = X[y == 2]
    inside = FeatureDictOversampler(variation=0.0).fit(X, y).sample(2, range(300))
    assert (inside >= xt.min(0) - 1e-5).all() and (inside <= xt.max(0) + 1e-5).all()  # interpolation only
    wide = FeatureDictOversampler(variation=1.0).fit(X, y).sample(2, range(300))
    assert wide.std(0).mean() > inside.std(0).mean()


def test_seeded_samples_do_not_depend_on_batching_and_respect_the_domain():
    X, y, _ = blobs(nonneg=True)
    o = FeatureDictOversampler(variation=2.0).fit(X, y)
    a = o.sample(1, [11, 12, 13])
    assert np.array_equal(a[2:], o.sample(1, [13])) and a.dtype == np.float32
    assert (a >= 0).all() and (o.sample(2, range(200)) >= 0).all()
    Xr, yr = FeatureDictOversampler(sampling_strategy={2: 20}).fit_resample(X, y)
    assert np.bincount(yr).tolist() == [200, 50, 20]
    with pytest.raises(TailforgeError, match="unknown class"):
        FeatureDictOversampler(sampling_strategy={7: 20}).fit_resample(X, y)


def test_generator_writes_float32_feature_shards(digits_run_copy, monkeypatch):
    """The shard pipeline with pixel features standing in for a trained backbone (train is tested elsewhere)."""
    import tailforge.gen.featdict as fd

    run = digits_run_copy
    info = run.dataset_info()

    def pixel_features(run_, model_name, progress=None):
        df = read_manifest(run_.real)
        df = df[df["split"] == "train"]
        imgs = load_images(df["uri"], run_.root, info["channels"], tuple(info["image_size"]))
        return imgs.reshape(len(imgs), -1).astype(np.float32) / 255, df["label"].to_numpy()

    monkeypatch.setattr(fd, "train_features", pixel_features)
    plan_run(run, PlanConfig(classes=["few"], overgen=1.0, budget=40))
    plan = read_json(run.plan)
    cfg = GenerateConfig(generator="featdict", shard_size=16)
    df = generate(run, cfg)
    assert len(df) == plan["total"] == 40
    assert df.groupby("label").size().to_dict() == {c["label"]: c["generate"] for c in plan["classes"] if c["generate"]}
    assert (df["source"] == "featdict").all() and (df["feature_model"] == "baseline").all()
    path, row = run.resolve(df["uri"].iloc[-1])
    arr = np.load(path)
    assert arr.dtype == np.float32 and arr.shape[1] == 64 and row < len(arr)
    # seeded: the same sample from the oversampler directly
    X, y = pixel_features(run, "baseline")
    o = FeatureDictOversampler().fit(X, y)
    last = df.iloc[-1]
    assert np.allclose(arr[row], o.sample(int(last["label"]), [int(last["seed"])])[0])


def test_featdict_without_a_trained_classifier_fails_clearly(digits_run_copy):
    plan_run(digits_run_copy, PlanConfig(budget=10))
    with pytest.raises(TailforgeError, match="tailforge train"):
        generate(digits_run_copy, GenerateConfig(generator="featdict"))
    assert not digits_run_copy.candidates.exists()


def test_generator_in_a_trained_classifiers_feature_space(digits_run_copy):
    """End to end with the real train package: a tiny CNN trained 2 epochs, features from its backbone."""
    from tailforge import train

    run = digits_run_copy
    train.fit(run, train.TrainConfig(model="tiny", width=8, epochs=2, batch_size=128), "baseline")
    plan_run(run, PlanConfig(classes=["few"], overgen=1.0, budget=24))
    df = generate(run, GenerateConfig(generator="featdict", shard_size=8))
    assert len(df) == 24 and (df["feature_model"] == "baseline").all()
    model, meta = train.load_model(run.model_dir("baseline"))
    path, row = run.resolve(df["uri"].iloc[0])
    feats = np.load(path)
    assert feats.shape[1] == meta["feature_dim"] and np.isfinite(feats).all()
    # the classifier's own head mostly puts the synthetic features in their planned class
    import torch

    with torch.no_grad():
        rows = np.concatenate([np.load(run.resolve(u)[0])[[run.resolve(u)[1]]] for u in df["uri"]])
        pred = model.forward_head(torch.from_numpy(rows)).argmax(1).numpy()
    real_df = read_manifest(run.real)
    real_df = real_df[(real_df["split"] == "train") & real_df["label"].isin(df["label"].unique())]
    info = run.dataset_info()
    real_pred = train.predict_proba(model, meta, load_images(real_df["uri"], run.root, info["channels"],
                                                             tuple(info["image_size"]))).argmax(1)
    real_acc = (real_pred == real_df["label"].to_numpy()).mean()
    assert (pred == df["label"].to_numpy()).mean() >= min(0.5, real_acc)  # as separable as the real tail
