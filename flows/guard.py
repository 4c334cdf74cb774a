"""What the CLI does around every command so that a busy folder or a full disk is one line, not a
traceback: the run folder's lock (``tailforge.data.lock``) for commands that write into it, ``--wait``,
the one-line disk-full message, and Prefect log records of user errors without their tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Iterator

from tailforge.data.diskspace import from_exception
from tailforge.data.errors import TailforgeError

# commands that write into their --run folder (serve and compare only read it; run locks in cmd_run)
WRITERS = ("measure", "plan", "generate", "filter", "train", "eval")
# commands that read a consistent run folder: a shared lock (they coexist, but not with a writer)
READERS = ("export",)
WAIT_HELP = ("when another command is writing into the run folder, wait for it to finish instead of "
             "stopping with an error")


def add_wait_options(sub: argparse._SubParsersAction) -> None:
    """``--wait`` on every command that takes the run folder's lock."""
    for name in (*WRITERS, *READERS, "run"):
        p = sub.choices.get(name)
        if p is not None:
            p.add_argument("--wait", action="store_true", help=WAIT_HELP)


@contextlib.contextmanager
def command_lock(args: argparse.Namespace) -> Iterator[None]:
    """The run folder's lock for a stage command that writes into it (``generate --shard``: shared, so
    parallel shard workers coexist), a shared one for a command that reads it whole (``export``); nothing for
    the others."""
    from tailforge.data.lock import run_lock

    run = getattr(args, "run", None)
    if args.command not in (*WRITERS, *READERS) or run is None:
        yield
        return
    shared = args.command in READERS or (args.command == "generate" and getattr(args, "shard", None) is not None)
    # a folder that does not exist yet is not locked (nor created: a bad option must leave nothing behind)
    with run_lock(run, wait=getattr(args, "wait", False), shared=shared, command=f"tailforge {args.command}"):
        yield


def user_error(exc: BaseException) -> TailforgeError | None:
    """The user-facing error an exception stands for: itself, a full disk, or None (a bug)."""
    if isinstance(exc, TailforgeError):
        return exc
    return from_exception(exc)


class _NoUserTracebacks(logging.Filter):
    """Drop the traceback of a log record whose exception is a user error (a full disk, a busy or
    damaged run folder): Prefect logs a failed task with ``exc_info``; the CLI prints the one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and user_error(exc) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_errors() -> None:
    """Install the filter on the handlers of Prefect's loggers (after Prefect set up its logging)."""
    f = _NoUserTracebacks()
    names = ["", "prefect", "prefect.flow_runs", "prefect.task_runs"]
    names += [n for n in logging.root.manager.loggerDict if n.startswith("prefect")]
    for name in names:
        for h in logging.getLogger(name).handlers:
            if not any(isinstance(x, _NoUserTracebacks) for x in h.filters):
                h.addFilter(f)
