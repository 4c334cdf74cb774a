"""The filter stage, one folder: score synthetic candidates against the real TRAIN split, keep the useful ones.

Its face (what the flows, the CLI and the tests use):

- ``FilterConfig``, ``filter_candidates(run, cfg, progress)``, ``load_quotas``   the stage (``stage.py``)
- ``score_arrays``, ``Calibration``, ``REASONS``   the scoring core on plain arrays (``score.py``)
- ``FaissSearch``, ``NumpySearch``, ``l2_normalize``   nearest-neighbour search (``index.py``)
- ``EMBEDDERS``, ``make_embedder``   image embedders: classifier, clip, timm (``embedders.py``)
- ``write_report``   the filter's report and sample grids (``report.py``)
- ``PlantedCandidates``   planted good/bad candidates for tests and benchmarks (``planted.py``)

Heavy parts (torch for the embedders, matplotlib for the report) load on first use.
"""
from __future__ import annotations

from importlib import import_module

from .index import FaissSearch, NumpySearch, l2_normalize
from .score import REASONS, Calibration, score_arrays
from .stage import FilterConfig, filter_candidates, load_quotas

_LAZY = {"EMBEDDERS": ".embedders", "make_embedder": ".embedders",
         "write_report": ".report", "PlantedCandidates": ".planted"}

__all__ = ["FilterConfig", "filter_candidates", "load_quotas", "score_arrays", "Calibration", "REASONS",
           "FaissSearch", "NumpySearch", "l2_normalize", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
