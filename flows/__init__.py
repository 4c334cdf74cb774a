"""Prefect flows wiring the stages, and the ``tailforge`` CLI.

Importing this package is cheap (the CLI imports it); the flows load on first use:
``from tailforge.flows import benchmark, rebalance, run_flow``.
"""
from __future__ import annotations

from .env import prefect_env  # noqa: F401 - part of the face

_LAZY = {"rebalance", "benchmark", "measure_flow", "plan_flow", "generate_flow", "filter_flow", "train_flow",
         "evaluate_flow", "run_flow", "make_runner", "FLOWS"}


def __getattr__(name: str):
    if name in _LAZY:
        prefect_env()
        from . import flows as _flows

        return getattr(_flows, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
