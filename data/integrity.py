"""Outputs you can trust: what a stage wrote is recorded (path, size, mtime, fast hash) and checked
before the stage is served from the run folder again.

Two kinds of record:

* a stage stamp (``<run>/.flows/<task>.json``, see ``flows/tasks.py``) lists the files the stage
  relies on later (checkpoints, parquet tables, eval JSON) under ``"files"``;
* a folder written through ``atomic_dir`` (a generation shard, a model folder, the diffusion UNet)
  carries its own record, ``.integrity.json``, written just before the folder is renamed into place.

A check compares each recorded file with the disk. A missing file or another size is damage; so is
another content hash. How much is hashed on a check is set by ``TAILFORGE_VERIFY``:

``auto`` (default)
    stamp files are hashed (up to ``HASH_LIMIT`` bytes each; bigger ones are checked by size and
    mtime, and hashed only when the mtime moved). Files inside a sealed folder are checked by size
    and mtime; the folder's tables (``*.parquet``, ``*.json``) are hashed. A file whose mtime moved but
    whose size did not is hashed, so a copied run folder (new mtimes, same bytes) is still trusted.
``full``
    every recorded file is hashed.
``off``
    no checks (records are still written).

Damage is reported as one line, ``damaged: <path> (size 1000, recorded 380312); redoing <stage>``,
through the Prefect run logger inside a flow, the ``tailforge`` logger otherwise. The hash is xxh3-64 when the
``xxhash`` package is installed, BLAKE2b-64 from the standard library otherwise.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

RECORD = ".integrity.json"
HASH_LIMIT = 256 * 2**20  # bytes: stamp files above this are checked by size + mtime (hashed when it moved)
CHUNK = 1 << 20
HASHED_IN_FOLDERS = (".parquet", ".json")  # tables and metadata of a sealed folder: always hashed

try:  # optional: ~10x faster than BLAKE2b on big files
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None

# time spent in checks by this process (bench/integrity_overhead.py reads it)
STATS = {"seconds": 0.0, "checks": 0, "files": 0, "hashed": 0, "bytes_hashed": 0}


def mode() -> str:
    m = os.environ.get("TAILFORGE_VERIFY", "auto").strip().lower()
    return m if m in ("auto", "full", "off") else "auto"


def file_hash(path: str | os.PathLike) -> str:
    """``"xxh3:<hex>"`` or ``"b2:<hex>"`` of the file's bytes."""
    if _xxhash is not None:
        h, kind = _xxhash.xxh3_64(), "xxh3"
    else:
        h, kind = hashlib.blake2b(digest_size=8), "b2"
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    STATS["hashed"] += 1
    STATS["bytes_hashed"] += n
    return f"{kind}:{h.hexdigest()}"


def _same_hash(path: Path, recorded: str) -> bool:
    kind = recorded.partition(":")[0]
    if kind == "xxh3" and _xxhash is None:  # recorded where xxhash was installed: cannot tell, trust size
        return True
    if kind == "b2" and _xxhash is not None:
        h = hashlib.blake2b(digest_size=8)
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        return f"b2:{h.hexdigest()}" == recorded
    return file_hash(path) == recorded


def entry(path: str | os.PathLike) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": file_hash(path)}


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RECORD)


