"""tailforge.eval.evaluate / eval.compare and the eval, compare, train CLI on a tiny digits model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tailforge import train
from tailforge.data import RunDir, TailforgeError, load_images, read_manifest
from tailforge.eval import compare, evaluate
from tailforge.eval.config import CompareConfig
from tailforge.eval.metrics import compute
from tailforge.flows.cli import main

FAST = dict(model="tiny", width=8, epochs=2, batch_size=64, lr=0.05, hflip=False)


@pytest.fixture(scope="module")
def run3(digits_run, tmp_path_factory):
    """Digits run with three trained models: ce (seeds 0, 1) and balanced softmax (seed 0)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads are far slower on the shared 2-core machine
    root = tmp_path_factory.mktemp("eval") / "digits"
    shutil.copytree(digits_run.root, root)
    run = RunDir(root)
    for name, over in (("ce-s0", {}), ("ce-s1", {"seed": 1}), ("bs-s0", {"loss": "balanced_softmax"})):
        train.fit(run, train.TrainConfig(**{**FAST, **over}), name)
    yield run
    torch.set_num_threads(before)


def test_evaluate_writes_metrics_and_plots(run3):
    res = evaluate(run3, "ce-s0", "test")
    out = run3.eval_dir / "ce-s0-test.json"
    assert json.loads(out.read_text())["top1"] == res["top1"]
    assert res["split"] == "test" and res["selected_on"]["split"] == "val"
    for p in res["plots"]:
        assert (run3.eval_dir / p).stat().st_size > 1000
    # the numbers are those of the model's own predictions on the test rows
    df = read_manifest(run3.real)
    te = df[df["split"] == "test"]
    model, meta = train.load_model(run3.model_dir("ce-s0"))
    probs = train.predict_proba(model, meta, load_images(te["uri"], run3.root, 1, (8, 8)))
    groups = json.loads(run3.counts.read_text())["groups"]
    ref = compute(te["label"].to_numpy(), probs, groups)
    for k in ("top1", "balanced_acc", "many", "medium", "few", "macro_f1", "ece", "mcc", "kappa"):
        assert res[k] == pytest.approx(ref[k]), k
    assert res["n"] == len(te) and len(res["per_class"]) == 10
    # the confusion matrix is sparse (its non-empty cells), the JSON one line per key, the classes in a CSV
    cm = res["confusion"]
    assert sum(cm["counts"]) == len(te) and len(cm["counts"]) <= len(te)
    pred = probs.argmax(1)
    for r, c, n in zip(cm["rows"], cm["cols"], cm["counts"]):
        assert n == int(((te["label"].to_numpy() == r) & (pred == c)).sum())
    assert len(out.read_text().splitlines()) == len(json.loads(out.read_text())) + 2
    import pandas as pd

    table = pd.read_csv(run3.eval_dir / "ce-s0-test-classes.csv")
    assert len(table) == 10 and table["support"].sum() == len(te)
    np.testing.assert_allclose(table["accuracy"], res["per_class"], atol=1e-4)


def test_plots_of_a_thousand_classes_and_long_names_are_binned_and_warn_nothing(tmp_path):
    """1,000 classes: the confusion plot bins classes (head -> tail) from the sparse cells; the per-class
    plot and the class histogram draw every class; 80-character names are shortened, no warning."""
    import warnings

    from tailforge.data import MeasureConfig
    from tailforge.data.measure import measure, plot_histogram
    from tailforge.eval import plots
    from tailforge.eval.metrics import compute

    rng = np.random.default_rng(0)
    for c in (1000, 12):
        counts = np.round(40 * (3 / 40) ** (np.arange(c) / (c - 1))).astype(int)
        names = [f"{i:05d}-" + "Longspecies name " * 5 for i in range(c)]
        y = np.repeat(np.arange(c), 2)
        pred = np.where(rng.random(len(y)) < 0.5, y, rng.integers(0, c, len(y)))
        m = compute(y, np.eye(c, dtype=np.float32)[pred])
        binned, order = plots.binned_confusion(m["confusion"], counts)
        assert binned.shape == (min(c, plots.MAX_MATRIX),) * 2 and np.allclose(binned.sum(1), 1)
        import pandas as pd

        df = pd.DataFrame({"label": np.repeat(np.arange(c), counts), "split": "train", "source": "real"})
        stats = measure(df, names, MeasureConfig(), dataset="many")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plots.confusion_matrix(m["confusion"], counts, names, tmp_path / f"cm{c}.png", "t")
            plots.per_class_accuracy(m["per_class"], counts.tolist(), stats.groups, names, tmp_path / f"pc{c}.png")
            plot_histogram(stats, tmp_path / f"h{c}.png")
        assert all((tmp_path / f"{k}{c}.png").stat().st_size > 5000 for k in ("cm", "pc", "h"))


