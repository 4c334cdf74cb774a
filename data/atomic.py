"""Atomic writes: write to a temporary sibling, fsync, rename into place.

A reader sees either the old file or the complete new one, never half of it; an interrupted
writer (Ctrl-C, crash) leaves at most a ``.tmp-*`` file that the next run ignores and overwrites.
A write that fails because the disk is full (whatever the library says) raises ``DiskFull``: one line
with the path and the free space. A folder gets ``.integrity.json`` (its files' sizes and hashes)
before it is renamed into place (see ``data/integrity.py``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .diskspace import DiskFull, disk_full, free_bytes, is_disk_full, size_of
from .integrity import seal


def _umask() -> int:
    mask = os.umask(0o022)  # read once, at import (single-threaded); the process's umask is restored at once
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    The temporary name keeps the file's suffix so libraries that infer a format from it
    (Pillow, pyarrow, matplotlib) still work.
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the output the mode a plain open() would
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        if tmp_path.exists():
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        full = not isinstance(exc, DiskFull) and is_disk_full(exc, path.parent)
        if full:  # measured before the partial file goes: what the write took, what was left
            written, free = (size_of(tmp_path) if tmp_path is not None else 0), free_bytes(path.parent)
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        if full:
            raise disk_full(path, written, free=free) from exc  # one line with the path and the free space
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success rename it to ``path``.

    Used for outputs made of several files (a generation shard, a checkpoint folder).
    An existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700: give the folder the mode a plain mkdir() would
        yield tmp
        seal(tmp)  # the folder's own record of its files (data/integrity.py), checked before reuse
        if path.exists():
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        full = not isinstance(exc, DiskFull) and is_disk_full(exc, path.parent)
        if full:
            written, free = (size_of(tmp) if tmp is not None else 0), free_bytes(path.parent)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full(path, written, free=free) from exc
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, blob: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, compact: bool = False) -> Path:
    """Indented JSON; ``compact``: one line per top-level key, each value without spaces (a dict of
    long per-class lists: its size grows with the numbers, not with indentation and one line per item)."""
    if compact and isinstance(obj, dict):
        items = [f"  {json.dumps(str(k))}: {json.dumps(v, separators=(',', ':'), default=_json_default)}"
                 for k, v in obj.items()]
        return write_text(path, "{\n" + ",\n".join(items) + "\n}\n")
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)
