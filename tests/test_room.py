"""Room and capture: the oracle source (exactly the images the long tail dropped), the same budget for the
oracle arm and headroom's learning-curve points, and the estimators on arrays with a known answer."""
import numpy as np
import pandas as pd
import pytest

from conftest import make_image_tree

from tailforge.data import DataConfig, RunDir, build_manifest, load_dataset, measure_run, read_manifest
from tailforge.data.heldout import heldout_pool, heldout_reason
from tailforge.eval.room import class_sets, estimate_room, room_and_capture


# --------------------------------------------------------------------------- the oracle source

def test_heldout_pool_of_an_array_dataset_is_exactly_the_dropped_train_rows(digits_run):
    df = read_manifest(digits_run.real)
    pool = heldout_pool(digits_run)
    raw = load_dataset(DataConfig(dataset="digits")).splits["all"]
    used = set(df["uri"].str.split("#").str[1].astype(int))
    rows = pool["uri"].str.split("#").str[1].astype(int).to_numpy()
    assert len(used) == len(df) and used.isdisjoint(rows) and len(set(rows)) == len(rows)
    # digits has no official split: every row of the array is in a split or in the pool, and the pool holds
    # only rows of the TRAIN part (val and test rows are in the manifest)
    assert len(rows) + len(df) == len(raw)
    assert (pool["label"].to_numpy() == raw.labels[rows]).all()          # the right labels
    tr = np.bincount(df[df["split"] == "train"]["label"], minlength=10)
    got = np.bincount(pool["label"], minlength=10)
    assert got[np.argmax(tr)] == 0 and (got[tr < tr.max()] > 0).all()
    assert heldout_reason(digits_run) is None


def test_heldout_pool_of_an_image_folder_is_the_files_in_no_split(tmp_path):
    root = make_image_tree(tmp_path / "tree", {"a": 40, "b": 40, "c": 40}, size=(12, 12))
    run = RunDir(tmp_path / "run")
    build_manifest(DataConfig(dataset="imagefolder", root=root, imbalance=8, image_size=12), run)
    df = read_manifest(run.real)
    pool = heldout_pool(run)
    files = {str(p) for p in root.rglob("*.png")}
    assert set(pool["uri"]) == files - set(df["uri"])                     # exactly the files in no split
    tr = np.bincount(df[df["split"] == "train"]["label"], minlength=3)
    assert (np.bincount(pool["label"], minlength=3) == tr.max() - tr).all()
    assert all(pool["class_name"] == pool["uri"].map(lambda u: u.split("/")[-2]))  # right labels

    flat = RunDir(tmp_path / "flat")
    build_manifest(DataConfig(dataset="imagefolder", root=root, profile="none", image_size=12), flat)
    assert "profile is 'none'" in heldout_reason(flat) and heldout_pool(flat).empty


def test_oracle_generator_hands_out_the_pool_once_then_repeats(digits_run_copy):
    from tailforge.gen import GENERATORS, GenerateConfig, Shard
    from tailforge.gen.planner import plan_run, PlanConfig, Plan

    run = digits_run_copy
    plan_run(run, PlanConfig(target="balance", overgen=1.5))
    g = GENERATORS["oracle"](run, GenerateConfig(generator="oracle", seed=3), run.dataset_info())
    g.prepare(Plan.load(run))
    pool = heldout_pool(run)
    c = int(pool["label"].value_counts().idxmin())
    n = int((pool["label"] == c).sum())
    rows = pd.DataFrame(g.run_shard(Shard("oracle", c, str(c), 0, n + 3), run.root))
    assert len(rows) == n + 3 and (rows["label"] == c).all() and (rows["source"] == "oracle").all()
    assert set(rows["uri"][:n]) == set(pool.loc[pool["label"] == c, "uri"])  # every held-back image once ...
    assert rows["uri"][n:].isin(rows["uri"][:n]).all()                       # ... then repeats
    assert rows["sample_id"].is_unique


