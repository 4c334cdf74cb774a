"""Sharding, per-sample seeds and candidate rows, shared by every generator (the ``generate`` driver
that runs them is ``driver.py``, above the generators).

A shard is one class and an index range ``[start, stop)`` of that class's planned samples (at most
``shard_size`` of them). Work is handed out in units, not shards (``make_units``): consecutive shards, in
plan order, add up to about ``shard_size`` samples per unit, so 8,000 classes of 20 samples make about as
many units as 300 classes of 512 (a large quota is split into shards of ``shard_size``, a unit of its own
each). One Prefect task or one ``--shard i/n`` slice is a list of units.

A unit is written as ONE folder, ``synthetic/<gen>/<unit folder>/``, through
``tailforge.data.atomic_dir``: it appears complete or not at all, so Ctrl-C mid-unit leaves only a
``.tmp-*`` folder that the next run removes. A unit of one shard is the shard's own folder
(``c0012-000000-000512/``: files + ``rows.parquet``); a unit of several small shards packs them,
``c0012-000000-000031+29/`` with one sub-folder of files per shard and one ``rows.parquet`` and integrity
record for all (``Unit.folder``). So the fixed cost per folder (a parquet file, an integrity record, a
rename, and a read when candidates are collected) is paid per unit, not per class: 8,142 classes cost
what their samples cost. A folder with ``rows.parquet`` whose files match its ``.integrity.json`` is
finished and is skipped on re-run; a damaged one is generated again. Folders of an older layout (one per
shard) still count as finished. Every step over the units is linear in their number: the generator
folder is listed once (``clean_partial``, ``finished_folders``), never once per shard.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
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


@dataclass(frozen=True)
class Unit:
    """One unit of work: consecutive shards of about ``shard_size`` samples in all (one Prefect task)."""
    index: int
    shards: tuple[Shard, ...]

    @property
    def id(self) -> str:
        return f"u{self.index:05d}"

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def folder(self) -> str:
        """The unit's folder under ``synthetic/<gen>/``: the shard id for a unit of one shard (as the layout
        of one folder per shard had it), ``<first shard id>+<number of shards>`` for a packed unit (a shard
        is in exactly one unit, so the name is unique; a new plan makes new names)."""
        first = self.shards[0].id
        return first if len(self.shards) == 1 else f"{first}+{len(self.shards)}"

    def shard_dir(self, shard: Shard) -> str:
        """Where ``shard``'s files go, relative to ``synthetic/<gen>/``."""
        return self.folder if len(self.shards) == 1 else f"{self.folder}/{shard.id}"

    def describe(self) -> str:
        """``u00003 (c0012-000000-000031 .. c0040-000000-000012, 29 shards)``: what the UI shows."""
        a, b = self.shards[0].id, self.shards[-1].id
        return f"{self.id} ({a})" if a == b else f"{self.id} ({a} .. {b}, {len(self.shards)} shards)"


def make_units(shards: list[Shard], shard_size: int) -> list[Unit]:
    """Group consecutive shards into units of at most ``shard_size`` samples (a shard never exceeds
    ``shard_size``, so a full-size shard is a unit of its own). Deterministic: every worker that makes
    the units of the same plan and shard size gets the same list."""
    units, cur, n = [], [], 0
    for s in shards:
        if cur and n + s.size > shard_size:
            units.append(Unit(len(units), tuple(cur)))
            cur, n = [], 0
        cur.append(s)
        n += s.size
    if cur:
        units.append(Unit(len(units), tuple(cur)))
    return units


def plan_units(plan: Plan, generator: str, shard_size: int) -> list[Unit]:
    return make_units(make_shards(plan, generator, shard_size), shard_size)


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


def clean_partial(gen_dir: Path, units: list[Unit]) -> None:
    """Remove temp folders left by an interrupted (killed) run of these units.

    Only this worker's units: another worker (``--shard j/n``) may be writing its own right now.
    The folder is listed once (a temp folder is ``.tmp-<unit folder>-<random letters, digits, _>``).
    """
    if not gen_dir.is_dir():
        return
    ids = {u.folder for u in units} | {s.id for u in units for s in u.shards}  # and the one-folder-per-shard layout
    with os.scandir(gen_dir) as it:
        for e in it:
            if e.name.startswith(".tmp-") and e.name[5:].rsplit("-", 1)[0] in ids:
                shutil.rmtree(e.path, ignore_errors=True)


def finished_folders(gen_dir: Path) -> set[str]:
    """Names of the unit (or older shard) folders with ``rows.parquet`` (finished unless damaged;
    ``shard_done`` checks the files), from one listing of the generator folder."""
    if not gen_dir.is_dir():
        return set()
    with os.scandir(gen_dir) as it:
        names = [e.name for e in it if not e.name.startswith(".") and e.is_dir()]
    return {n for n in names if (gen_dir / n / ROWS).is_file()}


_UNIT = threading.local()


