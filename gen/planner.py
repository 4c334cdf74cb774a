"""``plan``: how many synthetic samples each class gets.

For class c with ``have = n_c`` real train images the target ``t_c`` is

* ``balance``: ``n_max`` (every class up to the largest),
* ``fixed``:   ``count``,
* ``sqrt``:    ``round(sqrt(n_c * n_max))`` (the imbalance factor becomes its square root),

``need = max(t_c - n_c, 0)`` and ``generate = ceil(need * overgen)`` (the filter rejects some).
A ``budget`` cap shrinks the quotas in proportion to ``generate`` with largest-remainder rounding,
so the total is exactly the budget; ``need`` (what the filter keeps) shrinks with it to
``ceil(generate / overgen)``, so every target keeps the same over-generation slack. Only the selected classes (default: those below target) get any.

Two targets split a ``budget`` (samples to generate in all) among the classes below the largest, none
past it:

* ``uniform``: the same number for each;
* ``room``: where the estimated room is. ``tailforge headroom`` measured each class's learning curve (the
  recipe with these classes thinned, eval/headroom.json); ``curve_gains`` prices any quota from it, and the
  budget goes, step by step, to the class whose next step gains the most (water-filling over concave
  curves, which maximises the summed estimated gain). A class the curve says has nothing to gain gets
  nothing, unless every class is at that point, when the rest follows the distance to the largest class.
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
    curve_classes: list[int] | None = None  # room / uniform: the classes it chose among (headroom thins them)
    note: str = ""                          # one line: how the budget was split, and why

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(target=d["target"], overgen=d["overgen"], classes=[ClassQuota(**c) for c in d["classes"]],
                   total=d["total"], budget=d.get("budget"), dataset=d.get("dataset", ""),
                   config=d.get("config", {}), curve_classes=d.get("curve_classes"), note=d.get("note", ""))

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


def split_evenly(total: int, caps: np.ndarray) -> np.ndarray:
    """``total`` split as evenly as possible over the classes, none above its cap (water-filling)."""
    out = np.zeros(len(caps), dtype=np.int64)
    left, open_ = int(total), caps > 0
    while left > 0 and open_.any():
        share = left // int(open_.sum())
        if share == 0:  # fewer left than open classes: one more each, lowest ids first
            for i in np.flatnonzero(open_)[:left]:
                out[i] += 1
            break
        add = np.minimum(share, caps - out) * open_
        out += add
        left -= int(add.sum())
        open_ = out < caps
    return out


def room_quotas(total: int, caps: np.ndarray, headroom: dict, steps: int = 4000) -> np.ndarray:
    """``total`` images split over the classes (none above its cap) where the estimated gain is largest.

    Each class's quota grows in steps of ``ceil(total / steps)`` images (coarser where a class could take more
    than 250 steps); the gain of every step is priced by
    ``curve_gains`` (the headroom fit), and the steps with the largest gains are taken. Learning curves are
    concave, so each class's steps come in order and the sum of estimated gains is the largest there is.
    Steps that gain nothing (beyond a class's curve, or no room at all) go last, the classes farthest from the
    largest first."""
    from tailforge.eval.room import curve_gains

    caps = np.asarray(caps, dtype=np.int64)
    total = int(min(total, caps.sum()))
    if total <= 0:
        return np.zeros(len(caps), dtype=np.int64)
    # at most `steps` steps in all, and 250 a class (time and memory at thousands of classes)
    step = max(1, math.ceil(total / steps), math.ceil(min(caps.max(), total) / 250))
    k = np.arange(math.ceil(min(caps.max(), total) / step) + 1)  # no class can take more than the total
    edges = np.minimum(k[:, None] * step, caps[None, :])             # (steps + 1, C) images added after each step
    g = np.stack([curve_gains(headroom, e) for e in edges])            # estimated gain at each edge
    sizes = np.diff(edges, axis=0)
    ok = sizes > 0
    labels = np.broadcast_to(np.arange(len(caps)), sizes.shape)[ok]
    gains = (np.maximum(0.0, np.diff(g, axis=0))[ok] / sizes[ok])      # gain per image of each step
    order = (-(caps[None, :] - edges[:-1]) / caps.max())[ok]           # ties: the farthest from the largest first
    sizes = sizes[ok]
    pick = np.lexsort((order, -np.round(gains, 12)))
    taken = np.cumsum(sizes[pick])
    out = np.zeros(len(caps), dtype=np.int64)
    k = int(np.searchsorted(taken, total))
    np.add.at(out, labels[pick[:k]], sizes[pick[:k]])
    if k < len(pick):
        out[labels[pick[k]]] += total - int(out.sum())
    return out


def plan(stats: ClassStats, cfg: PlanConfig | None = None, headroom: dict | None = None) -> Plan:
    """Per-class quotas for the synthetic data (pure: writes nothing, see ``plan_run``). Target ``room`` needs
    ``headroom`` (eval/headroom.json of a learning curve over the classes below the largest)."""
    cfg = cfg or PlanConfig()
    have = stats.train_counts.astype(np.int64)
    split = cfg.target in ("room", "uniform")
    target = class_targets(have, cfg) if not split else np.full_like(have, int(have.max()))
    need = np.maximum(target - have, 0)
    chosen = np.zeros(len(have), dtype=bool)
    if cfg.classes is None:
        chosen[:] = need > 0
    else:
        chosen[select_classes(stats, cfg.classes)] = True
    need = np.where(chosen, need, 0)
    why = ""
    if split:
        caps, accepted = need, int(cfg.budget // cfg.overgen)
        if cfg.target == "room":
            check_headroom(headroom, caps)
            need = room_quotas(accepted, caps, headroom)
            why = room_reason(need, caps, headroom, stats.class_names)
        else:
            need = split_evenly(accepted, caps)
    generate = np.array([math.ceil(n * cfg.overgen - 1e-9) for n in need], dtype=np.int64)
    if cfg.budget is not None:
        generate = cap_to_budget(generate, cfg.budget)
        # the filter keeps at most `need` a class: a capped class keeps its over-generation slack, not more
        need = np.minimum(need, np.ceil(generate / cfg.overgen - 1e-9).astype(np.int64))
    if split:
        target = have + need
    classes = [ClassQuota(label=i, class_name=stats.class_names[i], have=int(have[i]), target=int(target[i]),
                          need=int(need[i]), generate=int(generate[i])) for i in range(len(have))]
    out = Plan(target=cfg.target, overgen=cfg.overgen, classes=classes, total=int(generate.sum()),
               budget=cfg.budget, dataset=stats.dataset, config=cfg.model_dump(mode="json"))
    if split:
        out.curve_classes = [int(c) for c in np.flatnonzero(chosen & (have < have.max()))]
        out.note = why or (f"{int(need.sum()):,} images to add ({out.total:,} to generate at over-generation "
                           f"x{cfg.overgen:g}) split evenly over {int((need > 0).sum())} classes")
    return out


def check_headroom(headroom: dict | None, caps: np.ndarray) -> None:
    """A room plan prices quotas with a learning curve that must cover every class it may top up."""
    if headroom is None or "classes" not in headroom:
        raise TailforgeError("plan target 'room' needs each class's learning curve (eval/headroom.json with "
                             "per-class curves), and the run has none",
                             "run it through `tailforge run` / `tailforge headroom --run RUN --set plan.target=room "
                             "--set plan.budget=N`, which measure the curve first, or use --target balance")
    on = {c["label"] for c in headroom["classes"] if c.get("curve")}
    missing = [int(c) for c in np.flatnonzero(caps > 0) if int(c) not in on]
    if missing:
        raise TailforgeError(f"eval/headroom.json has no learning curve for {len(missing)} class(es) the room plan "
                             f"may top up (e.g. class {missing[0]})",
                             "re-run `tailforge headroom` for this plan (it thins every class below the largest)")


def room_reason(need: np.ndarray, caps: np.ndarray, headroom: dict, names) -> str:
    """One line: how a room plan split its budget, and why."""
    from tailforge.eval.room import curve_gains

    g = 100 * curve_gains(headroom, need)
    gb = 100 * curve_gains(headroom, cap_to_budget(caps.copy(), int(need.sum())))
    top = np.argsort(-need, kind="stable")[:3]
    share = need[top].sum() / max(1, need.sum())
    none = int(((caps > 0) & (need == 0)).sum())
    if g.sum() <= 1e-9:
        return (f"room plan: the learning curve ({headroom.get('fit')}) sees no gain from more images in any class, so "
                f"the {int(need.sum()):,} images went to the classes farthest from the largest, "
                f"{int((need > 0).sum())} of them")
    return (f"room plan: {int(need.sum()):,} images over {int((need > 0).sum())} classes where the estimated gain "
            f"is largest ({headroom.get('fit')} learning curve); {100 * share:.0f} % to "
            + ", ".join(f"{names[i]} ({need[i]:,}, {g[i]:+.1f} pts)" for i in top if need[i] > 0)
            + (f"; {none} class(es) get none (no estimated gain worth a step)" if none else "")
            + f"; estimated balanced-accuracy gain {g.sum() / len(need):+.2f} pts vs {gb.sum() / len(need):+.2f} "
            "for the same total split like balance")


def plan_run(run: RunDir, cfg: PlanConfig | None = None) -> Plan:
    """Plan from the run's ``counts.json`` and write ``plan.json`` (target room: with eval/headroom.json)."""
    cfg = cfg or PlanConfig()
    hr = None
    if cfg.target == "room" and (run.eval_dir / "headroom.json").exists():
        hr = read_json(run.eval_dir / "headroom.json")
    p = plan(ClassStats.load(run), cfg, hr)
    p.save(run)
    return p
