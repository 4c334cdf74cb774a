"""Build the real manifest of a run: load the dataset, split it, make the train split long-tailed."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .atomic import atomic_path, read_json, write_json, write_text
from .config import DataConfig
from .datasets import RawDataset, load_dataset
from .errors import TailforgeError
from .longtail import make_long_tailed, stratified_split
from .manifest import read_manifest, write_manifest
from .run import RunDir

DEFAULT_FOLDER_SIZE = 64


def _split_indices(raw: RawDataset, cfg: DataConfig) -> dict[str, tuple[str, np.ndarray]]:
    """Map our split name -> (official split it comes from, indices into it), before long-tail."""
    s = raw.splits
    if "all" in s:
        tr, va, te = stratified_split(s["all"].labels, cfg.split, cfg.seed)
        return {"train": ("all", tr), "val": ("all", va), "test": ("all", te)}
    out = {"train": ("train", np.arange(len(s["train"])))}
    if "val" in s and "test" in s:
        out["val"] = ("val", np.arange(len(s["val"])))
        out["test"] = ("test", np.arange(len(s["test"])))
    else:
        # Hold out part of the official (balanced) test set, stratified, for model selection; where a dataset
        # publishes no test labels (iNaturalist), its val set plays the test set's part.
        held = "test" if "test" in s else "val"
        te, va = stratified_split(s[held].labels, (1 - cfg.val_from_test, cfg.val_from_test), cfg.seed)
        out["val"], out["test"] = (held, va), (held, te)
    return out


def build_manifest(cfg: DataConfig, run: RunDir, raw: RawDataset | None = None) -> pd.DataFrame:
    """Write ``real.parquet``, ``dataset.json`` (and the image arrays) into the run folder.

    Re-running with the same settings reuses what is there; a run folder made from other
    settings is refused so that nothing is overwritten.
    """
    fp = cfg.fingerprint()
    if run.dataset.exists() and run.real.exists():
        old = read_json(run.dataset)
        if old.get("fingerprint") != fp:
            diff = [k for k in fp if old.get("fingerprint", {}).get(k) != fp[k]]
            raise TailforgeError(
                f"run folder {run.root} already holds a manifest of dataset '{old.get('name')}' built with "
                f"other settings ({', '.join(diff)})",
                "choose a new --run folder (or delete this one to rebuild it)",
            )
        return read_manifest(run.real)

    raw = raw or load_dataset(cfg)
    parts = _split_indices(raw, cfg)
    origin, tr = parts["train"]
    lt = make_long_tailed(raw.splits[origin].labels[tr], raw.num_classes, cfg.imbalance, cfg.profile,
                          cfg.class_order, cfg.seed, cfg.step_fraction)
    parts["train"] = (origin, tr[lt])

    train_counts = np.bincount(raw.splits[origin].labels[parts["train"][1]], minlength=raw.num_classes)
    empty = [raw.class_names[c] for c in np.flatnonzero(train_counts == 0)]
    if empty:
        raise TailforgeError(
            f"class(es) {', '.join(repr(e) for e in empty[:5])} have 0 training images after long-tail "
            f"construction (imbalance {cfg.imbalance:g}, largest class {train_counts.max()})",
            f"lower --imbalance to at most {train_counts.max()} or use --profile none",
        )

    rows = []
    for split in ("train", "val", "test"):
        src, idx = parts[split]
        rs = raw.splits[src]
        for i in idx:
            i = int(i)
            if rs.images is not None:
                uri, sid = f"data/{src}.npy#{i}", f"{raw.name}-{src}-{i:06d}"
            else:
                uri = rs.files[i]
                sid = f"{raw.name}-{src}-{i:06d}"
            lab = int(rs.labels[i])
            rows.append((sid, uri, lab, raw.class_names[lab], split, "real"))
    df = pd.DataFrame(rows, columns=["sample_id", "uri", "label", "class_name", "split", "source"])

    run.root.mkdir(parents=True, exist_ok=True)
    for src, rs in raw.splits.items():
        if rs.images is not None:
            with atomic_path(run.data_dir / f"{src}.npy") as tmp:
                np.save(tmp, np.ascontiguousarray(rs.images))
    if raw.skipped:
        write_text(run.root / "skipped.txt", "\n".join(raw.skipped) + "\n")
    size = raw.image_size
    if cfg.image_size is not None:
        size = (cfg.image_size, cfg.image_size)
    elif size is None:
        size = (DEFAULT_FOLDER_SIZE, DEFAULT_FOLDER_SIZE)
    info = {
        "name": raw.name,
        "root": raw.root,
        "num_classes": raw.num_classes,
        "class_names": raw.class_names,
        "channels": raw.channels,
        "image_size": list(size),
        "skipped": len(raw.skipped),
        "fingerprint": fp,
    }
    write_manifest(df, run.real)  # manifest first: dataset.json marks the stage done
    write_json(run.dataset, info)
    return df
