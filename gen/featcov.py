"""Feature-space oversampling with borrowed head-class covariance (``featcov``).

A backbone trained on a long tail maps the few training images of a tail class into a tight
cluster: it has fitted them. Test images of that class spread much wider, so a classifier
re-trained on the tail's own features (or on copies of them, as class-balanced sampling does)
draws the class boundary too close to the tail. ``featcov`` widens the tail with the variation the
head classes show: the within-class covariance of the head is the best estimate we have of how
far a class's features really spread (the idea of distribution calibration, Yang et al., ICLR 2021,
"Free Lunch for Few-shot Learning", and of head-to-tail variation transfer in feature space,
e.g. Chu et al., ECCV 2020; our construction, exact and deterministic):

1. **Fit.** For every class: its real train features X_c. Head classes are those with at least the
   median count (and >= 3 samples). Sigma = the mean within-class covariance of the head classes
   (or of the ``heads`` head classes whose means are nearest to class c), shrunk towards its
   diagonal by ``shrink``.
2. **Calibrate** (optional, the distribution calibration of Yang et al. and TailCalibX, Vigneswaran et al.
   2021): with ``pull`` > 0 the sampling mean of a tail sample moves from its anchor towards the mean of the
   ``heads`` head classes nearest to class t (TailCalibX's calibrated mean (sum of k head means + x) / (k + 1)
   is ``pull = k / (k + 1)``); with ``alpha`` > 0, ``alpha`` times the mean variance is added to Sigma's
   diagonal (their code adds a constant alpha to Sigma; here it is scaled to the features and isotropic).
3. **Sample** one feature of class t from its own seed: anchor x ~ uniform over X_t;
   ``x_new = x + pull * (m_near - x) + scale * L z``, z ~ N(0, I), L L^T = Sigma. Features of a ReLU /
   pooled backbone (all >= 0) are clipped at 0.

``FeatureCovOversampler`` is the algorithm on arrays (imbalanced-learn style ``fit_resample``);
``FeatCovGenerator`` runs it in a trained classifier's feature space, like ``featdict``. Selected
over featdict on the VAL split of Fashion-MNIST-LT (bench/results/feature_study.md).
"""
from __future__ import annotations

import numpy as np

from tailforge.data import TailforgeError
from tailforge.data.longtail import class_indices

from .featdict import FeatureGenerator, FeatureOversampler, train_features
from .planner import Plan
from .shards import Progress


class FeatureCovOversampler(FeatureOversampler):
    """Oversample classes in feature space: a real anchor of the class plus Gaussian head-class variation."""

    def __init__(self, sampling_strategy="auto", scale: float = 1.0, heads: int = 0, shrink: float = 0.0,
                 random_state: int | None = None, pull: float = 0.0, alpha: float = 0.0):
        if scale < 0 or not 0 <= shrink <= 1 or heads < 0 or not 0 <= pull <= 1 or alpha < 0:
            raise TailforgeError(f"featcov needs scale >= 0, 0 <= shrink <= 1, heads >= 0, 0 <= pull <= 1 and "
                                 f"alpha >= 0 (got {scale}, {shrink}, {heads}, {pull}, {alpha})", "fix the featcov options")
        if pull > 0 and heads == 0:
            raise TailforgeError("featcov pull moves a tail sample towards its nearest head classes, but heads is 0",
                                 "set featcov_heads (e.g. 2)")
        self.sampling_strategy = sampling_strategy
        self.scale, self.heads, self.shrink, self.pull, self.alpha = scale, heads, shrink, pull, alpha
        self.random_state = random_state

    def fit(self, X, y) -> "FeatureCovOversampler":
        X, y = self._fit_classes(X, y, np.float64)
        rows = class_indices(y)  # one sort, not one scan per class
        self.mean_ = {c: X[rows[int(c)]].mean(0) for c in self.classes_}
        head = [c for c, n in zip(self.classes_, self.counts_) if n >= np.median(self.counts_) and n >= 3]
        if not head:
            raise TailforgeError("featcov needs at least one class with 3 or more real features to borrow variation "
                                 "from", "use featdict, or a dataset with a populated head")
        self.head_ = head
        self.cov_ = {h: np.cov(X[rows[int(h)]].T) for h in head}
        self._chol: dict = {}
        return self

    def _factor(self, label) -> np.ndarray:
        """Cholesky factor of the covariance borrowed by class ``label`` (cached). With ``heads=0`` every
        class borrows the same pooled covariance: it is computed and factored once, not once per class
        (at 8,000 classes that per-class mean over thousands of head covariances was quadratic)."""
        if label not in self._chol:
            if not self.heads:
                if "pooled" not in self._chol:
                    self._chol["pooled"] = self._cholesky(np.mean([self.cov_[h] for h in self.head_], 0))
                self._chol[label] = self._chol["pooled"]
            else:
                near = self._near(label)
                self._chol[label] = self._cholesky(np.mean([self.cov_[h] for h in near or self.head_], 0))
        return self._chol[label]

    def _near(self, label) -> list:
        """The ``heads`` head classes whose means are nearest to class ``label``'s (itself excluded)."""
        heads = np.asarray(self.head_)
        means = np.stack([self.mean_[h] for h in self.head_])
        dist = ((means - self.mean_[label]) ** 2).sum(1)
        return [h for h in heads[np.argsort(dist, kind="stable")].tolist() if h != label][:self.heads]

    def _target(self, label) -> np.ndarray | None:
        """The mean of the nearest head classes (the calibrated mean's pull), or None without ``pull``."""
        if not self.pull:
            return None
        key = ("target", label)
        if key not in self._chol:
            near = self._near(label) or self.head_
            self._chol[key] = np.mean([self.mean_[h] for h in near], 0).astype(np.float32)
        return self._chol[key]

    def _cholesky(self, cov: np.ndarray) -> np.ndarray:
        if self.shrink:
            cov = (1 - self.shrink) * cov + self.shrink * np.diag(np.diag(cov))
        if self.alpha:
            cov = cov + self.alpha * float(np.trace(cov)) / len(cov) * np.eye(len(cov))
        d = len(cov)
        jitter = 1e-6 * max(float(np.trace(cov)) / d, 1e-12)
        return np.linalg.cholesky(cov + jitter * np.eye(d)).astype(np.float32)

    def sample(self, label, seeds) -> np.ndarray:
        """float32 (len(seeds), D): one synthetic feature of class ``label`` per seed (independent of batching)."""
        if label not in self.X_:
            raise TailforgeError(f"class {label} has no real features to oversample from",
                                 "plan only classes with at least one train image")
        xc, L, m = self.X_[label], self._factor(label), self._target(label)
        out = np.empty((len(seeds), xc.shape[1]), dtype=np.float32)
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng(int(seed))
            x = xc[rng.integers(len(xc))]
            if m is not None:
                x = x + self.pull * (m - x)
            out[i] = x + self.scale * (L @ rng.standard_normal(xc.shape[1]).astype(np.float32))
        return np.maximum(out, 0) if self.nonneg_ else out


class FeatCovGenerator(FeatureGenerator):
    name = "featcov"
    source = "featcov"

    def prepare(self, plan: Plan, progress: Progress | None = None) -> None:
        o = self.cfg.featcov
        X, y = train_features(self.run, self.cfg.feature_model, progress)
        self.sampler = FeatureCovOversampler(scale=o.featcov_scale, heads=o.featcov_heads, shrink=o.featcov_shrink,
                                             pull=o.featcov_pull, alpha=o.featcov_alpha).fit(X, y)
