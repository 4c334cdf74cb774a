"""``warp``: new tail images from real tail exemplars by smooth random deformation.

Each candidate is one real train image of its class (picked by the sample's seed, recorded as
``parent_id``) under a random affine map (rotation, scale, shear, translation, optional flip) plus an
elastic displacement field (Simard et al., ICDAR 2003: Gaussian-smoothed noise), resampled bicubically.
Bicubic matters: bilinear resampling blurs every candidate, and a backbone trained on many blurred tail
images learns "blurred means tail" (VAL, bench/results/balanced_backbone.md). No weights, no training,
any image size (the field's size and smoothness are fractions of the side), milliseconds per image.

It is the in-domain prior of the tool, not a model of the class: it adds the variation that small
images share (strokes and outlines bend, objects tilt), nothing the class's exemplars do not contain.
Its images are meant for the recipe's own backbone (recipe.backbone_sampler), where they stand in for
the re-sampled duplicates of tail images.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tailforge.data import TailforgeError, load_images

from .base import Generator
from .config import WarpOptions
from .planner import Plan
from .shards import Progress, Shard, class_rows, sample_seed


def warp_images(x, seeds, opts: WarpOptions):
    """float [0, 1] N x C x H x W -> deformed images, one random map per sample from its own seed."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    r = max(8, min(h, w, 64))  # the displacement field is drawn on an r x r grid, then resized
    sig = max(opts.warp_smooth * r, 1e-3)
    k = 2 * int(math.ceil(3 * sig)) + 1
    ax = torch.arange(k, dtype=torch.float32) - k // 2
    ker = torch.exp(-ax ** 2 / (2 * sig ** 2))
    ker = ker / ker.sum()
    thetas, fields = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) % 2**63)
        u = torch.rand(8, generator=g)
        a = (2 * u[0] - 1) * opts.warp_rotate * math.pi / 180
        sc = 1 + (2 * u[1] - 1) * opts.warp_scale
        sh = (2 * u[2] - 1) * opts.warp_shear
        tx, ty = (2 * u[3] - 1) * opts.warp_translate * 2, (2 * u[4] - 1) * opts.warp_translate * 2
        fx = -1.0 if opts.warp_flip and u[5] < 0.5 else 1.0
        ca, sa = math.cos(a) / sc, math.sin(a) / sc
        thetas.append(torch.tensor([[ca * fx, -sa + sh, tx], [sa * fx, ca, ty]], dtype=torch.float32))
        fields.append(torch.randn(2, r, r, generator=g))
    grid = F.affine_grid(torch.stack(thetas), [n, c, h, w], align_corners=False)
    if opts.warp_elastic > 0:
        f = torch.stack(fields)
        pad = k // 2
        f = F.conv2d(F.pad(f, (pad, pad, 0, 0), mode="circular"), ker.view(1, 1, 1, k).repeat(2, 1, 1, 1), groups=2)
        f = F.conv2d(F.pad(f, (0, 0, pad, pad), mode="circular"), ker.view(1, 1, k, 1).repeat(2, 1, 1, 1), groups=2)
        f = f / f.flatten(1).std(1).clamp_min(1e-8).view(-1, 1, 1, 1)  # unit std per sample, then the asked size
        f = F.interpolate(f, size=(h, w), mode="bicubic", align_corners=False) * (2 * opts.warp_elastic)
        grid = grid + f.permute(0, 2, 3, 1)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    return out.clamp(0, 1)


class WarpGenerator(Generator):
    name = "warp"
    source = "warp"

    def prepare(self, plan: Plan, progress: Progress | None = None) -> None:
        self.opts = self.cfg.warp

    def run_shard(self, shard: Shard, out_dir: Path) -> list[dict]:
        import torch

        ex = class_rows(self.run, shard.label)
        if ex.empty:
            raise TailforgeError(f"warp deforms real train images of class '{shard.class_name}', and it has none",
                                 "give the class real train images, or plan no samples for it (plan.classes)")
        seeds = [sample_seed(self.cfg.seed, shard.label, i) for i in shard.indices()]
        pick = [int(s % len(ex)) for s in seeds]  # the exemplar follows from the sample's seed
        parents = load_images(ex["uri"].iloc[pick], self.run.root, self.channels, self.size)
        x = torch.from_numpy(parents).float().div(255)
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
        out = []
        for i in range(0, len(x), self.cfg.batch_size):
            out.append(warp_images(x[i:i + self.cfg.batch_size], seeds[i:i + self.cfg.batch_size], self.opts))
        y = (torch.cat(out) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        extra = [{"parent_id": ex["sample_id"].iloc[j]} for j in pick]
        return self.write_images(shard, np.ascontiguousarray(y), out_dir, extra=extra)
