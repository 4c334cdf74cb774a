"""Output a person reads: the ``tailforge`` logger, one line per event, grouped when it repeats.

A condition the user should know of but that is no error (a class left without accepted candidates)
is logged to ``tailforge`` or a child logger (``tailforge.filter``), never raised as a Python warning:
``warnings.warn`` prints a source path and a line of code, and repeats itself once per class. Many
items of one kind make one line: ``grouped("no candidate accepted", ["bird (371 wrong_class)", ...])``.

Who prints the records:

- the ``tailforge`` CLI, inside ``cli_logging()``: one plain line each on stderr
  (``warning: filter: no candidate accepted for 8 classes: bird (371 wrong_class), ...``);
- anywhere else (a notebook, a Prefect worker, pytest): they propagate to the root logger's handlers
  (Prefect's console handler, pytest's caplog), or, with none configured, Python's last-resort
  handler prints warnings as the bare message.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

NAME = "tailforge"
log = logging.getLogger(NAME)


def grouped(what: str, items: Sequence[str], noun: tuple[str, str] = ("class", "classes"), limit: int = 10) -> str:
    """``what`` once for all ``items``: ``no candidate accepted for 2 classes: bird (371 wrong_class), cat (5 ...)``.

    At most ``limit`` items are spelled out, then ``and N more``.
    """
    items = list(items)
    shown = ", ".join(items[:limit]) + (f", and {len(items) - limit} more" if len(items) > limit else "")
    return f"{what} for {len(items)} {noun[len(items) != 1]}: {shown}"


class PlainFormatter(logging.Formatter):
    """The message alone; ``warning: `` / ``error: `` in front from level WARNING up. No time, path or code."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return f"{record.levelname.lower()}: {msg}" if record.levelno >= logging.WARNING else msg


class StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record: a rich progress bar (which redirects stderr to
    print above itself) or pytest's capture may have replaced it since the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


@contextmanager
def cli_logging(level: int = logging.INFO) -> Iterator[logging.Handler]:
    """For the time of one CLI command: ``tailforge`` records are plain lines on stderr, and are not passed
    on to other handlers (Prefect's console handler would print them a second time). Restored afterwards,
    so a test that calls ``main()`` leaves the logger as it found it."""
    handler = StderrHandler()
    handler.setFormatter(PlainFormatter())
    level_before, propagate_before = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level_before)
        log.propagate = propagate_before
