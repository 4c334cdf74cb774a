"""``plan``: how many synthetic samples each class gets.

For class c with ``have = n_c`` real train images the target ``t_c`` is

* ``balance``: ``n_max`` (every class up to the largest),
* ``fixed``:   ``count``,
* ``sqrt``:    ``round(sqrt(n_c * n_max))`` (the imbalance factor becomes its square root),

``need = max(t_c - n_c, 0)`` and ``generate = ceil(need * overgen)`` (the filter rejects some).
A ``budget`` cap shrinks the quotas in proportion to ``generate`` with largest-remainder rounding,
so the total is exactly the budget. Only the selected classes (default: those below target) get any.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from tailforge.data import ClassStats, RunDir, TailforgeError, read_json, unknown_name, write_json
from tailforge.data.measure import GROUPS

from .config import PlanConfig


@dataclass
class ClassQuota:
    label: int
    class_name: str
    have: int
    target: int
    need: int
    generate: int


@dataclass
class Plan:
    target: str
    overgen: float
    classes: list[ClassQuota]
    total: int
    budget: int | None = None
    dataset: str = ""
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(target=d["target"], overgen=d["overgen"], classes=[ClassQuota(**c) for c in d["classes"]],
                   total=d["total"], budget=d.get("budget"), dataset=d.get("dataset", ""),
                   config=d.get("config", {}))

    @classmethod
    def load(cls, run: RunDir) -> "Plan":
        return cls.from_dict(read_json(run.require(run.plan, "plan")))

    def save(self, run: RunDir) -> None:
        write_json(run.plan, self.to_dict())


def class_targets(have: np.ndarray, cfg: PlanConfig) -> np.ndarray:
    n_max = int(have.max())
    if cfg.target == "balance":
        return np.full_like(have, n_max)
    if cfg.target == "fixed":
        return np.full_like(have, int(cfg.count))
    return np.rint(np.sqrt(have.astype(np.float64) * n_max)).astype(have.dtype)


def select_classes(stats: ClassStats, wanted) -> list[int]:
    """Resolve class names / ids / group names to class ids; unknown ones are an error."""
    names = stats.class_names
    out: set[int] = set()
    for w in wanted:
        if isinstance(w, int) or (isinstance(w, str) and w.strip().lstrip("-").isdigit() and w.strip() not in names):
            i = int(w)
            if not 0 <= i < stats.num_classes:
                raise TailforgeError(f"plan names class id {i}, but the dataset has classes 0..{stats.num_classes - 1}",
                                     "pass class ids in range, class names, or a group (few, medium, many)")
            out.add(i)
        elif w in names:
            out.add(names.index(w))
        elif w in GROUPS:
            out.update(stats.classes_in(w))
        else:
            raise unknown_name("class", str(w), list(names) + list(GROUPS))
    return sorted(out)


def cap_to_budget(generate: np.ndarray, budget: int) -> np.ndarray:
    """Scale quotas down to sum exactly ``budget`` (largest remainder); untouched if already within."""
    total = int(generate.sum())
    if total <= budget:
        return generate
    exact = generate * (budget / total)
    out = np.floor(exact).astype(np.int64)
    rest = budget - int(out.sum())
    order = np.lexsort((np.arange(len(exact)), -(exact - out)))  # biggest remainder first, ties by class id
    out[order[:rest]] += 1
    return out


def plan(stats: ClassStats, cfg: PlanConfig | None = None) -> Plan:
    """Per-class quotas for the synthetic data (pure: writes nothing, see ``plan_run``)."""
    cfg = cfg or PlanConfig()
    have = stats.train_counts.astype(np.int64)
    target = class_targets(have, cfg)
    need = np.maximum(target - have, 0)
    chosen = np.zeros(len(have), dtype=bool)
    if cfg.classes is None:
        chosen[:] = need > 0
    else:
        chosen[select_classes(stats, cfg.classes)] = True
    need = np.where(chosen, need, 0)
    generate = np.array([math.ceil(n * cfg.overgen - 1e-9) for n in need], dtype=np.int64)
    if cfg.budget is not None:
        generate = cap_to_budget(generate, cfg.budget)
    classes = [ClassQuota(label=i, class_name=stats.class_names[i], have=int(have[i]), target=int(target[i]),
                          need=int(need[i]), generate=int(generate[i])) for i in range(len(have))]
    return Plan(target=cfg.target, overgen=cfg.overgen, classes=classes, total=int(generate.sum()),
                budget=cfg.budget, dataset=stats.dataset, config=cfg.model_dump(mode="json"))


def plan_run(run: RunDir, cfg: PlanConfig | None = None) -> Plan:
    """Plan from the run's ``counts.json`` and write ``plan.json``."""
    p = plan(ClassStats.load(run), cfg)
    p.save(run)
    return p