# --------------------------------------------------------------------------- the same budget

def test_oracle_and_headroom_arms_take_the_recipe_and_budget_of_the_other_arms():
    from tailforge.flows.config import load_config

    cfg = load_config()  # the embedded default: small-images recipe, class-balanced backbone
    (bb_o, o), (bb_r, r) = cfg.oracle_trainings(), cfg.arm_trainings("rebalanced", "filtered", "ddpm")
    assert (bb_o[0], o[0]) == ("backbone-oracle", "oracle")
    assert o[1].synthetic_source == bb_o[1].synthetic_source == "oracle" and o[1].base == "backbone-oracle"
    drop = lambda c: {k: v for k, v in c.model_dump().items() if k not in ("synthetic_source", "base")}  # noqa: E731
    assert drop(o[1]) == drop(r[1]) and drop(bb_o[1]) == drop(bb_r[1])
    assert bb_o[1].epoch_samples == "real" and o[1].epoch_samples == "balanced"  # steps of the real data
    (bb_h, h), = [cfg.headroom_trainings(0.5)]
    assert h[1].tail_fraction == bb_h[1].tail_fraction == 0.5 and h[1].base == bb_h[0]
    ro = cfg.real_only_train()
    assert {k: v for k, v in h[1].model_dump().items() if k not in ("tail_fraction", "base")} == \
        {k: v for k, v in ro.model_dump().items() if k not in ("tail_fraction", "base")}
    # a head-level oracle (the pretrained recipe: no backbone of its own) gets head-level learning-curve points:
    # the thinned heads sit on the real-only arm's backbone, as the oracle's head does
    pre = load_config("flows/recipes/pretrained.yaml")
    (name, o), = pre.oracle_trainings()
    (tag, h), = pre.headroom_trainings(0.5)
    assert tag == "headroom-f50" and h.base == o.base == pre.real_only_train().base == pre.crt_base
    assert h.tail_fraction == 0.5


def test_tail_fraction_thins_the_topped_up_classes_at_the_same_steps(digits_run_copy, one_torch_thread):
    import json

    from tailforge.gen.planner import PlanConfig, plan_run
    from tailforge.train import fit
    from tailforge.train.config import TrainConfig

    run = digits_run_copy
    plan_run(run, PlanConfig(target="balance"))
    base = dict(model="tiny", width=4, epochs=1, batch_size=32, hflip=False, sampler="class_balanced",
                epoch_samples="real")
    fit(run, TrainConfig(**base), "full")
    fit(run, TrainConfig(**base, tail_fraction=0.5), "half")
    meta = {m: json.loads((run.model_dir(m) / "config.json").read_text())["meta"] for m in ("full", "half")}
    full, half = (np.asarray(meta[m]["train_counts"]) for m in ("full", "half"))
    top = full == full.max()
    assert (half[top] == full[top]).all()                              # the largest class keeps every image
    assert np.allclose(half[~top], np.maximum(2, np.round(0.5 * full[~top])), atol=1)
    assert meta["half"]["steps_per_epoch"] == meta["full"]["steps_per_epoch"]  # same optimizer steps


# --------------------------------------------------------------------------- the estimators

def test_room_and_capture_decides_by_the_interval_not_the_sign():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 200)
    control = np.where(rng.random(len(y)) < 0.8, y, (y + 1) % 4)       # 80 % right
    oracle = np.where(rng.random(len(y)) < 0.5, y, control)            # fixes about half of the errors
    same = control.copy()
    flip = np.flatnonzero(control != y)[:1]
    same[flip] = y[flip]                                                # one image better: noise
    sets = class_sets([100, 50, 20, 10])
    res = room_and_capture(y, {"c": control, "t": same, "o": oracle}, "c", "t", "o", sets, 4, b=500)
    bal = res["balanced"]
    assert bal["room"]["verdict"] == "helped" and bal["room"]["low"] > 0
    assert bal["gain"]["verdict"] == "within noise" and bal["gain"]["value"] > 0
    assert 0 < bal["captured"]["value"] < 0.1
    res2 = room_and_capture(y, {"c": control, "t": oracle}, "c", "t", None, sets, 4, b=500)
    assert res2["balanced"]["gain"]["verdict"] == "helped" and "captured" not in res2["balanced"]


