"""tailforge: rebalance long-tailed image datasets with synthetic tail-class data, and measure the gain.

One import name; the stages are its subpackages (each a top-level folder of the repository, mapped
here by ``pyproject.toml``):

- ``tailforge.data``   datasets, long-tail construction, manifests, class statistics (measure)
- ``tailforge.gen``    the planner and the generators (ddpm, featdict, feature diffusion, sd)
- ``tailforge.eval``   metrics, evaluation, reports; ``tailforge.eval.filter`` is the filter stage
- ``tailforge.train``  models, losses, samplers, the trainer
- ``tailforge.flows``  Prefect flows and the ``tailforge`` CLI

Subpackages load on first use (``tailforge.train`` pulls in torch), so ``import tailforge`` is cheap.
"""
from importlib import import_module

__version__ = "0.2.0"
__all__ = ["data", "gen", "train", "eval", "flows", "__version__"]


def __getattr__(name):
    if name in ("data", "gen", "train", "eval", "flows"):
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tailforge' has no attribute {name!r}")
