"""The manifest: one Parquet table per stage output, one row per sample.

Required columns (every manifest): ``sample_id, uri, label, class_name, split, source``.
Optional columns are added by later stages: generator parameters (``seed, prompt, strength,
parent_id, generator``), filter scores (``score_*``), ``accepted`` and ``reason``.

``uri`` is a path relative to the run folder (or absolute), optionally with ``#<row>`` to
address one row of a ``.npy`` array (array-backed datasets, feature shards).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from .atomic import atomic_path
from .errors import TailforgeError

REQUIRED = ("sample_id", "uri", "label", "class_name", "split", "source")
SPLITS = ("train", "val", "test")
SOURCES = ("real", "sd", "sd-img2img", "ddpm", "featdict", "featcov", "fdiff")  # real + the built-in generators' sources
FEATURE_SOURCES = ("featdict", "featcov", "fdiff")  # their samples are feature vectors (uri ``path.npy#row``)
# a generator added later names its own source (docs/architecture.md): any lower-case name
SOURCE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def validate(df: pd.DataFrame, what: str = "manifest") -> pd.DataFrame:
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise TailforgeError(
            f"{what} lacks column(s) {', '.join(missing)}",
            f"a manifest needs the columns {', '.join(REQUIRED)}",
        )
    bad_split = set(df["split"].unique()) - set(SPLITS)
    if bad_split:
        raise TailforgeError(f"{what} has unknown split(s) {sorted(bad_split)}", f"use {', '.join(SPLITS)}")
    bad_src = [s for s in df["source"].unique() if not (isinstance(s, str) and SOURCE_NAME.fullmatch(s))]
    if bad_src:
        raise TailforgeError(f"{what} has invalid source(s) {sorted(map(repr, bad_src))}",
                             f"a source is real or a generator's name in lower case ({', '.join(SOURCES[1:])}, ...)")
    if df["sample_id"].duplicated().any():
        dup = df.loc[df["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise TailforgeError(f"{what} has duplicate sample_id '{dup}'", "sample ids must be unique")
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate and write ``df`` atomically as Parquet."""
    validate(df, str(path))
    df = df.reset_index(drop=True)
    df["label"] = df["label"].astype("int64")
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise TailforgeError(f"manifest {path} does not exist", "run the stage that writes it first")
    return validate(pd.read_parquet(path), str(path))


def train_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows usable for training: the train split, with synthetic rows only if accepted."""
    df = df[df["split"] == "train"]
    if "accepted" in df.columns:
        keep = (df["source"] == "real") | df["accepted"].fillna(False).astype(bool)
        df = df[keep]
    return df


def is_feature(df) -> "np.ndarray":
    """Rows whose sample is a feature vector of a classifier's backbone, not an image: bool array.

    A feature generator names itself in ``FEATURE_SOURCES`` or writes the ``feature_model`` column."""
    import numpy as np

    if not len(df):
        return np.zeros(0, bool)
    out = df["source"].isin(FEATURE_SOURCES).to_numpy(dtype=bool).copy()
    if "feature_model" in df.columns:
        out |= df["feature_model"].notna().to_numpy(dtype=bool) & (df["source"] != "real").to_numpy(dtype=bool)
    return out
