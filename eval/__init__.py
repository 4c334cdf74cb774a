"""Evaluate stage: metrics, plots, reports, comparisons (and the embedding filter, in eval/filter*.py).

Heavy modules (torch, matplotlib) load lazily; ``from tailforge.eval import evaluate`` stays cheap.
"""
from __future__ import annotations

from importlib import import_module

from .compare import compare
from .config import CompareConfig, EvalConfig
from .evaluate import evaluate

# (functions named like their module are imported eagerly above: a lazily imported submodule
# would shadow the function of the same name on the package)
_LAZY = {
    "compute": ".metrics",
    # filter stage (another engineer's files): listed here so `from tailforge.eval import ...` works lazily
    "filter_candidates": ".filter",
    "FilterConfig": ".filter",
}

__all__ = ["EvalConfig", "CompareConfig", "evaluate", "compare", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
