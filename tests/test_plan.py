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
    full = plan(stats_of(COUNTS), PlanConfig(overgen=1.0))
    for q, f in zip(p.classes[1:], full.classes[1:]):
        assert abs(q.generate - f.need * 100 / 223) < 1 and q.need == q.generate
    big = plan(stats_of(COUNTS), PlanConfig(overgen=1.0, budget=10_000))  # a loose cap changes nothing
    assert big.total == 223
    # what the filter keeps shrinks with the cap, so balance, uniform and room at one budget add the same
    cap = plan(stats_of(COUNTS), PlanConfig(overgen=1.5, budget=150))
    assert [q.need for q in cap.classes] == [math.ceil(q.generate / 1.5) for q in cap.classes]
    even = plan(stats_of(COUNTS), PlanConfig(target="uniform", overgen=1.5, budget=150))
    assert abs(sum(q.need for q in cap.classes) - sum(q.need for q in even.classes)) <= 3


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



def test_a_unit_is_one_folder_its_uris_resolve_and_old_shard_folders_count_as_done(tmp_path):
    """Packed units: one folder (one rows.parquet, one integrity record) per unit, not per class; the rows'
    URIs point at the files; a damaged unit is redone; a run folder written one folder per shard is done."""
    import shutil

    from tailforge.data import RunDir
    from tailforge.gen import Shard, make_units
    from tailforge.gen.base import Generator
    from tailforge.gen.shards import collect_candidates, finished_folders, run_unit, unit_done

    class Feats(Generator):
        name = source = "featcov"

        def __init__(self):
            self.calls = 0

        def run_shard(self, shard, out_dir):
            self.calls += 1
            x = np.full((shard.size, 4), shard.label, np.float32) + np.arange(shard.start, shard.stop)[:, None]
            np.save(out_dir / "features.npy", x)
            from tailforge.gen.shards import base_row

            return [base_row(shard, i, 0, "featcov", self.uri(shard, f"features.npy#{k}"))
                    for k, i in enumerate(shard.indices())]

    quotas = [2] * 40 + [20]
    shards = [Shard("featcov", c, f"c{c}", a, min(a + 8, n)) for c, n in enumerate(quotas) for a in range(0, n, 8)]
    units = make_units(shards, 8)
    run = RunDir(tmp_path / "run")
    gen_dir = run.synthetic("featcov")
    g = Feats()
    for u in units:
        assert run_unit(g, u, gen_dir) == u.size
    folders = sorted(p.name for p in gen_dir.iterdir())
    assert folders == sorted(u.folder for u in units) and len(folders) == len(units) < len(shards) / 2
    assert units[0].folder == "c0000-000000-000002+4" and (gen_dir / units[0].folder / shards[1].id).is_dir()
    assert len(list(gen_dir.rglob("rows.parquet"))) == len(units)
    df = collect_candidates(run)
    assert len(df) == sum(quotas) and df["sample_id"].is_unique
    for uri, label, index in zip(df["uri"], df["label"], df["index"]):  # every row's file and row, its own values
        path, row = uri.split("#")
        assert np.load(run.root / path)[int(row), 0] == label + index

    calls = g.calls
    assert all(run_unit(g, u, gen_dir) == 0 for u in units) and g.calls == calls  # finished: nothing redone
    victim = gen_dir / units[0].folder / shards[1].id / "features.npy"
    victim.write_bytes(victim.read_bytes()[:-8])  # a damaged file inside a packed unit: that unit is redone
    assert not unit_done(gen_dir, units[0]) and run_unit(g, units[0], gen_dir) == units[0].size
    assert g.calls == calls + len(units[0].shards) and unit_done(gen_dir, units[0])

    # the older layout, one folder per shard, of the same unit: it counts as finished
    old = RunDir(tmp_path / "old").synthetic("featcov")
    old.mkdir(parents=True)
    for s in units[0].shards:
        shutil.copytree(gen_dir / units[0].folder / s.id, old / s.id)
        (old / s.id / "rows.parquet").write_bytes((gen_dir / units[0].folder / "rows.parquet").read_bytes())
    assert unit_done(old, units[0], finished_folders(old)) and not unit_done(old, units[1], finished_folders(old))

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


# --------------------------------------------------------------------------- budget splits: uniform and room

def headroom_of(counts, err, b=0.5, fit="power-span"):
    """A headroom result (eval/headroom.json's shape) with a known learning curve: class c's val error err[c]
    falls as (n / n_c)^-b; every class below the largest is on the curve."""
    top = max(counts)
    return {"fit": fit, "param": b, "classes": [
        {"label": i, "name": f"k{i}", "have": n, "need": top - n, "curve": n < top, "val_images": 1000,
         "val_error": e, "gain": 0.0, "low": 0.0, "high": 0.0} for i, (n, e) in enumerate(zip(counts, err))]}


