"""A full disk is a user problem, not a bug: one line with the path, the free space and (when known)
what the write needed, exit code 2, no traceback.

Libraries report a full disk in different ways: ``OSError`` with ``errno.ENOSPC`` (Python, pyarrow),
a ``SafetensorError`` whose text holds ``StorageFull``/``No space left on device``, or torch's
``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...`` or numpy's ``OSError: 115008
requested and 61312 written``, with no errno at all.
``is_disk_full`` recognises all of them (the last only when the file system really is nearly full);
``data/atomic.py`` turns them into ``DiskFull`` at the write that failed, and the CLI catches any that
escape elsewhere.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from .errors import TailforgeError

_FULL_TEXT = re.compile(r"no space left on device|storagefull|enospc|errno 28\b|code: 28\b|disk quota exceeded",
                        re.IGNORECASE)
# write failures that do not say why (torch's zip writer); a disk full only when free space is tiny
_WRITE_TEXT = re.compile(r"unexpected pos|failed writing|write failed|error writing|short write|"
                         r"requested and \d+ written", re.IGNORECASE)  # torch zip writer, numpy tofile
NEARLY_FULL = 1 << 20  # bytes


class DiskFull(TailforgeError):
    """The disk holding a run folder is full (keeps ``TailforgeError``'s pickling: problem, hint)."""


def human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the file system holding ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk. ``path``: where the failed write went."""
    if isinstance(exc, DiskFull):
        return True
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _FULL_TEXT.search(str(e)):
            return True
    if path is not None and any(_WRITE_TEXT.search(str(e)) for e in _chain(exc)):
        free = free_bytes(path)
        return free is not None and free < NEARLY_FULL
    return False


def disk_full(path: str | os.PathLike, needed: int | None = None, what: str = "", free: int | None = None) -> DiskFull:
    """The one-line error for a write of ``path`` that ran out of space (``free``: measured when it failed)."""
    free = free_bytes(path) if free is None else free
    need = f"; it needed more than {human(needed)}" if needed else ""
    return DiskFull(f"disk full writing {path}{' (' + what + ')' if what else ''}: {human(free)} free on "
                    f"{_mount_of(path)}{need}",
                    "free some space (or move the run folder to a bigger disk) and run the same command again: "
                    "finished work is kept and the run resumes")


def _mount_of(path: str | os.PathLike) -> str:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def _allocated(st: os.stat_result) -> int:
    blocks = getattr(st, "st_blocks", None)  # what the file takes on disk: a 120-byte PNG takes a 4 KB block
    return max(st.st_size, blocks * 512) if blocks is not None else st.st_size


def size_of(path: str | os.PathLike) -> int:
    """Disk space taken under ``path`` (a file or a folder); 0 when it is gone."""
    p = Path(path)
    try:
        if p.is_file():
            return _allocated(p.stat())
        return sum(_allocated(f.stat()) for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0


def block_size(path: str | os.PathLike) -> int:
    """The file system's allocation unit for ``path`` (4096 when it cannot be read)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return os.statvfs(p).f_frsize or 4096
    except (OSError, AttributeError):
        return 4096


def from_exception(exc: BaseException) -> DiskFull | None:
    """A ``DiskFull`` for an exception that is a full disk (the path from the error when it has one)."""
    if isinstance(exc, DiskFull):
        return exc
    for e in _chain(exc):
        if isinstance(e, DiskFull):
            return e
    path = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
    if is_disk_full(exc, path):
        return disk_full(path or ".")
    return None