def test_compare_mean_std_and_deltas(run3):
    evals = {m: evaluate(run3, m, "test", ) for m in ("ce-s0", "ce-s1", "bs-s0")}
    res = compare(run3, baseline="ce")
    ce, bs = res["methods"]["ce"], res["methods"]["bs"]
    vals = [evals["ce-s0"]["balanced_acc"], evals["ce-s1"]["balanced_acc"]]
    assert ce["n_seeds"] == 2 and ce["balanced_acc"]["mean"] == pytest.approx(np.mean(vals))
    assert ce["balanced_acc"]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert bs["delta"]["few"] == pytest.approx(evals["bs-s0"]["few"] - np.mean([evals[m]["few"]
                                                                                 for m in ("ce-s0", "ce-s1")]))
    md = (run3.eval_dir / "report.md").read_text()
    assert "| ce | 2 |" in md and "baseline `ce`" in md
    assert json.loads((run3.eval_dir / "compare.json").read_text())["baseline"] == "ce"
    with pytest.raises(TailforgeError, match="baseline 'nope'"):
        compare(run3, baseline="nope")
    with pytest.raises(TailforgeError, match=r"unknown metric 'balanced_ac'.*did you mean 'balanced_acc'"):
        compare(run3, cfg=CompareConfig(metrics=["top1", "balanced_ac"]))
    # one method: no empty delta table that reads as "no difference"
    one = compare([f"{run3.root}:ce-s0", f"{run3.root}:ce-s1"])
    assert list(one["methods"]) == ["ce"] and "Deltas" not in one["markdown"]
    assert "one method only" in one["markdown"]


def test_cli_eval_compare_train(run3, capsys, tmp_path):
    assert main(["eval", "--run", str(run3.root), "--model-name", "bs-s0", "--split", "val", "--no-plots"]) == 0
    res = json.loads((run3.eval_dir / "bs-s0-val.json").read_text())
    assert res["split"] == "val" and res["plots"] == []
    assert main(["compare", str(run3.root), "--split", "val", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").exists()
    # a run's own config.yaml names the section `evaluate:`; it is read, not ignored
    (tmp_path / "run.yaml").write_text("data:\n  dataset: digits\nevaluate:\n  split: train\n  plots: false\n")
    assert main(["eval", "--run", str(run3.root), "--model-name", "bs-s0", "--config",
                 str(tmp_path / "run.yaml")]) == 0
    assert json.loads((run3.eval_dir / "bs-s0-train.json").read_text())["split"] == "train"
    assert main(["eval", "--run", str(run3.root), "--model-name", "bs-s0", "--device", "banana"]) == 2
    assert "unknown device 'banana'" in capsys.readouterr().err
    assert main(["eval", "--run", str(run3.root), "--model-name", "missing"]) == 2
    assert main(["train", "--run", str(run3.root), "--loss", "focl"]) == 2
    err = capsys.readouterr().err
    assert "model 'missing' is not trained" in err and "did you mean 'focal'" in err
    cfg = tmp_path / "t.yaml"
    cfg.write_text("train:\n  model: tiny\n  width: 8\n  epochs: 1\n  batch_size: 64\n  hflip: false\n")
    assert main(["train", "--run", str(run3.root), "--config", str(cfg), "--name", "yaml-s0", "--lr", "0.02"]) == 0
    saved = json.loads((run3.model_dir("yaml-s0") / "config.json").read_text())["train"]
    assert saved["epochs"] == 1 and saved["lr"] == 0.02 and saved["width"] == 8
    cfg.write_text("trian:\n  epochs: 1\n")  # a misspelt section is named, not read as train keys
    assert main(["train", "--run", str(run3.root), "--config", str(cfg), "--name", "typo"]) == 2
    assert "unknown section 'trian'" in capsys.readouterr().err and not run3.model_dir("typo").exists()


def test_a_base_network_stronger_on_val_than_every_head_is_a_second_control(run3, tmp_path):
    """candidates.json scores the frozen base network's own head beside the re-trained heads; where it is the
    stronger real-only model on VAL, the report measures the treated arm against it too, with an interval."""
    from tailforge.train.heads import choose

    run = RunDir(shutil.copytree(run3.root, tmp_path / "digits"))  # a copied run: its own files are read, not run3's
    val = {m: json.loads((run.model_dir(m) / "best.json").read_text())["val_balanced_acc"] for m in ("ce-s0", "bs-s0")}
    if val["ce-s0"] == val["bs-s0"]:
        pytest.skip("the two models tie on val: no stronger one to test with")
    weak, strong = sorted(val, key=val.get)
    res = choose(run, {"crt": weak}, reference=strong)
    assert res["reference"] == {"model": strong, "val_balanced_acc": val[strong], "above": True}
    assert choose(run, {"crt": strong}, reference=weak)["reference"]["above"] is False
    choose(run, {"crt": weak}, reference=strong)
    out = compare(run, names=[weak, "ce-s1", strong], lead=(weak, "ce-s1"))
    md = out["markdown"]
    assert "**Against the strongest real-only model on VAL:**" in md and f"`{strong}`" in md
    g = out["room"]["against_reference"]
    ev = {m: json.loads((run.eval_dir / f"{m}-test.json").read_text())["balanced_acc"] for m in ("ce-s1", strong)}
    assert g["model"] == strong and g["value"] == pytest.approx(100 * (ev["ce-s1"] - ev[strong]), abs=1e-6)
    assert g["low"] <= g["value"] <= g["high"] and f"scored {100 * val[strong]:.2f}" in md
