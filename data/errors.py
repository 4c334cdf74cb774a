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


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> TailforgeError:
    """Error for an unknown registry key, listing the valid ones and the nearest match."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    hint += "valid: " + ", ".join(valid)
    return TailforgeError(f"unknown {kind} '{name}'", hint)
