"""Classification metrics the long-tail papers report, plus the ones they leave out.

``compute(y_true, probs, groups)`` returns one flat dict. Everything is derived from the
confusion matrix and the probabilities with numpy (no scikit-learn at run time); the tests check
each number against scikit-learn or a hand-computed case.

Conventions (as scikit-learn): balanced accuracy averages recall over classes present in
``y_true``; macro F1 averages over classes present in ``y_true`` or the predictions. Group
accuracies (many/medium/few) average per-class accuracy over the group's classes present in
``y_true`` (Liu et al. 2019), so they do not depend on how many test images each class has.
"""
from __future__ import annotations

import numpy as np

GROUPS = ("many", "medium", "few")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def topk(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argpartition(-probs, kth=k - 1, axis=1)[:, :k]
    return float((top == y_true[:, None]).any(axis=1).mean())


def f1_scores(cm: np.ndarray) -> tuple[float, float]:
    """(macro F1, support-weighted F1) from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    pred = cm.sum(0).astype(np.float64)
    true = cm.sum(1).astype(np.float64)
    denom = pred + true
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (true > 0) | (pred > 0)
    macro = float(f1[present].mean()) if present.any() else 0.0
    weighted = float((f1 * true).sum() / true.sum()) if true.sum() else 0.0
    return macro, weighted


def mcc(cm: np.ndarray) -> float:
    """Multi-class Matthews correlation coefficient (Gorodkin 2004), as scikit-learn."""
    t = cm.sum(1).astype(np.float64)
    p = cm.sum(0).astype(np.float64)
    c = float(np.trace(cm))
    s = float(cm.sum())
    cov_ytyp = c * s - t @ p
    cov_ypyp = s * s - p @ p
    cov_ytyt = s * s - t @ t
    den = np.sqrt(cov_ytyt * cov_ypyp)
    return float(cov_ytyp / den) if den > 0 else 0.0


def kappa(cm: np.ndarray) -> float:
    """Cohen's kappa: (observed - expected agreement) / (1 - expected)."""
    s = cm.sum()
    if s == 0:
        return 0.0
    po = np.trace(cm) / s
    pe = float((cm.sum(0) * cm.sum(1)).sum()) / (s * s)
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
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs must be (N, C) with N = len(y_true) = {len(y)}, got {p.shape}")
    c = p.shape[1]
    pred = p.argmax(1)
    cm = confusion(y, pred, c)
    support = cm.sum(1)
    per_class = [float(cm[i, i] / support[i]) if support[i] else None for i in range(c)]
    present = [a for a in per_class if a is not None]
    macro_f1, weighted_f1 = f1_scores(cm)
    eps = 1e-12
    out = {
        "n": int(len(y)),
        "top1": float((pred == y).mean()) if len(y) else 0.0,
        "top5": topk(y, p, 5) if len(y) else 0.0,
        "balanced_acc": float(np.mean(present)) if present else 0.0,
        "macro_f1": macro_f1,
        "weighted_f1": weighted_f1,
        "mcc": mcc(cm),
        "kappa": kappa(cm),
        "ece": ece(y, p, n_bins),
        "nll": float(-np.log(np.clip(p[np.arange(len(y)), y], eps, 1)).mean()) if len(y) else 0.0,
        "per_class": per_class,
        "support": support.astype(int).tolist(),
        "confusion": cm.astype(int).tolist(),
    }
    if groups is not None:
        if len(groups) != c:
            raise ValueError(f"groups has {len(groups)} entries for {c} classes")
        for g in GROUPS:
            accs = [per_class[i] for i in range(c) if groups[i] == g and per_class[i] is not None]
            out[g] = float(np.mean(accs)) if accs else None
    return out
