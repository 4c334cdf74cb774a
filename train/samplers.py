"""Samplers: which training indices an epoch visits, ``SAMPLERS[name](labels, rng) -> indices``.

An epoch draws as many samples as the training set holds. Each epoch's order comes from a
generator seeded by (seed, epoch), so a resumed run replays exactly the epochs it had left.
"""
from __future__ import annotations

import numpy as np

from tailforge.data.errors import unknown_name
from tailforge.data.longtail import class_indices


def _class_draw(labels: np.ndarray, rng: np.random.Generator, class_p: np.ndarray) -> np.ndarray:
    """Pick a class by ``class_p``, then a sample of it uniformly (with replacement)."""
    n = len(labels)
    classes = np.flatnonzero(np.bincount(labels, minlength=len(class_p)) > 0)
    p = class_p[classes] / class_p[classes].sum()
    members = class_indices(labels)  # one sort, not one scan of the labels per class
    picks = rng.choice(classes, size=n, p=p)
    picked = class_indices(picks)
    out = np.empty(n, dtype=np.int64)
    for c in classes:  # the same draws, in the same order, as a scan per class would make
        where = picked.get(int(c), np.zeros(0, np.int64))
        out[where] = members[int(c)][rng.integers(0, len(members[int(c)]), size=len(where))]
    return out


def instance(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every sample once per epoch, shuffled: the long-tailed distribution as is."""
    return rng.permutation(len(labels))


def class_balanced(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Classes equally likely (Kang et al. 2020's class-balanced sampling), samples uniform within a class."""
    c = int(labels.max()) + 1
    return _class_draw(labels, rng, np.ones(c))


def sqrt(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Square-root sampling (Mahajan et al. 2018): class probability proportional to sqrt(n_c)."""
    counts = np.bincount(labels).astype(np.float64)
    return _class_draw(labels, rng, np.sqrt(counts))


def weighted(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Weighted random sampling with per-sample weight 1 / n_c (torch's WeightedRandomSampler recipe)."""
    counts = np.bincount(labels).astype(np.float64)
    w = 1.0 / counts[labels]
    return rng.choice(len(labels), size=len(labels), replace=True, p=w / w.sum())


SAMPLERS = {"instance": instance, "class_balanced": class_balanced, "sqrt": sqrt, "weighted": weighted}


def shard_indices(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of an epoch's global ``order`` under DDP: every ``world_size``-th position.

    Every rank computes the same ``order`` (same sampler, same (seed, epoch)), drops the last
    ``len(order) % world_size`` positions so that all shards have the same length, and keeps the
    positions ``rank, rank + world_size, ...``. The shards are disjoint and their union is the trimmed
    order; batch ``s`` of ``b`` samples on every rank together is ``order[s*b*world_size:(s+1)*b*world_size]``,
    the batch one process would take with batch size ``b * world_size``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    n = len(order) - len(order) % world_size
    return np.asarray(order)[:n][rank::world_size]


def epoch_indices(name: str, labels: np.ndarray, seed: int, epoch: int, n: int | None = None) -> np.ndarray:
    """The epoch's order; ``n`` samples (default: as many as ``labels``): further draws of the sampler
    are appended, or the order is cut, so two training sets of different sizes can get the same budget."""
    if name not in SAMPLERS:
        raise unknown_name("sampler", name, SAMPLERS)
    rng = np.random.default_rng([seed, epoch, 17])
    labels = np.asarray(labels, dtype=np.int64)
    order = SAMPLERS[name](labels, rng)
    while n is not None and len(order) < n:
        order = np.concatenate([order, SAMPLERS[name](labels, rng)])
    return order if n is None else order[:n]
