"""``evaluate``: metrics of one trained model on one split, written as JSON plus plots.

The JSON holds the metrics of ``tailforge.eval.metrics.compute`` at its top level (top1, balanced_acc, many, ...)
next to what was evaluated (model, split, run, train settings, the val epoch selected).

Outputs (in ``eval/``): ``<model>-<split>.json``, ``<model>-<split>-classes.csv`` (one row per class:
train images, support, predictions, accuracy, F1) and ``<model>-<split>-{confusion,per_class,
reliability}.png``. Every number in the JSON names the split it came from.

Sizes grow with the classes and the samples, not with the classes squared: the JSON's ``confusion`` is
sparse (``{"rows", "cols", "counts"}``: the non-empty cells, at most one per sample;
``tailforge.eval.metrics.dense`` makes the matrix of a small one), the JSON is written compactly (one
line per key), and past a few hundred classes the confusion plot bins the classes (head -> tail).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tailforge.data.atomic import atomic_path, read_json, write_json
from tailforge.data.classtable import write_csv
from tailforge.data.errors import TailforgeError
from tailforge.data.images import load_images
from tailforge.data.manifest import read_manifest
from tailforge.data.measure import ClassStats
from tailforge.data.run import RunDir

from .config import EvalConfig
from .metrics import calibration_bins, compute


def eval_path(run: RunDir, model_name: str, split: str) -> Path:
    return run.eval_dir / f"{model_name}-{split}.json"


def pred_path(run: RunDir, model_name: str, split: str) -> Path:
    """Predicted class of every image of the split, int32, in the manifest's row order (paired bootstraps)."""
    return run.eval_dir / f"{model_name}-{split}-pred.npy"


def load_pred(run: RunDir, model_name: str, split: str):
    """(true labels, predicted labels) of a model's evaluation, or None when it has no prediction file."""
    import numpy as np

    p = pred_path(run, model_name, split)
    if not p.exists():
        return None
    df = read_manifest(run.real)
    y = df[(df["split"] == split) & (df["source"] == "real")]["label"].to_numpy()
    pred = np.load(p)
    return (y, pred) if len(pred) == len(y) else None


def evaluate(run, model_name: str, split: str | None = None, cfg: EvalConfig | None = None, progress=None) -> dict:
    """Predict ``split`` of ``run`` with model ``model_name`` and write metrics and plots; returns the JSON dict."""
    from tailforge.train.checkpoint import load_model, predict_proba

    run = run if isinstance(run, RunDir) else RunDir(run)
    cfg = cfg or EvalConfig()
    split = split or cfg.split
    if split not in ("train", "val", "test"):
        raise TailforgeError(f"unknown split '{split}'", "use train, val or test")
    model_dir = run.model_dir(model_name)
    if not (model_dir / "config.json").exists():
        raise TailforgeError(f"model '{model_name}' is not trained in run {run.root}",
                             f"train it first (models here: {', '.join(run.models()) or 'none'})")
    info = run.dataset_info()
    stats = ClassStats.load(run)
    df = read_manifest(run.require(run.real, "measure"))
    rows = df[(df["split"] == split) & (df["source"] == "real")]
    if rows.empty:
        raise TailforgeError(f"run {run.root} has no {split} images", "evaluate another split")
    model, meta = load_model(model_dir, cfg.device)
    if meta["num_classes"] != info["num_classes"]:
        raise TailforgeError(f"model '{model_name}' has {meta['num_classes']} classes but the run has "
                             f"{info['num_classes']}", "evaluate it on the run it was trained on")
    images = load_images(rows["uri"], run.root, info["channels"], tuple(info["image_size"]))
    if progress:
        progress(0, len(rows), {"split": split})
    probs = predict_proba(model, meta, images, cfg.batch_size)
    if progress:
        progress(len(rows), len(rows), {"split": split})
    y = rows["label"].to_numpy()
    metrics = compute(y, probs, stats.groups, cfg.ece_bins)
    with atomic_path(pred_path(run, model_name, split)) as tmp:
        np.save(tmp, probs.argmax(1).astype(np.int32))
    train_cfg = read_json(model_dir / "config.json")["train"]
    best = read_json(model_dir / "best.json") if (model_dir / "best.json").exists() else None
    out = {
        **metrics,
        "model": model_name, "run": str(run.root), "split": split, "dataset": info["name"],
        "train": {k: train_cfg.get(k) for k in ("model", "loss", "sampler", "seed", "epochs", "synthetic",
                                                "synthetic_weight", "synthetic_source", "prior", "stage", "base", "teacher",
                                                "pretrained")},
        "selected_on": best,  # clip_adapter: also the blend with its zero-shot head, chosen on val
        "groups": stats.groups,
        "train_counts": meta.get("train_counts", stats.counts["train"]),
        "real_train_counts": stats.counts["train"],
        "class_names": info["class_names"],
        "calibration": calibration_bins(y, probs, cfg.ece_bins),
        "plots": [],
    }
    if cfg.plots:
        out["plots"] = _plots(run, model_name, split, out)
    write_json(eval_path(run, model_name, split), out, compact=True)
    write_csv(run.eval_dir / f"{model_name}-{split}-classes.csv", class_rows(out))
    return out


def class_rows(m: dict) -> list[dict]:
    """The per-class table of an evaluation (every class, in label order)."""
    rows = []
    for i, name in enumerate(m["class_names"]):
        acc = m["per_class"][i]
        rows.append({"label": i, "class_name": name, "group": m["groups"][i] if m.get("groups") else "",
                     "real_train": m["real_train_counts"][i], "train": m["train_counts"][i],
                     "support": m["support"][i], "predicted": m["predicted"][i],
                     "accuracy": "" if acc is None else round(acc, 4), "f1": round(m["per_class_f1"][i], 4)})
    return rows


def _plots(run: RunDir, model_name: str, split: str, out: dict) -> list[str]:
    from . import plots

    m = out
    stem = run.eval_dir / f"{model_name}-{split}"
    title = f"{model_name} on {split}: top-1 {m['top1']:.3f}, balanced {m['balanced_acc']:.3f}"
    real_counts = ClassStats.load(run).counts["train"]
    paths = [
        plots.confusion_matrix(m["confusion"], real_counts, out["class_names"], f"{stem}-confusion.png", title),
        plots.per_class_accuracy(m["per_class"], real_counts, out["groups"], out["class_names"],
                                 f"{stem}-per_class.png", title),
        plots.reliability(out["calibration"], f"{stem}-reliability.png",
                          f"{model_name} on {split}: ECE {m['ece']:.3f}"),
    ]
    return [p.name for p in paths]
