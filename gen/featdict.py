"""Feature-dictionary oversampling (after Park, Song & Kang, "Imbalanced Classification via Feature
Dictionary-Based Minority Oversampling", IEEE Access 10, 2022).

The paper builds feature dictionaries with a pretrained feature extractor and synthesises minority
features from them, then fine-tunes the classifier on real + synthetic features. The construction
implemented here (our reading, exact and deterministic) is:

1. **Dictionaries.** For every class c with features X_c (n_c x D): the class dictionary A_c is the
   ``n_atoms`` k-means centroids of X_c (X_c itself when n_c <= n_atoms); its mean is mu_c and its
   spread s_c = sqrt(mean ||x - mu_c||^2) (classes with fewer than 3 samples use the median spread of
   the other classes). The shared **variation dictionary** V holds the normalised deviations
   (a - mu_h) / s_h of the atoms a of every head class h (classes with n_h >= the median count):
   within-class variation (pose, style, background) that the head has seen and the tail has not.
2. **Synthesis** of one sample of minority class t from its own seed (numpy PCG64):
   anchor x ~ uniform over X_t; atom a ~ uniform over the ``k`` atoms of A_t nearest to x;
   lam ~ U(0, 1); v ~ uniform over V; beta ~ U(0, ``variation``);
   ``x_new = x + lam (a - x) + beta s_t v``,
   i.e. an interpolation inside the class dictionary (as SMOTE, but towards denoised atoms) plus a
   head-class variation scaled to the tail class's own spread. If every real feature is >= 0
   (a ReLU / pooled backbone), x_new is clipped at 0 to stay in the feature domain.

``FeatureDictOversampler`` is the algorithm on plain arrays (imbalanced-learn style,
``fit_resample``); ``FeatDictGenerator`` runs it in a trained classifier's feature space
(``tailforge.train.load_model`` + ``tailforge.train.embed``) and writes float32 feature shards.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tailforge.data import TailforgeError, read_manifest
from tailforge.data.longtail import class_indices

from .base import Generator
from .planner import Plan
from .shards import Progress, Shard, base_row, sample_seed


class FeatureOversampler:
    """The imbalanced-learn face shared by the feature oversamplers: a subclass's ``fit(X, y)`` sets
    ``classes_`` and ``counts_`` and its ``sample(label, seeds)`` draws; this adds ``sampling_targets``
    and ``fit_resample``."""

    sampling_strategy = "auto"
    random_state = None

    def _fit_classes(self, X, y, dtype) -> tuple[np.ndarray, np.ndarray]:
        """Check ``X`` (N, D) and ``y`` (N,); set ``classes_``, ``counts_``, the float32 features per class ``X_``
        and ``nonneg_`` (post-ReLU features stay non-negative); returns ``X`` as ``dtype`` and ``y``."""
        X = np.asarray(X, dtype=dtype)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise TailforgeError(f"features must be an N x D array with one label each, got {X.shape} and {y.shape}",
                                 "pass X (N, D) and y (N,)")
        self.classes_, self.counts_ = np.unique(y, return_counts=True)
        rows = class_indices(y)  # one sort, not one scan per class
        self.X_ = {c: X[rows[int(c)]].astype(np.float32, copy=False) for c in self.classes_}
        self.nonneg_ = bool(X.min() >= 0)
        return X, y

    def sampling_targets(self) -> dict:
        """label -> number of samples to ADD."""
        return sampling_targets(self.sampling_strategy, dict(zip(self.classes_.tolist(), self.counts_.tolist())))

    def fit_resample(self, X, y):
        """Real + synthetic features and labels (synthetic appended, class by class)."""
        self.fit(X, y)
        rng = np.random.default_rng(self.random_state)
        xs, ys = [np.asarray(X, dtype=np.float32)], [np.asarray(y)]
        for c, n in sorted(self.sampling_targets().items()):
            if n > 0:
                xs.append(self.sample(c, rng.integers(0, 2**63 - 1, size=n)))
                ys.append(np.full(n, c, dtype=np.asarray(y).dtype))
        return np.concatenate(xs), np.concatenate(ys)


class FeatureDictOversampler(FeatureOversampler):
    """Oversample minority classes in feature space from per-class and head-variation dictionaries.

    ``sampling_strategy``: ``"auto"``/``"not majority"`` (every class up to the largest),
    ``"minority"`` (only the smallest class), or a dict ``{label: count after resampling}``.
    """

    def __init__(self, sampling_strategy="auto", n_atoms: int = 32, k_neighbors: int = 5, variation: float = 0.5,
                 random_state: int | None = None):
        self.sampling_strategy = sampling_strategy
        self.n_atoms = n_atoms
        self.k_neighbors = k_neighbors
        self.variation = variation
        self.random_state = random_state

    # ---- fit ------------------------------------------------------------------------------
    def fit(self, X, y) -> "FeatureDictOversampler":
        from sklearn.cluster import KMeans

        X, y = self._fit_classes(X, y, np.float32)
        self.atoms_, self.mean_, spread = {}, {}, {}
        for c, xc in self.X_.items():
            self.mean_[c] = xc.mean(0)
            if len(xc) > self.n_atoms:
                km = KMeans(self.n_atoms, n_init=1, random_state=0).fit(xc)
                self.atoms_[c] = km.cluster_centers_.astype(np.float32)
            else:
                self.atoms_[c] = xc
            if len(xc) >= 3:
                spread[c] = float(np.sqrt(((xc - self.mean_[c]) ** 2).sum(1).mean()))
        fallback = float(np.median(list(spread.values()))) if spread else 1.0
        self.spread_ = {c: spread.get(c, fallback) for c in self.classes_}
        head = [c for c, n in zip(self.classes_, self.counts_) if n >= np.median(self.counts_) and n >= 3]
        self.variations_ = np.concatenate(
            [(self.atoms_[c] - self.mean_[c]) / max(self.spread_[c], 1e-12) for c in head]).astype(np.float32)
        return self

    # ---- sample ---------------------------------------------------------------------------
    def sample(self, label, seeds) -> np.ndarray:
        """float32 (len(seeds), D): one synthetic feature of class ``label`` per seed (independent of batching)."""
        if label not in self.X_:
            raise TailforgeError(f"class {label} has no real features to oversample from",
                                 "plan only classes with at least one train image")
        xc, atoms = self.X_[label], self.atoms_[label]
        out = np.empty((len(seeds), xc.shape[1]), dtype=np.float32)
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng(int(seed))
            x = xc[rng.integers(len(xc))]
            near = np.argsort(((atoms - x) ** 2).sum(1), kind="stable")[:self.k_neighbors]
            a = atoms[near[rng.integers(len(near))]]
            lam, v = rng.random(), self.variations_[rng.integers(len(self.variations_))]
            beta = rng.uniform(0, self.variation)
            out[i] = x + lam * (a - x) + beta * self.spread_[label] * v
        return np.maximum(out, 0) if self.nonneg_ else out



def sampling_targets(strategy, counts: dict) -> dict:
    """imbalanced-learn's ``sampling_strategy`` -> {label: number of samples to ADD}."""
    s = strategy
    if isinstance(s, dict):
        unknown = set(s) - set(counts)
        if unknown:
            raise TailforgeError(f"sampling_strategy names unknown class(es) {sorted(unknown)}",
                                 f"use labels among {sorted(counts)}")
        return {c: max(int(n) - counts[c], 0) for c, n in s.items()}
    top = max(counts.values())
    if s in ("auto", "not majority"):
        return {c: top - n for c, n in counts.items() if n < top}
    if s == "minority":
        c = min(counts, key=counts.get)
        return {c: top - counts[c]}
    raise TailforgeError(f"unknown sampling_strategy {s!r}", "use 'auto', 'not majority', 'minority' or a dict")


