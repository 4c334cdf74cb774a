"""Checkpoints (safetensors + JSON) and inference helpers shared by eval, filter and serve.

A model folder ``models/<name>/`` holds ``model.safetensors`` (the val-selected weights),
``config.json`` (``{"train": TrainConfig, "meta": ...}``), ``log.jsonl`` and ``best.json``.
Models take normalized float NCHW; ``preprocess`` turns uint8 NHWC images into that using the
mean/std recorded in ``meta``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tailforge.data.atomic import read_json
from tailforge.data.errors import TailforgeError
from tailforge.data.integrity import check_folder

from .models import Classifier, create_model


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TailforgeError(f"unknown device '{device}'", "pass --device auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TailforgeError(f"device {device} asked for but no CUDA GPU is available", "use --device cpu or auto")
    return dev


def build_from_meta(meta: dict, folder=None) -> Classifier:
    if meta["arch"] == "clip_adapter":  # its image tower: the CLIP folder config.json names (or `folder`'s own)
        from .clip import adapter_from_meta

        return adapter_from_meta(meta, folder)
    h, w = meta["image_size"]
    return create_model(meta["arch"], meta["num_classes"], meta["in_chans"], max(h, w), width=meta.get("width"),
                        head=meta.get("head", "linear"), scale=meta.get("scale", 16.0),
                        input_size=meta.get("input_size"))


def load_model(model_dir, device: str | None = "cpu") -> tuple[Classifier, dict]:
    """Rebuild a trained model from its folder; returns (model in eval mode, meta)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file() or not (model_dir / "model.safetensors").is_file():
        raise TailforgeError(f"{model_dir} is not a trained model folder (config.json + model.safetensors)",
                             "train it first with `tailforge train`, or check the model name")
    damage = check_folder(model_dir, show_root=model_dir)
    if damage:
        raise damaged_checkpoint(model_dir, damage[0].describe())
    try:
        meta = read_json(cfg_path)["meta"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged_checkpoint(model_dir, f"config.json ({type(exc).__name__}: {exc})") from None
    model = build_from_meta(meta, model_dir)
    try:
        weights = load_file(str(model_dir / "model.safetensors"))
    except Exception as exc:  # SafetensorError, OSError: a truncated or overwritten file  # noqa: BLE001
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise damaged_checkpoint(model_dir, f"model.safetensors ({first})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise TailforgeError(f"checkpoint {model_dir} does not match its config.json ({first})",
                             "the folder was edited or mixed up; retrain the model") from None
    dev = resolve_device(device)
    return model.to(dev).eval(), meta


def damaged_checkpoint(model_dir: Path, what: str) -> TailforgeError:
    """One line naming the damaged file of a model folder (``what``: the file in it, with why) and the
    command that rebuilds it."""
    model_dir = Path(model_dir)
    run, name = model_dir.parent.parent, model_dir.name
    if (run / ".flows" / f"train-{name}.json").exists() and (run / "config.yaml").exists():  # made by a flow
        fix = f"`tailforge run --config {run / 'config.yaml'}` trains it again and redoes what depends on it"
    else:
        fix = (f"train it again with `tailforge train --run {run} --name {name}` and the options recorded in "
               f"{model_dir / 'config.json'} (key 'train')")
    return TailforgeError(f"damaged checkpoint: {model_dir}/{what}", fix)


def preprocess(images_uint8: np.ndarray, meta: dict, device=None) -> torch.Tensor:
    """uint8 N x H x W x C -> normalized float N x C x H x W."""
    x = torch.as_tensor(np.ascontiguousarray(images_uint8))
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] != meta["in_chans"]:
        raise TailforgeError(f"images have {x.shape[-1]} channel(s) but the model expects {meta['in_chans']}",
                             "load the images with the dataset's channels")
    x = x.to(device or "cpu").permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(meta["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _batched(fn, model, meta, images, batch_size, device) -> np.ndarray:
    dev = next(model.parameters()).device if device is None else resolve_device(device)
    model = model.to(dev).eval()
    out = []
    amp = dev.type == "cuda"
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size], meta, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out.append(fn(model, x).float().cpu())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def embed(model, meta, images_uint8, batch_size: int = 256, device=None) -> np.ndarray:
    """Backbone features (N, D) float32 of uint8 images."""
    return _batched(lambda m, x: m.forward_features(x), model, meta, images_uint8, batch_size, device)


def predict_logits(model, meta, images_uint8, batch_size: int = 256, device=None) -> np.ndarray:
    return _batched(lambda m, x: m(x), model, meta, images_uint8, batch_size, device)


def predict_proba(model, meta, images_uint8, batch_size: int = 256, device=None) -> np.ndarray:
    """Class probabilities (N, C) float32 (softmax of the logits)."""
    return _batched(lambda m, x: torch.softmax(m(x).float(), dim=1), model, meta, images_uint8, batch_size, device)
