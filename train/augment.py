"""Batched augmentation on float [0, 1] NCHW tensors, driven by an explicit ``torch.Generator``.

One affine warp per batch (``grid_sample``) does crop-by-translation, flip, rotation and scale
for every sample at once, on whatever device the batch is on. Mixup and cutmix mix a batch with
a permutation of itself; the loss is then lam * L(y_a) + (1 - lam) * L(y_b) for any loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _u(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def affine(x: torch.Tensor, g: torch.Generator, *, translate: float, flip: bool, rotate: float = 0.0,
           scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Random translation (fraction of the side), horizontal flip, rotation (degrees), scale; zero padding."""
    n = x.shape[0]
    ang = _u(g, n, -rotate, rotate) * math.pi / 180
    sc = _u(g, n, *scale)
    fx = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    tx, ty = _u(g, n, -translate, translate) * 2, _u(g, n, -translate, translate) * 2
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos * fx, -sin, tx], 1), torch.stack([sin * fx, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def colour_jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.3) -> torch.Tensor:
    n = x.shape[0]
    b = _u(g, n, 1 - strength, 1 + strength).to(x)[:, None, None, None]
    c = _u(g, n, 1 - strength, 1 + strength).to(x)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean * b).clamp(0, 1)


def randaugment(x: torch.Tensor) -> torch.Tensor:
    """torchvision's RandAugment per sample (uint8 round trip; uses the global torch RNG, seeded per epoch)."""
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=2, magnitude=9)
    u8 = (x * 255).round().to(torch.uint8).cpu()
    out = torch.stack([ra(img) for img in u8])
    return out.to(x.device, x.dtype) / 255


def augment(x: torch.Tensor, mode: str, hflip: bool, g: torch.Generator) -> torch.Tensor:
    """``mode``: none | basic (translate 1/8 + flip) | strong (+ rotation, scale, colour) | randaugment (+ RA)."""
    if mode == "none":
        return x
    if mode == "randaugment":
        x = randaugment(x)
    if mode == "strong":
        x = affine(x, g, translate=0.125, flip=hflip, rotate=15, scale=(0.85, 1.15))
        return colour_jitter(x, g)
    return affine(x, g, translate=0.125, flip=hflip)


def mix(x: torch.Tensor, y: torch.Tensor, mixup: float, cutmix: float, g: torch.Generator):
    """Mixup (Zhang et al. 2018) or cutmix (Yun et al. 2019), one of them per batch when both are on.

    Returns (x, y_a, y_b, lam); lam = 1 means no mixing.
    """
    if mixup <= 0 and cutmix <= 0:
        return x, y, y, 1.0
    use_cut = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=g).item() < 0.5)
    alpha = cutmix if use_cut else mixup
    lam = _beta(alpha, g)
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    if not use_cut:
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    h, w = x.shape[-2:]
    rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, h)
    x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, y, y[perm], lam



def _beta(alpha: float, g: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw reproducible from ``g`` (torch's Beta takes no generator)."""
    import numpy as np

    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
