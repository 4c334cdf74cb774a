"""Planner arithmetic, class selection, bad input, shard specs and the `tailforge plan` CLI."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from tailforge.data import ClassStats, TailforgeError
from tailforge.gen import Plan, PlanConfig, make_shards, parse_shard_spec, plan


def stats_of(counts, groups=None) -> ClassStats:
    c = len(counts)
    return ClassStats(dataset="toy", num_classes=c, class_names=[f"k{i}" for i in range(c)],
                      counts={"train": list(counts), "val": [1] * c, "test": [1] * c},
                      imbalance_factor=max(counts) / min(counts), gini=0.0,
                      groups=groups or ["many"] + ["medium"] * (c - 2) + ["few"], group_rule="absolute",
                      thresholds={}, group_sizes={})


COUNTS = [100, 50, 20, 7]


def test_balance_tops_every_class_up_to_the_largest_with_overgen():
    p = plan(stats_of(COUNTS), PlanConfig(target="balance", overgen=1.5))
    assert [q.target for q in p.classes] == [100] * 4
    assert [q.need for q in p.classes] == [0, 50, 80, 93]
    assert [q.generate for q in p.classes] == [0, 75, 120, math.ceil(93 * 1.5)]
    assert p.total == 0 + 75 + 120 + 140


def test_fixed_and_sqrt_targets():
    p = plan(stats_of(COUNTS), PlanConfig(target="fixed", count=60, overgen=1.0))
    assert [q.need for q in p.classes] == [0, 10, 40, 53]
    p = plan(stats_of(COUNTS), PlanConfig(target="sqrt", overgen=1.0))
    want = [round(math.sqrt(n * 100)) for n in COUNTS]  # 100, 71, 45, 26
    assert [q.target for q in p.classes] == want
    assert [q.generate for q in p.classes] == [t - n for t, n in zip(want, COUNTS)]
    after = np.array(COUNTS) + [q.generate for q in p.classes]
    assert after.max() / after.min() == pytest.approx(math.sqrt(100 / 7), rel=0.05)  # IF -> sqrt(IF)


def test_budget_cap_sums_exactly_and_keeps_proportions():
    p = plan(stats_of(COUNTS), PlanConfig(overgen=1.0, budget=100))
    gen = [q.generate for q in p.classes]
    assert sum(gen) == p.total == 100
    assert gen[0] == 0 and gen[1] < gen[2] < gen[3]
    for q in p.classes[1:]:
        assert abs(q.generate - q.need * 100 / 223) < 1
    big = plan(stats_of(COUNTS), PlanConfig(overgen=1.0, budget=10_000))  # a loose cap changes nothing
    assert big.total == 223


def test_class_selection_by_name_id_and_group():
    s = stats_of(COUNTS)
    p = plan(s, PlanConfig(classes=["k3", 2], overgen=1.0))
    assert [q.generate for q in p.classes] == [0, 0, 80, 93]
    p = plan(s, PlanConfig(classes=["few"], overgen=1.0))
    assert [q.generate for q in p.classes] == [0, 0, 0, 93]


def test_bad_plans_fail_clearly():
    s = stats_of(COUNTS)
    with pytest.raises(TailforgeError, match="unknown class 'k33'.*did you mean 'k3'"):
        plan(s, PlanConfig(classes=["k33"]))
    with pytest.raises(TailforgeError, match="class id 7"):
        plan(s, PlanConfig(classes=[7]))
    with pytest.raises(ValidationError, match="budget must be at least 1"):
        PlanConfig(budget=0)
    with pytest.raises(ValidationError, match="needs `count`"):
        PlanConfig(target="fixed")


def test_shards_cover_the_plan_and_specs_are_checked():
    p = plan(stats_of(COUNTS), PlanConfig(overgen=1.0))
    shards = make_shards(p, "ddpm", 32)
    for q in p.classes:
        mine = [s for s in shards if s.label == q.label]
        assert sum(s.size for s in mine) == q.generate
        assert all(a.stop == b.start for a, b in zip(mine, mine[1:]))
    assert len({s.id for s in shards}) == len(shards)
    assert parse_shard_spec("1/4") == (1, 4) and parse_shard_spec(None) == (0, 1)
    for bad in ("3/2", "2/2", "0/0", "a/b", "1"):
        with pytest.raises(TailforgeError, match="shard spec"):
            parse_shard_spec(bad)


def test_units_group_small_quotas_and_split_large_ones():
    from tailforge.gen import Shard, make_units

    quotas = [3] * 2000 + [1000, 7, 0, 5]  # 2,000 tiny classes, one large one, a few small ones
    shards = [Shard("featcov", c, f"c{c}", a, min(a + 64, n)) for c, n in enumerate(quotas) for a in range(0, n, 64)]
    units = make_units(shards, 64)
    assert [s for u in units for s in u.shards] == shards  # every shard once, in plan order
    assert all(u.size <= 64 for u in units) and [u.index for u in units] == list(range(len(units)))
    # 6,000 tiny samples: 95 units of 63 (21 classes each) + one of 15; the large class: 15 full units and
    # one of its last 40 with the two small classes after it (7 + 5)
    assert len(units) == 2000 // 21 + 1 + 16 and units[0].size == 63 and len(units[0].shards) == 21
    assert len(units) < len(shards) / 10  # thousands of classes, about (samples / 64) units
    assert make_units(shards, 64) == units  # deterministic: `--shard i/n` workers agree with each other
    assert units[0].describe().startswith("u00000 (c0000-000000-000003 .. c0020-") and make_units([], 8) == []


def test_plan_cli_writes_plan_json_and_rejects_bad_input(digits_run_copy, capsys):
    from tailforge.data import read_json
    from tailforge.flows.cli import main

    run = digits_run_copy
    assert main(["plan", "--run", str(run.root), "--target", "sqrt", "--overgen", "1.2"]) == 0
    d = read_json(run.plan)
    assert set(d) >= {"target", "overgen", "classes", "total"} and d["target"] == "sqrt"
    assert {"label", "class_name", "have", "need", "generate"} <= set(d["classes"][0])
    stats = ClassStats.load(run)
    assert [c["have"] for c in d["classes"]] == stats.counts["train"]
    assert d["total"] == sum(c["generate"] for c in d["classes"]) > 0
    assert Plan.load(run).total == d["total"]
    before = run.plan.read_bytes()
    assert main(["plan", "--run", str(run.root), "--budget", "0"]) == 2
    assert main(["plan", "--run", str(run.root), "--classes", "seven"]) == 2
    err = capsys.readouterr().err
    assert "budget must be at least 1" in err and "unknown class 'seven'" in err and "Traceback" not in err
    assert run.plan.read_bytes() == before  # nothing written on bad input
    capsys.readouterr()
    assert main(["plan", "--run", str(run.root), "--classes", "many"]) == 0  # the head class needs nothing
    out = " ".join(capsys.readouterr().out.split())
    assert read_json(run.plan)["total"] == 0 and "note: nothing to generate" in out
