"""Classification metrics the long-tail papers report, plus the ones they leave out.

``compute(y_true, probs, groups)`` returns one flat dict. Everything is derived from the
confusion matrix and the probabilities with numpy (no scikit-learn at run time); the tests check
each number against scikit-learn or a hand-computed case.

Cost grows with the samples and the classes, never with their square: the confusion matrix is kept
sparse (``confusion_coo``: one (true, predicted, count) triple per non-empty cell, at most one per
sample), and every metric needs only its diagonal and its row and column sums (``Margins``). At
iNaturalist's 8,142 classes a dense matrix would be 66 million cells (530 MB of int64).

Conventions (as scikit-learn): balanced accuracy averages recall over classes present in
``y_true``; macro F1 averages over classes present in ``y_true`` or the predictions. Group
accuracies (many/medium/few) average per-class accuracy over the group's classes present in
``y_true`` (Liu et al. 2019), so they do not depend on how many test images each class has.
"""
from __future__ import annotations

import numpy as np

GROUPS = ("many", "medium", "few")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class (dense: for a few hundred classes at most)."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def confusion_coo(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, list[int]]:
    """The non-empty cells of the confusion matrix: ``{"rows": true, "cols": predicted, "counts": n}``,
    row-major order. Size: at most one cell per sample, whatever the number of classes."""
    key = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    cells, counts = np.unique(key, return_counts=True)
    return {"rows": (cells // num_classes).tolist(), "cols": (cells % num_classes).tolist(),
            "counts": counts.tolist()}


def dense(coo: dict, num_classes: int) -> np.ndarray:
    """A ``confusion_coo`` dict (or an eval JSON's ``confusion``) as a dense matrix (few classes only)."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(coo["rows"], dtype=np.int64), np.asarray(coo["cols"], dtype=np.int64)),
              np.asarray(coo["counts"], dtype=np.int64))
    return cm


class Margins:
    """What the metrics need of a confusion matrix: its diagonal (``tp``), row sums (``true``) and
    column sums (``pred``), from labels in O(N + C) or from a dense matrix."""

    def __init__(self, tp, true, pred):
        self.tp, self.true, self.pred = (np.asarray(a, dtype=np.float64) for a in (tp, true, pred))

    @classmethod
    def of(cls, y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> "Margins":
        y, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
        return cls(np.bincount(y[y == p], minlength=num_classes), np.bincount(y, minlength=num_classes),
                   np.bincount(p, minlength=num_classes))

    @classmethod
    def of_matrix(cls, cm) -> "Margins":
        cm = np.asarray(cm)
        return cls(np.diag(cm), cm.sum(1), cm.sum(0))


def _margins(cm) -> Margins:
    return cm if isinstance(cm, Margins) else Margins.of_matrix(cm)


def topk(y_true: np.ndarray, probs: np.ndarray, k: int, chunk: int = 2048) -> float:
    """Fraction of samples whose true class is among the ``k`` most probable: fewer than ``k`` classes
    score above it. One comparison pass over (N, C), in row chunks (no sort, no (N, k) index array)."""
    y = np.asarray(y_true, dtype=np.int64)
    hits = 0
    for a in range(0, len(y), chunk):
        p = probs[a:a + chunk]
        mine = p[np.arange(len(p)), y[a:a + chunk]]
        hits += int(((p > mine[:, None]).sum(1) < k).sum())
    return hits / len(y) if len(y) else 0.0


def per_class_f1(cm) -> np.ndarray:
    """F1 of each class (0 where the class is neither true nor predicted)."""
    m = _margins(cm)
    denom = m.pred + m.true
    return np.divide(2 * m.tp, denom, out=np.zeros_like(m.tp), where=denom > 0)


def f1_scores(cm) -> tuple[float, float]:
    """(macro F1, support-weighted F1) from a confusion matrix or its ``Margins``."""
    m = _margins(cm)
    f1 = per_class_f1(m)
    present = (m.true > 0) | (m.pred > 0)
    macro = float(f1[present].mean()) if present.any() else 0.0
    weighted = float((f1 * m.true).sum() / m.true.sum()) if m.true.sum() else 0.0
    return macro, weighted


def mcc(cm) -> float:
    """Multi-class Matthews correlation coefficient (Gorodkin 2004), as scikit-learn."""
    m = _margins(cm)
    t, p = m.true, m.pred
    c = float(m.tp.sum())
    s = float(t.sum())
    cov_ytyp = c * s - t @ p
    cov_ypyp = s * s - p @ p
    cov_ytyt = s * s - t @ t
    den = np.sqrt(cov_ytyt * cov_ypyp)
    return float(cov_ytyp / den) if den > 0 else 0.0


def kappa(cm) -> float:
    """Cohen's kappa: (observed - expected agreement) / (1 - expected)."""
    m = _margins(cm)
    s = float(m.true.sum())
    if s == 0:
        return 0.0
    po = float(m.tp.sum()) / s
    pe = float((m.pred * m.true).sum()) / (s * s)
    return float((po - pe) / (1 - pe)) if pe < 1 else 0.0


def calibration_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict:
    """Equal-width confidence bins: per bin count, mean confidence, accuracy (for ECE and the diagram)."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds conf in (edges[i], edges[i+1]]; confidence 0 (impossible for softmax) goes to bin 0
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    sconf = np.bincount(b, weights=conf, minlength=n_bins)
    sacc = np.bincount(b, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": edges.tolist(), "count": count.tolist(),
                "confidence": np.where(count > 0, sconf / np.maximum(count, 1), np.nan).tolist(),
                "accuracy": np.where(count > 0, sacc / np.maximum(count, 1), np.nan).tolist()}


def ece(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017): sum_b |B|/N * |acc(B) - conf(B)|."""
    bins = calibration_bins(y_true, probs, n_bins)
    n = len(y_true)
    return float(sum(c / n * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"])
                     if c > 0)) if n else 0.0


def compute(y_true, probs, groups=None, n_bins: int = 15) -> dict:
    """All metrics of one prediction set.

    ``y_true`` (N,) ints; ``probs`` (N, C) probabilities; ``groups`` a per-class list of
    many/medium/few (from ``tailforge.data.ClassStats``) or None. Per-class accuracy is None for classes
    without samples in ``y_true``.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)  # float32 stays float32: (N, C) is the largest array of an evaluation
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs must be (N, C) with N = len(y_true) = {len(y)}, got {p.shape}")
    c = p.shape[1]
    pred = p.argmax(1)
    m = Margins.of(y, pred, c)
    support = m.true.astype(np.int64)
    acc = np.divide(m.tp, m.true, out=np.zeros_like(m.tp), where=m.true > 0)
    per_class = [float(a) if n else None for a, n in zip(acc.tolist(), support.tolist())]
    macro_f1, weighted_f1 = f1_scores(m)
    eps = 1e-12
    out = {
        "n": int(len(y)),
        "top1": float((pred == y).mean()) if len(y) else 0.0,
        "top5": topk(y, p, 5) if len(y) else 0.0,
        "balanced_acc": float(acc[support > 0].mean()) if (support > 0).any() else 0.0,
        "macro_f1": macro_f1,
        "weighted_f1": weighted_f1,
        "mcc": mcc(m),
        "kappa": kappa(m),
        "ece": ece(y, p, n_bins),
        "nll": float(-np.log(np.clip(p[np.arange(len(y)), y].astype(np.float64), eps, 1)).mean()) if len(y) else 0.0,
        "per_class": per_class,
        "per_class_f1": per_class_f1(m).tolist(),
        "support": support.tolist(),
        "predicted": m.pred.astype(np.int64).tolist(),
        "confusion": confusion_coo(y, pred, c),  # sparse: rows (true), cols (predicted), counts
    }
    if groups is not None:
        if len(groups) != c:
            raise ValueError(f"groups has {len(groups)} entries for {c} classes")
        g_arr = np.asarray(groups)
        for g in GROUPS:
            mask = (g_arr == g) & (support > 0)
            out[g] = float(acc[mask].mean()) if mask.any() else None
    return out
