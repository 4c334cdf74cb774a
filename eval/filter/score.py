"""The filter's scoring core on plain arrays (no run folder, no images): calibrate, score, decide.

Everything here works on L2-normalised vectors of one embedding space: the real TRAIN samples
(``real``, ``real_labels``) and the candidates (``cand``, ``cand_labels``).

Calibration (from real training samples only):
- class prototype = normalised mean of the class's real vectors;
- fidelity threshold of class c = the ``fidelity_percentile`` of the leave-one-out cosine of each
  real sample of c to the prototype of the *other* samples of c (so a real image does not vouch for
  itself). Classes with fewer than ``min_calibration`` real samples use the lower of the pooled
  percentile (all classes) and the class's own least typical real sample, so that the real tail
  images themselves would pass;
- novelty ceiling = the ``novelty_percentile`` of real samples' similarity to their nearest *other*
  real sample: a candidate closer to a real image than that is a near copy. The duplicate threshold
  defaults to the same value.

- realism floor = the ``realism_percentile`` (default 0: the least typical) of the same nearest-other
  similarities: a candidate farther than that from EVERY real train sample is off the data
  manifold (noise, broken samples).

Rules, in order (the first that fails is the reason): ``unrealistic`` (below the realism floor),
``wrong_class`` (the target must win the similarity-weighted vote of the k nearest real samples,
or, with ``consistency="prototype"``, be the nearest prototype), ``low_fidelity``, ``near_copy``;
then among the survivors of each class, in order of decreasing score, ``duplicate`` (too close to
an already kept candidate) and ``over_quota`` (the class's quota is full).

``guard=True`` (feature-space candidates by default, ``FilterConfig.feature_rules="guard"``) keeps
only the rules that catch broken samples: ``unrealistic``; ``wrong_class`` only for a near copy of
ANOTHER class's real sample (its nearest real neighbour is of another class and closer than the
near-copy ceiling); ``near_copy`` of its own class; ``duplicate``; and the quota is filled in a
seeded random order. Why: on the VAL splits of Fashion-MNIST-LT every selection by consistency,
fidelity, uncertainty, novelty or coverage lost to a random subset of the same size
(bench/results/feature_study.md): a tail class's unseen images fall into the head's regions of a
long-tail backbone, and the candidates that look "wrong" there are the ones that teach it so.

Extra rules (``RULES``, none by default) run after ``near_copy`` on its survivors, in the order
``cfg.rules`` names them; a candidate an extra rule rejects gets the rule's name as its reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from tailforge.data.errors import TailforgeError, unknown_name

from .index import FaissSearch, l2_normalize

REASONS = ("", "blank", "unrealistic", "wrong_class", "low_fidelity", "near_copy", "duplicate", "over_quota")

# Extra rules by name: ``fn(frame, cand, cand_labels, cal, cfg) -> bool array``, True = reject. ``frame`` holds
# the scores of the candidates (score_consistency, score_fidelity, score_novelty, score, fidelity_threshold,
# reason), ``cand`` their normalised vectors in this space, ``cal`` its Calibration.
RULES: dict[str, Callable[..., np.ndarray]] = {}


def rule(name: str):
    """Register an extra filter rule: ``@rule("low_margin")`` on a function of the ``RULES`` signature."""
    def deco(fn):
        RULES[name] = fn
        return fn

    return deco


def check_rules(cfg) -> None:
    for name in getattr(cfg, "rules", None) or ():
        if name not in RULES:
            raise unknown_name("filter rule", name, RULES)


def apply_rules(frame: pd.DataFrame, cand: np.ndarray, cand_labels: np.ndarray, cal: Calibration, cfg) -> None:
    """The extra rules of ``cfg.rules``, in order, on the candidates that every rule before passed."""
    for name in getattr(cfg, "rules", None) or ():
        fails = np.asarray(RULES[name](frame, cand, cand_labels, cal, cfg), bool)
        alive = frame["reason"].to_numpy() == ""
        frame["reason"] = np.where(alive & fails, name, frame["reason"].to_numpy()).astype(object)


@dataclass
class Calibration:
    """What the real training samples say: prototypes and thresholds of one embedding space."""

    counts: np.ndarray  # (C,) real train samples per class
    prototypes: np.ndarray  # (C, D) normalised class means (zero rows for empty classes)
    fidelity_threshold: np.ndarray  # (C,)
    fidelity_source: list[str]  # per class: "class" or "fallback"
    novelty_ceiling: float
    duplicate_threshold: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "fidelity_threshold": [round(float(t), 6) for t in self.fidelity_threshold],
            "fidelity_source": self.fidelity_source,
            "novelty_ceiling": round(float(self.novelty_ceiling), 6),
            "duplicate_threshold": round(float(self.duplicate_threshold), 6),
            "notes": self.notes,
        }


def class_sums(x: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class sums of rows of ``x`` (one sort + ``reduceat``; fast at 100k x 512)."""
    out = np.zeros((num_classes, x.shape[1]), np.float64)
    if len(x) == 0:
        return out
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    out[lab[starts]] = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
    return out


