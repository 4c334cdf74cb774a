"""Long-tail construction and stratified splitting (pure NumPy, deterministic given a seed)."""
from __future__ import annotations

import math

import numpy as np

from .errors import TailforgeError


def lt_counts(n_max: int, num_classes: int, imbalance: float, profile: str = "exp",
              step_fraction: float = 0.5) -> list[int]:
    """Per-rank class sizes, head first.

    ``exp``: n_i = int(n_max * IF^(-i/(C-1))) (Cao et al. 2019, LDAM);
    ``step``: the first (1-step_fraction)*C classes keep n_max, the rest n_max/IF (Buda et al. 2018);
    ``none``: every class n_max (callers then keep classes as they are).
    """
    if imbalance < 1:
        raise TailforgeError(f"imbalance factor must be >= 1, got {imbalance}", "pass --imbalance 1 or more")
    c = num_classes
    if profile == "exp":
        if c == 1:
            return [n_max]
        return [int(n_max * imbalance ** (-i / (c - 1))) for i in range(c)]
    if profile == "step":
        n_minor = int(round(c * step_fraction))
        return [n_max] * (c - n_minor) + [int(n_max / imbalance)] * n_minor
    if profile == "none":
        return [n_max] * c
    raise TailforgeError(f"unknown long-tail profile '{profile}'", "use exp, step or none")


def class_ranking(num_classes: int, order, seed: int) -> list[int]:
    """Class ids in head-to-tail order."""
    if order == "index":
        return list(range(num_classes))
    if order == "random":
        return [int(x) for x in np.random.default_rng(seed + 7919).permutation(num_classes)]
    order = [int(x) for x in order]
    if sorted(order) != list(range(num_classes)):
        raise TailforgeError(f"class_order must list each of the {num_classes} class ids once",
                             "give a permutation of 0..C-1, or 'index' / 'random'")
    return order


def class_indices(labels: np.ndarray) -> dict[int, np.ndarray]:
    """``{class: indices of its items, ascending}`` from one stable sort (``np.flatnonzero(labels == c)``
    for every class, without scanning all labels once per class: 8,000 classes x 100,000 items)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    if not len(lab):
        return {}
    bounds = np.r_[np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]), len(lab)]
    return {int(lab[a]): order[a:b] for a, b in zip(bounds[:-1], bounds[1:])}


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices class by class so each part keeps the class distribution.

    Each class with at least as many items as parts gets at least one item in every part.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c, idx in sorted(class_indices(labels).items()):
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        sizes = [int(math.floor(n * f)) for f in fractions[1:]]
        if n >= len(fractions):
            sizes = [max(1, s) for s in sizes]
        first = n - sum(sizes)
        bounds = np.cumsum([0, first] + sizes)
        for k in range(len(fractions)):
            parts[k].append(idx[bounds[k]:bounds[k + 1]])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def make_long_tailed(labels: np.ndarray, num_classes: int, imbalance: float, profile: str, order,
                     seed: int, step_fraction: float = 0.5) -> np.ndarray:
    """Indices of a long-tailed subset of ``labels``; the head class keeps all its items.

    Targets come from :func:`lt_counts` with n_max = the size of the head class (rank 0), so the
    head keeps all its items and the profile is exact (CIFAR-10, IF=100: 5000 ... 50); a class with
    fewer items than its target keeps what it has. Which items are kept is a seeded choice.
    """
    counts = np.bincount(labels, minlength=num_classes)
    if profile == "none":
        return np.arange(len(labels))
    rank = class_ranking(num_classes, order, seed)
    targets = lt_counts(int(counts[rank[0]]), num_classes, imbalance, profile, step_fraction)
    rng = np.random.default_rng(seed + 104729)
    keep = []
    members = class_indices(labels)
    for r, c in enumerate(rank):
        idx = members.get(int(c), np.zeros(0, np.int64))
        n = min(targets[r], len(idx))
        keep.append(np.sort(idx[rng.permutation(len(idx))[:n]]))
    return np.sort(np.concatenate(keep))
