"""Per-class tables and class names that stay readable at any number of classes.

Past ``MAX_ROWS`` classes (iNaturalist has 8,142) a table in a report or a Prefect artifact shows a
selection: the rarest classes (fewest real train images) and the worst (lowest score), and says where
the full table is (a CSV next to the report). Plots shorten long class names (``short_name``), so a
label of 80 characters neither hides the figure nor makes matplotlib give up its layout.
"""
from __future__ import annotations

import csv
from pathlib import Path

from .atomic import atomic_path

MAX_ROWS = 200  # a table with more classes than this shows the rarest and the worst
NAME_WIDTH = 24


def short_name(name, width: int = NAME_WIDTH) -> str:
    """``'Abcdefghij klmnopqrstu vwxyz'`` -> ``'Abcdefghij klmnopqrstu…'`` (at most ``width`` characters)."""
    s = str(name)
    return s if len(s) <= width else s[:width - 1].rstrip() + "…"


def select_rows(rows: list[dict], rare_key: str, worst_key: str | None = None, limit: int = MAX_ROWS,
                what: str = "classes", most: bool = False) -> tuple[list[dict], str]:
    """All ``rows`` when there are at most ``limit``; else the ``limit // 2`` rows with the smallest
    ``rare_key`` (``most``: the largest, e.g. the most images needed) and the ``limit // 2`` others with
    the smallest ``worst_key`` (rows where it is None are left out), in that order, plus a note saying
    so (empty when all rows are kept). Without ``worst_key`` the ``limit`` rarest."""
    if len(rows) <= limit:
        return list(rows), ""
    idx = list(range(len(rows)))
    n_rare = limit // 2 if worst_key else limit
    sign = -1 if most else 1
    rare = sorted(idx, key=lambda i: (rows[i][rare_key] is None, sign * (rows[i][rare_key] or 0)))[:n_rare]
    taken = set(rare)
    worst = []
    if worst_key:
        rest = [i for i in idx if i not in taken and rows[i][worst_key] is not None]
        worst = sorted(rest, key=lambda i: rows[i][worst_key])[:limit - n_rare]
    note = (f"{len(rare) + len(worst)} of {len(rows):,} {what} shown: the {len(rare)} with the "
            f"{'most' if most else 'fewest'} `{rare_key}`"
            + (f" and the {len(worst)} with the lowest `{worst_key}`" if worst_key else ""))
    return [rows[i] for i in rare + worst], note


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """The full table as CSV (atomic), one row per class."""
    columns = columns or (list(rows[0]) if rows else [])
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return Path(path)
