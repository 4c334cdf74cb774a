"""The real train images a run's long tail held back: the pool of a perfect generator.

``tailforge.data.build`` makes the train split long-tailed by keeping a seeded subset of each class
(``make_long_tailed``). The rest of each class's train images exist on disk but are in no split. They
are what a generator that had learnt the class exactly would draw, so the ``oracle`` source
(gen/oracle.py) hands them to the rebalanced path as its top-up, and ``room = oracle - real-only``
bounds what any synthetic data can add to the recipe at its budget.

The pool is recomputed, not remembered: the same loader, split and long-tail construction that built
``real.parquet`` (all deterministic in ``data.seed``) give the kept indices again, and the pool is the
rest of the train origin. Val and test images are never in it. Nothing is copied: pool rows point at
the real files (image folders) or rows of the run's ``data/<split>.npy`` (array datasets).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .atomic import read_json
from .build import _split_indices
from .config import DataConfig
from .datasets import load_dataset
from .longtail import make_long_tailed
from .run import RunDir

POOL_COLUMNS = ["uri", "label", "class_name", "parent_id"]


def heldout_reason(run: RunDir) -> str | None:
    """Why the run has no held-back real images (one line), or None when it may have some."""
    fp = read_json(run.require(run.dataset, "measure")).get("fingerprint", {})
    if fp.get("profile") == "none":
        return ("data.profile is 'none': the train split is used as it is, so no real train images were held back "
                "and there is no oracle arm (`tailforge headroom` estimates the room instead)")
    if fp.get("imbalance", 1) <= 1 and fp.get("profile") == "exp":
        return "data.imbalance is 1: no train image was dropped, so there is no oracle arm"
    return None


def heldout_pool(run: RunDir) -> pd.DataFrame:
    """Real train images of ``run``'s dataset that its long tail dropped: one row each, class by class in a
    fixed order (columns ``uri, label, class_name, parent_id``; ``parent_id`` is the image's real sample id)."""
    if heldout_reason(run) is not None:
        return pd.DataFrame(columns=POOL_COLUMNS)
    info = read_json(run.dataset)
    cfg = DataConfig(**{k: v for k, v in info["fingerprint"].items() if k in DataConfig.model_fields})
    raw = load_dataset(cfg)
    parts = _split_indices(raw, cfg)
    origin, tr = parts["train"]
    rs = raw.splits[origin]
    kept = tr[make_long_tailed(rs.labels[tr], raw.num_classes, cfg.imbalance, cfg.profile, cfg.class_order,
                               cfg.seed, cfg.step_fraction)]
    dropped = np.setdiff1d(tr, kept)
    labels = rs.labels[dropped].astype(np.int64)
    order = np.lexsort((dropped, labels))  # class by class, then by index: a stable order
    dropped, labels = dropped[order], labels[order]
    if rs.images is not None:
        uris = [f"data/{origin}.npy#{int(i)}" for i in dropped]
    else:
        uris = [rs.files[int(i)] for i in dropped]
    return pd.DataFrame({"uri": uris, "label": labels,
                         "class_name": [raw.class_names[c] for c in labels],
                         "parent_id": [f"{raw.name}-{origin}-{int(i):06d}" for i in dropped]})
