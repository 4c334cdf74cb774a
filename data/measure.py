"""``measure``: class frequencies, imbalance factor, Gini, many/medium/few groups, histogram."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .atomic import atomic_path, read_json, write_json
from .classtable import short_name
from .config import MeasureConfig
from .run import RunDir

GROUPS = ("many", "medium", "few")
GROUP_COLORS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}
MAX_BARS = 300  # past this many classes the histogram is drawn as filled steps


@dataclass
class ClassStats:
    dataset: str
    num_classes: int
    class_names: list[str]
    counts: dict[str, list[int]]  # split -> per-class counts
    imbalance_factor: float  # train: n_max / n_min
    gini: float  # train: Gini coefficient of class counts (0 = balanced)
    groups: list[str]  # per class: many / medium / few
    group_rule: str  # the rule actually applied: absolute or relative
    thresholds: dict[str, float]
    group_sizes: dict[str, int]

    @property
    def train_counts(self) -> np.ndarray:
        return np.asarray(self.counts["train"])

    def classes_in(self, group: str) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g == group]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassStats":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @classmethod
    def load(cls, run: RunDir) -> "ClassStats":
        return cls.from_dict(read_json(run.require(run.counts, "measure")))


def gini(counts) -> float:
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    # mean absolute difference / (2 * mean), computed from sorted values in O(n)
    cum = np.arange(1, n + 1)
    return float((2 * np.sum(cum * x) - (n + 1) * x.sum()) / (n * x.sum()))


def assign_groups(train_counts, cfg: MeasureConfig) -> tuple[list[str], str, dict[str, float]]:
    """Groups by train count.

    absolute: many > cfg.many, few < cfg.few, else medium (Liu et al. 2019, the thresholds
    100/20 of the literature). relative (tiny datasets, where no class passes 100): the log-count
    range [log n_min, log n_max] is cut in thirds; top third many, bottom third few. ``auto``
    picks absolute when the largest class has more than ``cfg.many`` images.
    """
    n = np.asarray(train_counts, dtype=np.float64)
    rule = cfg.rule
    if rule == "auto":
        rule = "absolute" if n.max() > cfg.many else "relative"
    if rule == "absolute":
        lo, hi = float(cfg.few), float(cfg.many)
        groups = ["many" if c > hi else "few" if c < lo else "medium" for c in n]
        return groups, rule, {"many_above": hi, "few_below": lo}
    lmin, lmax = math.log(max(n.min(), 1)), math.log(max(n.max(), 1))
    if lmax - lmin < 1e-9:
        return ["many"] * len(n), rule, {"many_above": float(n.max()), "few_below": float(n.min())}
    hi = math.exp(lmin + 2 * (lmax - lmin) / 3)
    lo = math.exp(lmin + (lmax - lmin) / 3)
    groups = ["many" if c >= hi else "few" if c < lo else "medium" for c in n]
    return groups, rule, {"many_above": round(hi, 3), "few_below": round(lo, 3)}


def measure(manifest: pd.DataFrame, class_names: list[str], cfg: MeasureConfig | None = None,
            dataset: str = "") -> ClassStats:
    """Class statistics of the real samples of a manifest."""
    cfg = cfg or MeasureConfig()
    c = len(class_names)
    real = manifest[manifest["source"] == "real"]
    counts = {s: np.bincount(real.loc[real["split"] == s, "label"].to_numpy(), minlength=c).astype(int).tolist()
              for s in ("train", "val", "test")}
    tr = np.asarray(counts["train"])
    groups, rule, thr = assign_groups(tr, cfg)
    return ClassStats(
        dataset=dataset,
        num_classes=c,
        class_names=list(class_names),
        counts=counts,
        imbalance_factor=float(tr.max() / max(tr.min(), 1)),
        gini=round(gini(tr), 6),
        groups=groups,
        group_rule=rule,
        thresholds=thr,
        group_sizes={g: groups.count(g) for g in GROUPS},
    )


def plot_histogram(stats: ClassStats, path) -> None:
    """Bar chart of train images per class (sorted, log scale), coloured by group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tr = stats.train_counts
    order = np.argsort(-tr, kind="stable")
    c = len(tr)
    fig, ax = plt.subplots(figsize=(min(14, max(7, 3 + 0.18 * c)), 4.2), dpi=110)
    if c <= MAX_BARS:
        ax.bar(range(c), tr[order], color=[GROUP_COLORS[stats.groups[i]] for i in order], width=0.85)
    else:  # thousands of classes: one filled step curve per group, not one rectangle per class
        g = np.asarray(stats.groups)[order]
        for name in GROUPS:
            if (g == name).any():
                ax.fill_between(np.arange(c), np.maximum(tr[order], 0.5), 0.5, where=g == name, step="mid",
                                color=GROUP_COLORS[name], linewidth=0)
        ax.set_xlim(-0.5, c - 0.5)
    ax.set_yscale("log")
    ax.set_ylabel("train images (log)")
    ax.set_xlabel("class (sorted by frequency)")
    if c <= 30:
        ax.set_xticks(range(c))
        ax.set_xticklabels([short_name(stats.class_names[i]) for i in order], rotation=60, ha="right", fontsize=8)
    ax.set_title(f"{stats.dataset}: {c} classes, imbalance factor {stats.imbalance_factor:.1f}, "
                 f"Gini {stats.gini:.2f} ({stats.group_rule} groups)", fontsize=10)
    ax.legend(handles=[Patch(color=GROUP_COLORS[g], label=f"{g} ({stats.group_sizes[g]})") for g in GROUPS],
              loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def measure_run(run: RunDir, cfg: MeasureConfig | None = None) -> ClassStats:
    """Measure the run's real manifest; write counts.json and counts.png."""
    from .manifest import read_manifest

    info = run.dataset_info()
    df = read_manifest(run.require(run.real, "measure"))
    stats = measure(df, info["class_names"], cfg, dataset=info["name"])
    write_json(run.counts, stats.to_dict())
    plot_histogram(stats, run.root / "counts.png")
    return stats