def train_features(run, model_name: str, progress: Progress | None = None):
    """Backbone features (float32 N x D) and labels of the run's real TRAIN images."""
    model_dir = run.model_dir(model_name)
    if not (model_dir / "model.safetensors").exists():
        raise TailforgeError(f"featdict needs a trained classifier, and {model_dir} has none",
                             f"run `tailforge train --run {run.root} --name {model_name}` first, "
                             "or pass --feature-model NAME")
    from tailforge import train  # the train package (load_model, embed)

    model, meta = train.load_model(model_dir)
    info = run.dataset_info()
    df = read_manifest(run.require(run.real, "measure"))
    df = df[(df["split"] == "train") & (df["source"] == "real")]
    from tailforge.train.features import backbone_features  # the run's feature cache (features/<model>/)

    feats = backbone_features(run, model_dir, lambda x: train.embed(model, meta, x), df["uri"].tolist(),
                              int(info["channels"]), tuple(info["image_size"]))
    return feats, df["label"].to_numpy()


class FeatureGenerator(Generator):
    """A generator whose samples are feature vectors in the space of ``cfg.feature_model``: ``prepare``
    sets ``self.sampler`` (anything with ``sample(label, seeds) -> float32 (n, D)``); every shard is one
    ``features.npy`` whose rows the manifest addresses as ``path.npy#row``."""

    def run_shard(self, shard: Shard, out_dir: Path) -> list[dict]:
        seeds = [sample_seed(self.cfg.seed, shard.label, i) for i in shard.indices()]
        np.save(out_dir / "features.npy", self.sampler.sample(shard.label, seeds).astype(np.float32))
        rows = []
        for k, index in enumerate(shard.indices()):
            row = base_row(shard, index, self.cfg.seed, self.source, self.uri(shard, f"features.npy#{k}"))
            row["feature_model"] = self.cfg.feature_model
            rows.append(row)
        return rows


class FeatDictGenerator(FeatureGenerator):
    name = "featdict"
    source = "featdict"

    def prepare(self, plan: Plan, progress: Progress | None = None) -> None:
        o = self.cfg.featdict
        X, y = train_features(self.run, self.cfg.feature_model, progress)
        self.sampler = FeatureDictOversampler(n_atoms=o.featdict_atoms, k_neighbors=o.featdict_k,
                                              variation=o.featdict_variation).fit(X, y)
