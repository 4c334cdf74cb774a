"""Evaluate stage: metrics, plots, reports, comparisons (the filter stage is the subpackage eval/filter/).

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
    # the filter stage (eval/filter/), reachable from here too
    "filter_candidates": ".filter",
    "FilterConfig": ".filter",
}

__all__ = ["EvalConfig", "CompareConfig", "evaluate", "compare", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
