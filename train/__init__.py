"""Train stage: models, long-tail losses, samplers, augmentation, the trainer and checkpoints.

Public surface (docs/api.md): ``TrainConfig``, ``fit``, ``launch_fit`` (fit under torchrun/DDP on >1 GPU),
``load_model``, ``embed``, ``predict_proba``,
plus the registries ``MODELS``, ``LOSSES``, ``SAMPLERS`` and ``create_model``. Torch is imported
lazily, so ``from tailforge.train import TrainConfig`` stays fast for the CLI.
"""
from __future__ import annotations

from importlib import import_module

from .config import TrainConfig

_LAZY = {
    "fit": ".trainer", "training_table": ".trainer", "launch_fit": ".ddp",
    "load_model": ".checkpoint", "embed": ".checkpoint", "predict_proba": ".checkpoint",
    "predict_logits": ".checkpoint", "preprocess": ".checkpoint",
    "create_model": ".models", "MODELS": ".models", "Classifier": ".models",
    "LOSSES": ".losses", "build_loss": ".losses",
    "SAMPLERS": ".samplers",
}

__all__ = ["TrainConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