@pytest.mark.parametrize("fit", ["power", "log"])
def test_estimate_room_recovers_a_known_learning_curve(fit):
    """Classes whose val error follows e(n) = e1 (n / n1)^-0.5: the estimate of a top-up is the curve's value."""
    rng = np.random.default_rng(1)
    counts = np.array([400, 100, 25, 25])
    need = counts.max() - counts
    e1 = np.array([0.05, 0.2, 0.3, 0.3])
    n_val = 2000
    y = np.repeat(np.arange(4), n_val)

    def preds(f):
        err = e1.copy()
        err[need > 0] = e1[need > 0] * f ** -0.5
        wrong = rng.random(len(y)) < err[y]
        return np.where(wrong, (y + 1) % 4, y)

    res = estimate_room(y, {1.0: preds(1.0), 0.5: preds(0.5), 0.25: preds(0.25)}, counts, need, fit=fit, b=50)
    m = (counts + need) / counts
    truth = 100 * np.mean(np.where(need > 0, e1 * (1 - m ** -0.5), 0))
    if fit == "power":
        assert res["param"] == pytest.approx(0.5, abs=0.08)
        assert res["room"] == pytest.approx(truth, abs=1.0)
    assert res["low"] <= res["room"] <= res["high"] and res["room"] > 0
    assert res["groups"]["rarest"]["room"] > res["room"]  # the rarest classes gain most


def test_signed_fit_has_no_upward_lean_on_a_flat_curve_and_calibration_scales_and_widens():
    """No class gains from more data (the thinned models are as good): the clipped exponent can only lean up,
    the signed one averages out around 0, and its interval can reach below 0."""
    counts = np.array([400, 50, 50, 50, 50, 50, 50])
    need = counts.max() - counts
    n_val = 60
    y = np.repeat(np.arange(len(counts)), n_val)
    clipped, signed = [], []
    for seed in range(12):
        rng = np.random.default_rng(seed)

        def preds():
            wrong = rng.random(len(y)) < 0.2
            return np.where(wrong, (y + 1) % len(counts), y)

        p = {1.0: preds(), 0.5: preds()}
        clipped.append(estimate_room(y, p, counts, need, fit="power-span", b=40)["room"])
        e = estimate_room(y, p, counts, need, fit="power-span", b=40, signed=True)
        signed.append(e["room"])
        assert e["low"] <= e["room"] <= e["high"]
    assert min(clipped) >= 0 and np.mean(clipped) > 0.3
    assert min(signed) < 0 < max(signed) and abs(np.mean(signed)) < np.mean(clipped) / 2
    cal = estimate_room(y, p, counts, need, fit="power-span", b=40, signed=True, calibration=(0.5, 3.0))
    raw = cal["raw"]
    assert cal["room"] == pytest.approx(0.5 * raw["room"])
    half = (cal["high"] - cal["low"]) / 2
    assert half == pytest.approx(3.0 * (raw["high"] - raw["low"]) / (2 * 1.6449))
    assert cal["calibration"] == {"scale": 0.5, "spread": 3.0}