def record(root: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> dict[str, dict]:
    """``{relative path: {size, mtime_ns, hash}}`` of ``paths`` (folders: every file under them)."""
    root = Path(root)
    out: dict[str, dict] = {}
    for p in paths:
        p = Path(p)
        for f in (_files_under(p) if p.is_dir() else [p] if p.is_file() else []):
            out[_rel(f, root)] = entry(f)
    return out


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Damage:
    path: str  # as shown: relative to the run folder where possible
    size: int | None  # None: missing
    recorded: int
    reason: str  # "missing" | "size" | "content"

    def describe(self) -> str:
        if self.reason == "missing":
            return f"{self.path} (missing, recorded size {self.recorded})"
        if self.reason == "size":
            return f"{self.path} (size {self.size}, recorded {self.recorded})"
        return f"{self.path} (content changed, size {self.size})"


def check(root: str | os.PathLike, files: dict[str, dict], *, sealed: bool = False,
          show_root: str | os.PathLike | None = None) -> list[Damage]:
    """Damage among recorded ``files`` (paths relative to ``root``). ``sealed``: the files of a sealed
    folder (checked by size and mtime in ``auto`` mode, tables hashed). Paths in the result are
    relative to ``show_root`` (default ``root``)."""
    m = mode()
    if m == "off" or not files:
        return []
    base = os.fspath(root)
    show = Path(show_root) if show_root is not None else Path(root)
    out = []
    for rel, rec in files.items():  # plain strings and os.stat: ~10k files per rerun, keep it cheap
        p = os.path.join(base, rel)
        STATS["files"] += 1
        want_size = int(rec.get("size", 0))
        try:
            st = os.stat(p)
        except OSError:  # gone (or unreadable)
            out.append(Damage(_rel(Path(p), show), None, want_size, "missing"))
            continue
        if st.st_size != want_size:
            out.append(Damage(_rel(Path(p), show), st.st_size, want_size, "size"))
            continue
        want = rec.get("hash")
        if not want:
            continue
        moved = st.st_mtime_ns != rec.get("mtime_ns")
        if m == "full":
            hash_it = True
        elif sealed:
            hash_it = moved or rel.endswith(HASHED_IN_FOLDERS)
        else:
            hash_it = moved or st.st_size <= HASH_LIMIT
        if hash_it and not _same_hash(Path(p), want):
            out.append(Damage(_rel(Path(p), show), st.st_size, want_size, "content"))
    return out


def _timed(fn):
    """Count the time of a public check in ``STATS`` (what bench/integrity_overhead.py reports)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            STATS["seconds"] += time.perf_counter() - t0
            STATS["checks"] += 1
    return wrapper


# --------------------------------------------------------------------------- sealed folders

def seal(folder: str | os.PathLike) -> None:
    """Write ``folder/.integrity.json``: every file under the folder (called by ``atomic_dir`` on the
    temporary folder, before it is renamed into place; relative paths survive the rename)."""
    folder = Path(folder)
    files = record(folder, [folder])
    (folder / RECORD).write_text(json.dumps({"files": files}, indent=0, sort_keys=True) + "\n")


@_timed
def check_folder(folder: str | os.PathLike, show_root: str | os.PathLike | None = None) -> list[Damage] | None:
    """Damage in a sealed folder; ``None`` when it has no record (written before records existed)."""
    folder = Path(folder)
    rec = folder / RECORD
    if mode() == "off" or not rec.is_file():
        return None
    try:
        files = json.loads(rec.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [Damage(_rel(rec, Path(show_root) if show_root else folder), rec.stat().st_size, 0, "content")]
    return check(folder, files, sealed=True, show_root=show_root if show_root is not None else folder.parent)


def folder_ok(folder: str | os.PathLike, redo: str, show_root: str | os.PathLike | None = None) -> bool:
    """True unless the sealed ``folder`` is damaged; damage is reported (``...; redoing <redo>``)."""
    damage = check_folder(folder, show_root)
    if damage:
        report(damage_line(damage, redo))
        return False
    return True


# --------------------------------------------------------------------------- one line per event

def damage_line(damage: list[Damage], redo: str, most: int = 3) -> str:
    shown = ", ".join(d.describe() for d in damage[:most])
    if len(damage) > most:
        shown += f" and {len(damage) - most} more"
    return f"damaged: {shown}; redoing {redo}"


def report(line: str) -> None:
    """One warning line: the Prefect run logger inside a flow or task run (so the UI shows it with the
    task), the ``tailforge`` logger otherwise (the CLI prints ``warning: damaged: ...``)."""
    if "prefect" in sys.modules:
        try:
            from prefect.exceptions import MissingContextError
            from prefect.logging import get_run_logger

            try:
                get_run_logger().warning(line)
                return
            except MissingContextError:
                pass
        except ImportError:  # pragma: no cover
            pass
    logging.getLogger("tailforge").warning(line)


# --------------------------------------------------------------------------- stage stamps

@_timed
def stamp_ok(root: str | os.PathLike, stamp: dict, redo: str) -> bool:
    """Whether the files a stage stamp records (``stamp["files"]``) are intact. When not: one line
    naming the damage, and every file of that stage is removed (the stage then rewrites them all,
    and a stage that skips work whose outputs exist cannot skip it). A stamp without a record
    (written before records existed) is trusted, as it was."""
    files = stamp.get("files") or {}
    damage = check(root, files)
    if not damage:
        return True
    report(damage_line(damage, redo))
    for rel in files:
        try:
            (Path(root) / rel).unlink()
        except OSError:
            pass
    return False
