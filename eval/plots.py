"""Pictures of an evaluation: confusion matrix (classes by train frequency), per-class accuracy vs
train count (coloured by group), reliability diagram."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tailforge.data.atomic import atomic_path
from tailforge.data.classtable import short_name

GROUP_COLORS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    _plt().close(fig)
    return Path(path)


MAX_MATRIX = 200  # classes; past this the confusion matrix is shown in bins of classes


def binned_confusion(cm, train_counts, bins: int = MAX_MATRIX) -> tuple[np.ndarray, np.ndarray]:
    """Row-normalised confusion matrix with classes ordered head -> tail (by train count) and, past
    ``bins`` classes, summed over ``bins`` consecutive groups of classes. ``cm`` is dense or the sparse
    ``{"rows", "cols", "counts"}`` of an eval JSON; cost O(cells + classes). Returns (matrix, order)."""
    counts = np.asarray(train_counts)
    c = len(counts)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(c, dtype=np.int64)
    rank[order] = np.arange(c)
    if isinstance(cm, dict):
        rows, cols, n = (np.asarray(cm[k], dtype=np.int64) for k in ("rows", "cols", "counts"))
    else:
        dense = np.asarray(cm)
        rows, cols = np.nonzero(dense)
        n = dense[rows, cols]
    b = min(c, bins)
    to_bin = rank * b // c  # head -> tail, about c / b classes per bin
    m = np.zeros((b, b), dtype=np.float64)
    np.add.at(m, (to_bin[rows], to_bin[cols]), n)
    return m / np.maximum(m.sum(1, keepdims=True), 1), order


def confusion_matrix(cm, train_counts, class_names, path, title="") -> Path:
    """Row-normalised confusion matrix, classes ordered from most to least frequent in train; past
    ``MAX_MATRIX`` classes, bins of consecutive classes (each cell: the share of the row bin's samples
    predicted into the column bin)."""
    plt = _plt()
    m, order = binned_confusion(cm, train_counts)
    c, b = len(order), len(m)
    side = min(12, 3 + 0.25 * b)
    fig, ax = plt.subplots(figsize=(side + 1, side), dpi=110)
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class" + (" bin" if b < c else ""))
    if b <= 30:
        names = [short_name(class_names[i]) for i in order]
        ax.set_xticks(range(b), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(b), names, fontsize=7)
        for i in range(b):
            for j in range(b):
                if m[i, j] >= 0.05:
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] > 0.5 else "black")
    binned = f" ({c:,} classes in {b} bins of ~{c / b:.0f})" if b < c else ""
    ax.set_xlabel("predicted (head -> tail)" + binned)
    ax.set_ylabel("true (head -> tail)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def per_class_accuracy(per_class, train_counts, groups, class_names, path, title="") -> Path:
    """Scatter of per-class accuracy against train images (log x), coloured by group."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for g, col in GROUP_COLORS.items():
        idx = [i for i, a in enumerate(per_class) if a is not None and (groups is None or groups[i] == g)]
        if not idx:
            continue
        ax.scatter([train_counts[i] for i in idx], [per_class[i] for i in idx], c=col, s=22,
                   label=g if groups else None)
        if groups is None:
            break
    if len(per_class) <= 20:
        for i, a in enumerate(per_class):
            if a is not None:
                ax.annotate(short_name(class_names[i]), (train_counts[i], a), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("train images of the class (log)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def reliability(bins: dict, path, title="") -> Path:
    """Accuracy vs confidence per bin (bars) against the diagonal; bar width = bin, label = ECE."""
    plt = _plt()
    edges = np.asarray(bins["edges"])
    acc = np.nan_to_num(np.asarray(bins["accuracy"], dtype=np.float64))
    conf = np.asarray(bins["confidence"], dtype=np.float64)
    count = np.asarray(bins["count"])
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=110)
    width = np.diff(edges)
    ax.bar(edges[:-1], acc, width=width, align="edge", color="#1f77b4", edgecolor="white", label="accuracy")
    gap = np.where(count > 0, np.nan_to_num(conf) - acc, 0)
    ax.bar(edges[:-1], gap, bottom=acc, width=width, align="edge", color="#d62728", alpha=0.35, label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