def by_class(labels: np.ndarray, mask: np.ndarray | None = None):
    """``(class, indices)`` of each class present in ``labels`` (restricted to ``mask``), classes in
    ascending order, indices ascending: one stable sort, not one scan of all rows per class (at
    8,000 classes that scan is the whole cost)."""
    labels = np.asarray(labels)
    idx = np.arange(len(labels)) if mask is None else np.flatnonzero(mask)
    lab = labels[idx]
    order = np.argsort(lab, kind="stable")
    idx, lab = idx[order], lab[order]
    if not len(lab):
        return
    bounds = np.r_[np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]), len(lab)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield int(lab[a]), idx[a:b]


def leave_one_out_fidelity(real: np.ndarray, labels: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                           block: int = 65536) -> np.ndarray:
    """cos(x_i, mean of the other samples of its class); NaN for classes with one sample."""
    out = np.full(len(real), np.nan, np.float64)
    sq = np.einsum("cd,cd->c", sums, sums)
    for s in range(0, len(real), block):
        x, lab = real[s:s + block].astype(np.float64), labels[s:s + block]
        xs = np.einsum("nd,nd->n", x, sums[lab])
        xx = np.einsum("nd,nd->n", x, x)
        num = xs - xx  # x . (S - x)
        den2 = sq[lab] - 2 * xs + xx  # |S - x|^2
        ok = (counts[lab] > 1) & (den2 > 1e-12)
        out[s:s + block][ok] = num[ok] / np.sqrt(den2[ok])
    return out