def shard_dir(shard: Shard) -> str:
    """The folder of ``shard``'s files under ``synthetic/<gen>/`` while ``run_unit`` runs it in this thread
    (its unit's folder, or a sub-folder of a packed unit); the shard id otherwise."""
    return getattr(_UNIT, "dirs", {}).get(shard.id, shard.id)


def unit_done(gen_dir: Path, unit: Unit, there: set[str] | None = None) -> bool:
    """The unit's folder is finished and undamaged, or (a run folder written one folder per shard) each of
    its shards' folders is. ``there``: ``finished_folders(gen_dir)``, to look nothing up that is absent."""
    def ok(name: str) -> bool:
        return (there is None or name in there) and shard_done(gen_dir / name)

    if ok(unit.folder):
        return True
    return len(unit.shards) > 1 and all(ok(s.id) for s in unit.shards)


def run_unit(gen, unit: Unit, gen_dir: Path, after: Callable[[Shard, float], None] | None = None,
             there: set[str] | None = None) -> int:
    """Generate ``unit`` into its folder (``Unit.folder``), atomically, its shards in order.
    Returns the number of samples generated (0: the unit was already finished). ``after(shard,
    seconds)`` is called after each generated shard."""
    from tailforge.data import atomic_dir

    if unit_done(gen_dir, unit, there):
        return 0
    # the generator's URIs (Generator.uri -> shard_dir) name the folder each shard's files go to; per thread:
    # the flow's thread runner runs several units at once on one generator
    _UNIT.dirs = {s.id: unit.shard_dir(s) for s in unit.shards}
    rows: list[dict] = []
    try:
        with atomic_dir(gen_dir / unit.folder) as tmp:
            for s in unit.shards:
                t0 = time.perf_counter()
                out = tmp if len(unit.shards) == 1 else tmp / s.id
                out.mkdir(exist_ok=True)
                got = gen.run_shard(s, out)
                if len(got) != s.size:  # a generator bug, not a user error
                    raise RuntimeError(f"{s.generator} produced {len(got)} rows for shard {s.id} of size {s.size}")
                rows += got
                if after:
                    after(s, time.perf_counter() - t0)
            write_rows(rows, tmp / ROWS)
    finally:
        _UNIT.dirs = {}  # this unit's folders only while it runs
    return unit.size


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in CANDIDATE_COLUMNS:
        if col not in df.columns:
            df[col] = None
    front = [c for c in CANDIDATE_COLUMNS]
    return df[front + [c for c in df.columns if c not in front]]


def write_rows(rows: list[dict], path: Path) -> None:
    """A shard's rows as parquet, straight through pyarrow (CANDIDATE_COLUMNS first): a pandas frame per
    shard costs ten times as much, and a run of 8,000 classes writes 8,000 shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    extra = list(dict.fromkeys(k for r in rows for k in r if k not in CANDIDATE_COLUMNS))
    cols = {c: [r.get(c) for r in rows] for c in [*CANDIDATE_COLUMNS, *extra]}
    pq.write_table(pa.table(cols), path)


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    syn = run.root / "synthetic"
    # a source view (run.source) collects its own generator's shards; the run's own candidates every other's
    pattern = f"{run.source}/*/{ROWS}" if run.source else f"*/*/{ROWS}"
    others = set(run.sources()) if not run.source else set()
    files = [p for p in sorted(syn.glob(pattern)) if not p.parent.name.startswith(".")
             and p.parent.parent.name not in others] if syn.is_dir() else []
    if not files:
        return rows_frame([])
    # one arrow concat, not a pandas concat of thousands of small frames (one per shard); pyarrow reads
    # in threads without the GIL
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        tables = list(pool.map(pq.read_table, files))
    table = pa.concat_tables(tables, promote_options="default")
    df = table.replace_schema_metadata(None).to_pandas()  # shards written by pandas carry an index record
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


_TRAIN_ROWS: dict[tuple, dict] = {}  # manifest version -> {"df": real train rows, label: row positions}
_TRAIN_LOCK = threading.Lock()  # thread-runner tasks share the cache


def class_rows(run: RunDir, label: int) -> pd.DataFrame:
    """Real train rows of one class (exemplars for img2img). The manifest is read and grouped by class
    once per process and manifest version, not once per shard (thousands of classes)."""
    from tailforge.data import read_manifest

    path = run.require(run.real, "measure")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _TRAIN_LOCK:
        if key not in _TRAIN_ROWS:
            df = read_manifest(path)
            df = df[(df["split"] == "train") & (df["source"] == "real")].reset_index(drop=True)
            _TRAIN_ROWS.clear()
            _TRAIN_ROWS[key] = {"df": df, **{int(k): v for k, v in df.groupby("label").indices.items()}}
        got = _TRAIN_ROWS[key]
    return got["df"].iloc[got.get(int(label), np.zeros(0, np.int64))].reset_index(drop=True)


def to_uint8(x) -> np.ndarray:
    """float images in [-1, 1], N x C x H x W (torch) -> uint8 N x H x W x C."""
    import torch

    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
