"""One run per folder: an exclusive lock on ``<run>/.lock`` while a command writes into the folder.

The lock is an ``fcntl.flock`` on the file, so the kernel drops it when its process ends, however it
ends (SIGKILL included); the file also holds who took it (pid, host, start time, command), so a
second command can name the holder. A file that names a process which no longer holds the lock (it
was killed) is a stale lock: it is taken over with a line saying so.

Who takes it: the process that orchestrates (``tailforge run``, a stage command, the flows' bodies).
Prefect tasks running in threads of that process, Dask workers and torchrun processes never take it:
the lock is re-entrant within a process and is not inherited by child processes (``os.open`` makes
non-inheritable descriptors). Parallel ``tailforge generate --shard i/n`` workers share the folder
with a shared lock (``shared=True``), which still keeps a ``tailforge run`` out.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import TailforgeError

LOCK = ".lock"

_HELD: dict[str, list] = {}  # resolved folder -> [fd, count, shared]
_MUTEX = threading.Lock()


class RunLocked(TailforgeError):
    """The run folder is in use by another process."""


def _say(line: str) -> None:
    logging.getLogger("tailforge").warning(line)  # the CLI prints it as `warning: ...` (data/log.py)


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        blob = os.read(fd, 4096)
        return json.loads(blob.decode()) if blob.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _write(fd: int, info: dict) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())


def _alive(info: dict) -> bool | None:
    """Whether the holder named in ``info`` is running (None: another host, cannot tell)."""
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    if info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_text(info: dict) -> str:
    if not info.get("pid"):
        return "another process (parallel `tailforge generate --shard` workers hold it shared)"
    cmd = f", `{info['command']}`" if info.get("command") else ""
    return f"pid {info['pid']} on {info.get('host', '?')} (started {info.get('started', '?')}{cmd})"


def _try(fd: int, shared: bool) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without flock (some network mounts): the pid check alone
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        return _alive(_read(fd)) is False or _read(fd).get("pid") == os.getpid()


@contextlib.contextmanager
def run_lock(root: str | os.PathLike, *, wait: bool = False, shared: bool = False, create: bool = False,
             command: str = "", say: Callable[[str], None] = _say, poll: float = 0.5) -> Iterator[bool]:
    """Hold the run folder's lock for the block; yields whether a lock is held.

    A folder that does not exist is created (``create``) or not locked at all (the command will say it
    is missing). Held by another process: ``RunLocked`` naming the holder at once, or (``wait``) a line
    saying so, then wait until it is free.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise TailforgeError(f"run folder {root} is a file, not a folder", "pass a folder to --run (a new name creates it)")
    if not root.exists():
        if not create:
            yield False
            return
        root.mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    with _MUTEX:
        held = _HELD.get(key)
        if held is not None:  # re-entrant within a process (the CLI, then the flow body)
            held[1] += 1
    if held is not None:
        try:
            yield True
        finally:
            with _MUTEX:
                held[1] -= 1
        return

    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try(fd, shared):
            info = _read(fd)
            if not wait:
                raise RunLocked(f"run folder {root} is in use by {holder_text(info)}",
                                "wait for it to finish, pass --wait to start when it does, or use another --run folder")
            say(f"run folder {root} is in use by {holder_text(info)}; waiting for it to finish (Ctrl-C to stop)")
            while not _try(fd, shared):
                time.sleep(poll)
        if not shared:
            old = _read(fd)
            if old.get("pid") and old.get("pid") != os.getpid():
                say(f"run folder {root}: taking over the stale lock of {holder_text(old)}, which no longer runs")
            _write(fd, {"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command})
        with _MUTEX:
            _HELD[key] = [fd, 1, shared]
        try:
            yield True
        finally:
            with _MUTEX:
                _HELD.pop(key, None)
            with contextlib.suppress(OSError):
                if not shared:
                    os.ftruncate(fd, 0)  # released cleanly: nobody to name
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: a forked child sharing the descriptor must not keep it
    finally:
        os.close(fd)


def held(root: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``root``."""
    return str(Path(root).resolve()) in _HELD