def nearest_other(sims: np.ndarray, ids: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """Best similarity per row, skipping the query itself (searched as a member of the base)."""
    masked = np.where(ids == self_ids[:, None], -np.inf, sims)
    return masked.max(axis=1)


def calibrate(real: np.ndarray, labels: np.ndarray, num_classes: int, cfg, nn_sims: np.ndarray) -> Calibration:
    """Prototypes and thresholds; ``nn_sims``: nearest-other-real similarity of sampled real rows."""
    counts = np.bincount(labels, minlength=num_classes)
    sums = class_sums(real, labels, num_classes)
    protos = l2_normalize(sums)
    loo = leave_one_out_fidelity(real, labels, sums, counts)
    notes: list[str] = []
    finite = np.isfinite(loo)
    pooled = float(np.percentile(loo[finite], cfg.fidelity_percentile)) if finite.any() else -1.0
    if not finite.any():
        notes.append("no class has two real samples: the fidelity rule is off")
    thr = np.full(num_classes, pooled, np.float64)
    source = ["fallback"] * num_classes
    own_of = {c: loo[i] for c, i in by_class(labels, finite)}
    for c in range(num_classes):
        own = own_of.get(c, loo[:0])
        if counts[c] >= cfg.min_calibration and len(own):
            thr[c], source[c] = float(np.percentile(own, cfg.fidelity_percentile)), "class"
        elif len(own):
            thr[c] = min(pooled, float(own.min()))
    if cfg.novelty_ceiling is not None:
        ceiling = float(cfg.novelty_ceiling)
    elif len(nn_sims):
        ceiling = float(np.percentile(nn_sims, cfg.novelty_percentile))
    else:
        ceiling = 1.0
        notes.append("one real sample only: the near-copy rule is off")
    dup = float(cfg.duplicate_threshold) if cfg.duplicate_threshold is not None else ceiling
    return Calibration(counts, protos, thr, source, ceiling, dup, notes)


def knn_votes(sims: np.ndarray, nb_labels: np.ndarray, target: np.ndarray, counts: np.ndarray,
              tau: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Prior-corrected, similarity-weighted kNN vote.

    Each neighbour votes for its class with weight ``max(sim, 0) / n_class**tau``: dividing by the
    class's share of the real data (as logit adjustment does for a classifier) keeps a tail class
    from being outvoted only because the head has more images near everything. Returns (share of
    the corrected vote won by the target, whether the target wins or ties).
    """
    w = (np.maximum(sims, 0) + 1e-6) / np.maximum(counts[nb_labels], 1).astype(np.float64) ** tau
    same = nb_labels[:, :, None] == nb_labels[:, None, :]  # (M, k, k)
    vote_at = np.einsum("mj,mij->mi", w, same)  # vote of the class of each neighbour
    is_t = nb_labels == target[:, None]
    t_vote = (w * is_t).sum(1)
    other = np.where(is_t, 0.0, vote_at).max(1)
    return t_vote / w.sum(1), t_vote >= other


def real_queries(n: int, cfg) -> np.ndarray:
    """The real rows used to calibrate the novelty ceiling (a seeded sample past a size)."""
    if n <= cfg.calibration_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.calibration_samples, replace=False))


def score_space(real: np.ndarray, real_labels: np.ndarray, cand: np.ndarray, cand_labels: np.ndarray,
                num_classes: int, cfg, search=None, guard: bool = False) -> tuple[pd.DataFrame, Calibration]:
    """Scores and rule outcomes (``wrong_class``/``low_fidelity``/``near_copy``, then ``cfg.rules``) of one space.

    One index over the real vectors answers both the calibration queries and the candidates.
    """
    search = search or FaissSearch(cfg.ivf_threshold, cfg.nprobe)
    real, cand = l2_normalize(real), l2_normalize(cand)
    real_labels, cand_labels = np.asarray(real_labels, np.int64), np.asarray(cand_labels, np.int64)
    if len(real) == 0:
        raise TailforgeError("the real training split is empty", "rebuild the run with `tailforge measure`")
    if cand.shape[1] != real.shape[1]:
        raise TailforgeError(f"candidate embeddings have dimension {cand.shape[1]} but the real ones {real.shape[1]}",
                             "score feature candidates with the classifier that produced them (feature_model)")
    check_rules(cfg)
    counts = np.bincount(real_labels, minlength=num_classes)
    orphan = sorted(set(np.unique(cand_labels)) - set(np.flatnonzero(counts)))
    if orphan:
        raise TailforgeError(f"candidate class(es) {orphan[:5]} have no real training samples to compare with",
                             "generate only for classes present in the real training split")
    q = real_queries(len(real), cfg)
    k = min(cfg.k, len(real))
    sims, ids = search.knn(real, np.concatenate([real[q], cand]), max(k, 2))
    nn = nearest_other(sims[:len(q)], ids[:len(q)], q) if len(real) > 1 else np.zeros(0)
    cal = calibrate(real, real_labels, num_classes, cfg, nn)
    sims, ids = sims[len(q):, :k], ids[len(q):, :k]

    fidelity = np.einsum("nd,nd->n", cand, cal.prototypes[cand_labels]).astype(np.float64)
    if cfg.consistency == "knn":
        consistency, wins = knn_votes(sims, real_labels[ids], cand_labels, cal.counts, cfg.knn_prior_correction)
    else:
        proto_sims = cand @ cal.prototypes.T
        t = proto_sims[np.arange(len(cand)), cand_labels]
        proto_sims[np.arange(len(cand)), cand_labels] = -np.inf
        best_other = proto_sims.max(1) if num_classes > 1 else np.full(len(cand), -1.0)
        consistency, wins = t - best_other, t >= best_other
    max_real = sims[:, 0].astype(np.float64)
    thr = cal.fidelity_threshold[cand_labels]
    pct = getattr(cfg, "realism_percentile", None)
    floor = float(np.percentile(nn, pct)) if pct is not None and len(nn) else -np.inf
    cal.notes.append(f"realism floor {floor:.4f} (percentile {pct} of real nearest-other similarity)")
    unreal = max_real < floor
    if guard:
        # wrong_class only for a near copy of another class's real sample: a stricter vote (no target among
        # the k nearest and another prototype nearer) still rejected ~15% of featcov candidates and cost
        # 0.4-0.5 points on val (bench/results/feature_study.md)
        copy = max_real > cal.novelty_ceiling
        other = real_labels[ids[:, 0]] != cand_labels
        reason = np.where(unreal, "unrealistic", np.where(copy & other, "wrong_class",
                          np.where(copy, "near_copy", "")))
    else:
        reason = np.where(unreal, "unrealistic", np.where(~wins, "wrong_class", np.where(fidelity < thr, "low_fidelity",
                          np.where(max_real > cal.novelty_ceiling, "near_copy", ""))))
    novelty = 1.0 - max_real
    score = cfg.weight_consistency * consistency + cfg.weight_fidelity * (fidelity - thr) + cfg.weight_novelty * novelty
    frame = pd.DataFrame({
        "score_consistency": np.asarray(consistency, np.float64),
        "score_fidelity": fidelity,
        "score_novelty": novelty,
        "score": score,
        "fidelity_threshold": thr,
        "reason": reason.astype(object),
    })
    frame["score_duplicate"] = max_sim_within_class(cand, cand_labels, search)
    apply_rules(frame, cand, cand_labels, cal, cfg)
    return frame, cal


def max_sim_within_class(cand: np.ndarray, labels: np.ndarray, search) -> np.ndarray:
    """Similarity of each candidate to its nearest other candidate of the same class (0 if alone)."""
    out = np.zeros(len(cand), np.float64)
    for c, idx in by_class(labels):
        if len(idx) < 2:
            continue
        sims, ids = search.knn(cand[idx], cand[idx], 2)
        out[idx] = nearest_other(sims, ids, np.arange(len(idx)))
    return out


def duplicate_pairs(cand: np.ndarray, labels: np.ndarray, alive: np.ndarray, threshold: float,
                    search=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs (i, j) of surviving candidates of the same class closer than ``threshold`` (global ids)."""
    search = search or FaissSearch()
    out = []
    for c, idx in by_class(labels, alive):
        i, j = search.pairs_above(l2_normalize(cand[idx]), threshold)
        out.append((idx[i], idx[j]))
    return out


def random_priority(n: int, seed: int) -> np.ndarray:
    """A seeded random order for filling quotas (guard mode): the same candidates give the same picks."""
    return np.random.default_rng([int(seed), 20260]).random(n)


def decide(labels: np.ndarray, score: np.ndarray, reason: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]],
           quotas: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Greedy keep, per class, best score first: ``duplicate`` of a kept one, else keep up to the quota."""
    reason = np.asarray(reason, dtype=object).copy()
    neighbours: dict[int, list[int]] = {}
    for i, j in pairs:
        for a, b in zip(i.tolist(), j.tolist()):
            neighbours.setdefault(a, []).append(b)
    accepted = np.zeros(len(labels), bool)
    alive = reason == ""
    for c, idx in by_class(labels, alive):
        order = idx[np.lexsort((idx, -score[idx]))]  # best first (a random priority: a seeded random order)
        quota, kept = int(quotas.get(int(c), 0)), 0
        for i in order:
            if any(accepted[j] for j in neighbours.get(int(i), ())):
                reason[i] = "duplicate"
            elif kept < quota:
                accepted[i], kept = True, kept + 1
            else:
                reason[i] = "over_quota"
    return accepted, reason


def score_arrays(real: np.ndarray, real_labels: np.ndarray, cand: np.ndarray, cand_labels: np.ndarray,
                 quotas: dict[int, int], cfg, num_classes: int | None = None,
                 search=None, guard: bool = False) -> tuple[pd.DataFrame, Calibration]:
    """The whole filter on arrays of one space: scores, ``accepted`` and ``reason`` per candidate."""
    cand_labels = np.asarray(cand_labels, np.int64)
    if num_classes is None:
        num_classes = int(max(np.max(real_labels), np.max(cand_labels, initial=0))) + 1
    frame, cal = score_space(real, real_labels, cand, cand_labels, num_classes, cfg, search, guard)
    pairs = duplicate_pairs(l2_normalize(cand), cand_labels, frame["reason"].to_numpy() == "",
                            cal.duplicate_threshold, search)
    prio = random_priority(len(cand), getattr(cfg, "seed", 0)) if guard else frame["score"].to_numpy()
    accepted, reason = decide(cand_labels, prio, frame["reason"].to_numpy(), pairs, quotas)
    frame["accepted"], frame["reason"] = accepted, reason
    return frame, cal
