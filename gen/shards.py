"""Sharding, per-sample seeds and candidate rows, shared by every generator (the ``generate`` driver
that runs them is ``driver.py``, above the generators).

A shard is one class and an index range ``[start, stop)`` of that class's planned samples. It is
written as ``synthetic/<gen>/<shard-id>/`` (files + ``rows.parquet``) through ``tailforge.data.atomic_dir``:
the folder appears complete or not at all, so Ctrl-C mid-shard leaves only a ``.tmp-*`` folder that
the next run removes. A folder with ``rows.parquet`` whose files match its ``.integrity.json`` is
finished and is skipped on re-run; a damaged one is generated again.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from tailforge.data import RunDir, TailforgeError, atomic_path
from tailforge.data.manifest import REQUIRED, validate

from .planner import Plan

Progress = Callable[[int, int, dict], None]

CANDIDATE_COLUMNS = list(REQUIRED) + ["generator", "seed", "prompt", "strength", "parent_id", "shard", "index"]
ROWS = "rows.parquet"


@dataclass(frozen=True)
class Shard:
    generator: str
    label: int
    class_name: str
    start: int
    stop: int

    @property
    def id(self) -> str:
        return f"c{self.label:04d}-{self.start:06d}-{self.stop:06d}"

    @property
    def size(self) -> int:
        return self.stop - self.start

    def indices(self) -> range:
        return range(self.start, self.stop)


def sample_seed(run_seed: int, label: int, index: int) -> int:
    """Seed of one sample: a hash of (run seed, class, index), stable across machines and versions."""
    digest = hashlib.blake2b(f"tailforge:{run_seed}:{label}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_id(generator: str, seed: int, label: int, index: int) -> str:
    return f"{generator}-s{seed}-c{label:04d}-{index:06d}"


def make_shards(plan: Plan, generator: str, shard_size: int) -> list[Shard]:
    """All shards of a plan, class by class, in index order."""
    out = []
    for q in plan.classes:
        for start in range(0, q.generate, shard_size):
            out.append(Shard(generator, q.label, q.class_name, start, min(start + shard_size, q.generate)))
    return out


def parse_shard_spec(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise TailforgeError(f"shard spec '{spec}' is not of the form i/n", "pass e.g. --shard 0/4 (worker 0 of 4)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise TailforgeError(f"shard spec '{spec}' is out of range: i must be in 0..n-1",
                             f"pass --shard i/{max(n, 1)} with 0 <= i < {max(n, 1)}")
    return i, n


def shard_done(folder: Path) -> bool:
    """A finished shard: ``rows.parquet`` is there and every file matches the folder's record
    (``.integrity.json``, written by ``atomic_dir``). A damaged shard (a truncated PNG or feature file)
    is reported in one line and is not done, so it alone is generated again."""
    from tailforge.data.integrity import folder_ok

    if not (folder / ROWS).is_file():
        return False
    return folder_ok(folder, f"shard {folder.name}", show_root=folder.parent.parent.parent)


def clean_partial(gen_dir: Path, shards: list[Shard]) -> None:
    """Remove temp folders left by an interrupted (killed) run of these shards.

    Only this worker's shards: another worker (``--shard j/n``) may be writing its own right now.
    """
    for s in shards:
        for p in gen_dir.glob(f".tmp-{s.id}-*"):
            shutil.rmtree(p, ignore_errors=True)


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in CANDIDATE_COLUMNS:
        if col not in df.columns:
            df[col] = None
    front = [c for c in CANDIDATE_COLUMNS]
    return df[front + [c for c in df.columns if c not in front]]


def base_row(shard: Shard, index: int, run_seed: int, source: str, uri: str) -> dict:
    seed = sample_seed(run_seed, shard.label, index)
    return {"sample_id": sample_id(shard.generator, run_seed, shard.label, index), "uri": uri,
            "label": shard.label, "class_name": shard.class_name, "split": "train", "source": source,
            "generator": shard.generator, "seed": seed, "prompt": None, "strength": None, "parent_id": None,
            "shard": shard.id, "index": index}


def collect_candidates(run: RunDir, plan: Plan | None = None) -> pd.DataFrame:
    """Union of the rows of every finished shard of every generator, in a stable order.

    With ``plan``, rows beyond the plan's quota of their class (shards left over from an older,
    larger plan) are left out, and a sample present in two shards (an older shard size) counts once.
    """
    frames = []
    syn = run.root / "synthetic"
    # a source view (run.source) collects its own generator's shards; the run's own candidates every other's
    pattern = f"{run.source}/*/{ROWS}" if run.source else f"*/*/{ROWS}"
    others = set(run.sources()) if not run.source else set()
    if syn.is_dir():
        for rows in sorted(syn.glob(pattern)):
            if rows.parent.name.startswith(".") or rows.parent.parent.name in others:
                continue
            frames.append(pd.read_parquet(rows))
    if not frames:
        return rows_frame([])
    df = pd.concat(frames, ignore_index=True)
    if plan is not None:
        quota = {q.label: q.generate for q in plan.classes}
        df = df[df["index"].astype(int) < df["label"].map(quota).fillna(0).astype(int)]
    df = df.drop_duplicates("sample_id", keep="first")
    return df.sort_values(["generator", "label", "sample_id"], kind="stable").reset_index(drop=True)


def write_candidates(run: RunDir, df: pd.DataFrame) -> None:
    validate(df, "candidates")
    df = df.reset_index(drop=True)
    df["label"] = df["label"].astype("int64")
    with atomic_path(run.candidates) as tmp:
        df.to_parquet(tmp, index=False)


def quiet_hf() -> None:
    """Silence diffusers/transformers loading bars and advice (our own progress bar says what runs)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error(), dlog.disable_progress_bar()
    tlog.set_verbosity_error(), tlog.disable_progress_bar()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise TailforgeError(f"unknown device '{device}'", "pass --device auto, cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TailforgeError(f"device '{device}' asked for, but no CUDA GPU is available", "pass --device cpu")
    return device


def class_rows(run: RunDir, label: int) -> pd.DataFrame:
    """Real train rows of one class (exemplars for img2img)."""
    from tailforge.data import read_manifest

    df = read_manifest(run.require(run.real, "measure"))
    return df[(df["split"] == "train") & (df["source"] == "real") & (df["label"] == label)].reset_index(drop=True)


def to_uint8(x) -> np.ndarray:
    """float images in [-1, 1], N x C x H x W (torch) -> uint8 N x H x W x C."""
    import torch

    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