def test_per_class_gains_rank_the_classes_and_price_other_quotas():
    """Known power-law curves, classes of one size with different errors: the per-class estimates rank them by
    their true gains, and curve_gains prices the plan's quota as the estimate did."""
    from tailforge.eval.room import curve_gains, per_class_rank

    rng = np.random.default_rng(3)
    counts = np.array([500, 50, 50, 50, 50, 50])
    need = counts.max() - counts
    e1 = np.array([0.02, 0.05, 0.1, 0.2, 0.3, 0.4])
    y = np.repeat(np.arange(6), 3000)

    def preds(f):
        err = np.where(need > 0, e1 * f ** -0.5, e1)
        return np.where(rng.random(len(y)) < err[y], (y + 1) % 6, y)

    res = estimate_room(y, {1.0: preds(1.0), 0.5: preds(0.5)}, counts, need, fit="power", b=30,
                        names=[f"c{i}" for i in range(6)])
    cls = res["classes"]
    assert [c["name"] for c in cls] == [f"c{i}" for i in range(6)] and not cls[0]["curve"] and cls[0]["gain"] == 0
    gains = [c["gain"] for c in cls[1:]]
    assert gains == sorted(gains) and all(c["low"] <= c["gain"] <= c["high"] for c in cls)
    assert np.allclose(100 * curve_gains(res, need), [c["gain"] for c in cls], atol=1e-6)
    m = (counts + need) / counts
    truth = 100 * e1 * (1 - m ** -0.5)
    ev = lambda acc: {"per_class": list(acc)}  # noqa: E731
    rank = per_class_rank(res, ev(1 - e1), ev(1 - e1 + truth / 100))
    assert rank["spearman"] == pytest.approx(1.0) and rank["classes"] == 5


def test_no_oracle_arm_says_why_in_one_line(tmp_path):
    from tailforge.flows.config import load_config
    from tailforge.flows.flows import oracle_blocker

    root = make_image_tree(tmp_path / "tree", {"a": 30, "b": 12, "c": 6}, size=(12, 12))
    cfg = load_config(None, {"run": str(tmp_path / "run"), "data": {"dataset": "imagefolder", "root": str(root),
                                                                   "profile": "none", "image_size": 12}})
    build_manifest(cfg.data, cfg.run_dir)
    why = oracle_blocker(cfg)
    assert "profile is 'none'" in why and "\n" not in why
    off = cfg.model_copy(update={"compare": cfg.compare.model_copy(update={"oracle": False})})
    assert "compare.oracle: false" in oracle_blocker(off)


def test_headroom_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from tailforge.flows.cli import main

    assert main(["headroom", "--run", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no config.yaml" in err and "fix:" in err
    assert main(["run", "--run", str(tmp_path / "r"), "--set", "compare.headroom_fractions=[0, 0.5]",
                 "--show-config"]) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err


def test_a_model_whose_training_data_changed_is_trained_again(digits_run_copy, one_torch_thread):
    """The oracle's re-filtered source (or any re-filtered data) must not be served by the old model."""
    import json

    from tailforge.data import write_manifest
    from tailforge.train import fit
    from tailforge.train.config import TrainConfig

    run = digits_run_copy
    real = read_manifest(run.real)
    tr = real[(real["split"] == "train") & (real["label"] == 9)].head(6)
    syn = tr.assign(sample_id="planted-" + tr["sample_id"], source="planted", accepted=[True] * 6)
    write_manifest(syn, run.filtered)
    cfg = TrainConfig(model="tiny", width=4, epochs=1, batch_size=32, hflip=False, synthetic="filtered")
    fit(run, cfg, "m")
    first = json.loads((run.model_dir("m") / "config.json").read_text())
    assert first["meta"]["train_counts"][9] == int((real[real["split"] == "train"]["label"] == 9).sum()) + 6
    fit(run, cfg, "m")  # same data: served as it is
    assert json.loads((run.model_dir("m") / "config.json").read_text()) == first
    write_manifest(syn.assign(accepted=[True] * 2 + [False] * 4), run.filtered)
    fit(run, cfg, "m")  # two synthetic rows left: trained again on them
    again = json.loads((run.model_dir("m") / "config.json").read_text())
    assert again["data"] != first["data"] and again["meta"]["train_counts"][9] == first["meta"]["train_counts"][9] - 4