def test_uniform_and_room_split_exactly_the_budget_and_never_pass_the_largest():
    s = stats_of(COUNTS)
    u = plan(s, PlanConfig(target="uniform", budget=90, overgen=1.0))
    assert [q.need for q in u.classes] == [0, 30, 30, 30] and u.total == 90
    assert u.curve_classes == [1, 2, 3] and "split evenly" in u.note
    hr = headroom_of(COUNTS, [0.0, 0.1, 0.1, 0.1])
    r = plan(s, PlanConfig(target="room", budget=150, overgen=1.5), hr)
    assert r.total == 150 and sum(q.need for q in r.classes) == 100
    assert all(q.have + q.need <= 100 for q in r.classes) and r.classes[0].need == 0
    big = plan(s, PlanConfig(target="room", budget=10_000, overgen=1.0), hr)  # more than balance asks: balance
    assert [q.need for q in big.classes] == [0, 50, 80, 93]


def test_room_quotas_go_where_the_estimated_marginal_gain_is():
    from tailforge.eval.room import curve_gains
    from tailforge.gen.planner import room_quotas

    counts = [100, 20, 20, 20]
    caps = np.array([0, 80, 80, 80])
    # same size, different error: the class with the most error to lose gets the most, the error-free none
    hr = headroom_of(counts, [0.0, 0.30, 0.10, 0.0])
    q = room_quotas(60, caps, hr)
    assert q.sum() == 60 and q[1] > q[2] > 0 and q[3] == 0
    # water-filling: at the optimum the marginal gains of the classes that got some are (nearly) equal ...
    eps = 1

    def marginal(c):
        a = q.astype(float).copy()
        lo = curve_gains(hr, a)[c]
        a[c] += eps
        return curve_gains(hr, a)[c] - lo
    assert marginal(1) == pytest.approx(marginal(2), rel=0.15)
    # ... and no other split of the same total gains more in sum
    best = curve_gains(hr, q).sum()
    for alt in ([0, 30, 30, 0], [0, 60, 0, 0], [0, 20, 20, 20], [0, 45, 15, 0]):
        assert curve_gains(hr, np.array(alt, float)).sum() <= best + 1e-9
    # equal curves: smaller classes gain more per image (the power law), so they come first
    hr2 = headroom_of([100, 10, 40, 70], [0.0, 0.2, 0.2, 0.2])
    q2 = room_quotas(40, np.array([0, 90, 60, 30]), hr2)
    assert q2[1] > q2[2] > q2[3]
    # no estimated room anywhere: the split follows the distance to the largest class
    q3 = room_quotas(60, np.array([0, 80, 40, 20]), headroom_of([100, 20, 60, 80], [0.0] * 4))
    assert q3.sum() == 60 and q3[1] >= q3[2] >= q3[3]


def test_room_plan_without_a_learning_curve_or_a_budget_fails_clearly():
    s = stats_of(COUNTS)
    with pytest.raises(ValidationError, match="set `budget`"):
        PlanConfig(target="room")
    with pytest.raises(TailforgeError, match="needs each class's learning curve"):
        plan(s, PlanConfig(target="room", budget=50))
    hr = headroom_of(COUNTS, [0.0, 0.1, 0.1, 0.1])
    hr["classes"][3]["curve"] = False
    with pytest.raises(TailforgeError, match="no learning curve for 1 class"):
        plan(s, PlanConfig(target="room", budget=50), hr)


def test_plan_cli_room_target_reuses_the_curve_says_how_it_split_and_refuses_bad_budgets(digits_run_copy, capsys):
    from tailforge.data import read_json, write_json
    from tailforge.flows.cli import main

    run = digits_run_copy
    assert main(["plan", "--run", str(run.root), "--target", "room", "--budget", "0"]) == 2
    assert main(["plan", "--run", str(run.root), "--target", "room"]) == 2           # no budget to split
    assert main(["plan", "--run", str(run.root), "--target", "room", "--budget", "100"]) == 2  # no curve, no config
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert "budget must be at least 1" in err and "set `budget`" in err and "learning curve" in err
    assert "Traceback" not in err and len(lines) == 3 and all(x.startswith("tailforge plan: error:") for x in lines)
    counts = ClassStats.load(run).counts["train"]
    err_val = [0.0 if n == max(counts) else 0.3 * (1 - n / max(counts)) for n in counts]
    write_json(run.eval_dir / "headroom.json", headroom_of(counts, err_val))
    assert main(["plan", "--run", str(run.root), "--target", "room", "--budget", "100", "--overgen", "1.25"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    d = read_json(run.plan)
    assert d["target"] == "room" and d["total"] == 100 and sum(c["need"] for c in d["classes"]) == 80
    assert "room plan: 80 images over" in out and "estimated balanced-accuracy gain" in out
