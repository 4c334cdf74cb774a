"""User-facing errors.

A ``TailforgeError`` is a mistake the user can fix (bad name, missing folder, wrong shape).
The CLI prints it as one line, ``error: <problem> (fix: <hint>)``, and exits with code 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class TailforgeError(Exception):
    """An error the user can fix. ``hint`` says how."""

    exit_code = 2

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem.rstrip(".")
        if self.hint:
            text += f" (fix: {self.hint.rstrip('.')})"
        return text.replace("\n", " ")


def did_you_mean(name: object, valid: Iterable[str], cutoff: float = 0.6) -> str:
    """``"did you mean 'x'? "`` for the nearest of ``valid`` to ``name``, or ``""`` when none is near."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=cutoff)
    return f"did you mean '{close[0]}'? " if close else ""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> TailforgeError:
    """Error for an unknown registry key, listing the valid ones and the nearest match."""
    valid = sorted(valid)
    return TailforgeError(f"unknown {kind} '{name}'", did_you_mean(name, valid) + "valid: " + ", ".join(valid))
