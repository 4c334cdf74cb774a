"""Loss-guided augmentation: a per-sample moving-average loss sets how hard RandAugment hits each sample.

Sources: Boosted Contrastive Learning (BCL; Zhou, Yao, Wang, Han, Zhang, "Contrastive Learning with Boosted
Memorization", ICML 2022, arXiv 2205.12693; code github.com/MediaBrain-SJTU/BCL: ``train.py`` keeps the
momentum loss, ``data/memoboosted_cifar100.py`` turns it into a RandAugment strength, ``data/randaug.py`` is
``RandAugment_prob``), and ECVL (Sensors 2023, 23(15), 6694, doi 10.3390/s23156694; ../shared/SEEDS.md item
4), whose "momentum loss" decides which samples get stronger RandAugment.

The algorithm, as BCL (``train.aug_policy: loss_guided``; the knobs are ``train.lossaug``):

1. **momentum loss** per training sample i (its index in the training table): after every step that saw i,
   ``m_i <- beta * m_i + (1 - beta) * loss_i`` (BCL: beta = 0.95); the first time i is seen, ``m_i = loss_i``
   (BCL's epoch 1). The loss is the per-sample training loss of the augmented (and mixed) input. A sample
   drawn twice in one batch (samplers with replacement) keeps the last update.
2. **normalise** at the start of each epoch, over the samples seen so far: ``bcl`` (BCL's
   ``calculate_momentum_weight``): z = (m - mean) / std, w = z / max|z| / 2 + 1/2, so w is in [0, 1] and the
   average sample sits at 0.5; or ``rank``: w = rank / (n - 1), robust to a few huge losses. A sample never
   seen yet gets 0.5 (the average). Epoch 1 has no losses yet: w = 0, no RandAugment (BCL's
   ``momentum_weight`` starts at 0). The weights stay fixed during the epoch (as BCL's dataset).
3. **strength** (BCL's ``RandAugment_prob(k, 30 * w * U, w)``): ``num_ops`` operations per sample, each
   applied with probability w_i, of magnitude ``magnitude * w_i * U(0, 1)`` on torchvision's 0-30 scale.
   Poorly learnt samples (high moving loss) get more and stronger operations.

The operations are torchvision's RandAugment list (identity, shear x/y, translate x/y, rotate, brightness,
colour, contrast, sharpness, posterize, solarize, autocontrast, equalize) with its ranges at magnitude 30 of
30 (shear 0.3, translate 0.45 of the side, rotate 30 degrees, enhance factors 1 +- 0.9, posterize 8 -> 4 bits,
solarize threshold 1 -> 0), written here for a BATCH with a different operation and magnitude per sample: the
geometric ones are one ``grid_sample`` (nearest, zero fill) with a per-sample matrix, the others are tensor
arithmetic per sample, equalize is torchvision's batched uint8 equalize on the samples that drew it. Every
random draw comes from the trainer's per-epoch ``torch.Generator``, so a seeded run is reproducible and a
resumed one replays exactly (the moving losses are part of the resumable state).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
       "sharpness", "posterize", "solarize", "autocontrast", "equalize")
MAX_MAGNITUDE = 30.0  # torchvision's / BCL's scale: magnitude 30 = the ops' largest range below
_GEOMETRIC = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate"}


class LossGuided:
    """The moving losses of ``n`` training samples and the per-sample RandAugment they ask for.

    ``update(idx, losses)`` after every step; ``new_epoch()`` at the start of every epoch (freezes the
    weights the epoch uses); ``augment(x01, idx, g)`` on a batch of float [0, 1] NCHW images.
    """

    def __init__(self, n: int, beta: float = 0.95, num_ops: int = 1, magnitude: float = 30.0,
                 normalize: str = "bcl"):
        if normalize not in ("bcl", "rank"):
            raise ValueError(f"normalize must be bcl or rank, not {normalize!r}")
        self.n, self.beta, self.num_ops, self.magnitude, self.normalize = n, float(beta), int(num_ops), \
            float(magnitude), normalize
        self.m = torch.zeros(n, dtype=torch.float64)
        self.seen = torch.zeros(n, dtype=torch.bool)
        self.w = torch.zeros(n, dtype=torch.float32)

    # -- 1. momentum loss
    @torch.no_grad()
    def update(self, idx, losses: torch.Tensor) -> None:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long).cpu()
        loss = losses.detach().double().cpu().reshape(-1)
        first = ~self.seen[idx]
        new = torch.where(first, loss, self.beta * self.m[idx] + (1 - self.beta) * loss)
        self.m[idx] = new
        self.seen[idx] = True

    # -- 2. normalise
    def weights(self) -> torch.Tensor:
        """w in [0, 1] per sample from the current moving losses (0.5 for samples not seen yet)."""
        w = torch.full((self.n,), 0.5, dtype=torch.float64)
        seen = self.seen.nonzero().flatten()
        if len(seen) < 2:
            return w.float() if len(seen) else torch.zeros(self.n)
        m = self.m[seen]
        if self.normalize == "rank":
            ranks = torch.empty_like(m)
            ranks[m.argsort(stable=True)] = torch.arange(len(m), dtype=m.dtype)
            w[seen] = ranks / (len(m) - 1)
        else:
            z = (m - m.mean()) / m.std().clamp_min(1e-12)
            w[seen] = z / z.abs().max().clamp_min(1e-12) / 2 + 0.5
        return w.float()

    def new_epoch(self) -> torch.Tensor:
        self.w = self.weights() if bool(self.seen.any()) else torch.zeros(self.n)
        return self.w

    # -- 3. strength
    def augment(self, x01: torch.Tensor, idx, g: torch.Generator) -> torch.Tensor:
        w = self.w[torch.as_tensor(np.asarray(idx), dtype=torch.long)]
        return randaugment_per_sample(x01, w, w * (self.magnitude / MAX_MAGNITUDE), self.num_ops, g)

    # -- resumable state
    def state_dict(self) -> dict:
        return {"m": self.m.clone(), "seen": self.seen.clone(), "w": self.w.clone()}

    def load_state_dict(self, s: dict) -> None:
        self.m, self.seen, self.w = s["m"].double().cpu(), s["seen"].bool().cpu(), s["w"].float().cpu()

    def summary(self) -> dict:
        """The epoch's weights in a few numbers (the training log's ``lossaug`` entry)."""
        w = self.w
        return {"w_mean": round(float(w.mean()), 4), "w_max": round(float(w.max()), 4),
                "seen": int(self.seen.sum())}


def randaugment_per_sample(x: torch.Tensor, prob: torch.Tensor, strength: torch.Tensor, num_ops: int,
                           g: torch.Generator) -> torch.Tensor:
    """RandAugment with a per-sample apply probability ``prob`` (N,) and maximum strength ``strength`` (N,,
    fraction of magnitude 30): ``num_ops`` rounds; in each a sample draws one op uniformly, applies it with
    probability prob_i, at magnitude fraction strength_i * U(0, 1), sign +-1 at random."""
    n = x.shape[0]
    prob, strength = prob.float().cpu(), strength.float().cpu()
    for _ in range(num_ops):
        op = torch.randint(len(OPS), (n,), generator=g)
        on = torch.rand(n, generator=g) < prob
        f = (strength * torch.rand(n, generator=g)).clamp(0, 1)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        op = torch.where(on, op, torch.zeros_like(op))  # 0: identity
        if bool((op != 0).any()):
            x = apply_ops(x, op, f, sign)
    return x


def apply_ops(x: torch.Tensor, op: torch.Tensor, f: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Sample i gets ``OPS[op[i]]`` at magnitude fraction f[i] (0..1 of torchvision's largest) with sign[i]."""
    dev = x.device
    x = x.clone()
    name = [OPS[i] for i in op.tolist()]
    sel = {k: torch.tensor([nm == k for nm in name]) for k in set(name)}
    v = (f * sign).to(dev)
    geo = [k for k in sel if k in _GEOMETRIC]
    if geo:
        theta = torch.zeros(len(op), 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        vc = v.cpu()
        for k in geo:
            m = sel[k]
            if k == "shear_x":
                theta[m, 0, 1] = 0.3 * vc[m]
            elif k == "shear_y":
                theta[m, 1, 0] = 0.3 * vc[m]
            elif k == "translate_x":
                theta[m, 0, 2] = 2 * 0.45 * vc[m]
            elif k == "translate_y":
                theta[m, 1, 2] = 2 * 0.45 * vc[m]
            else:
                a = vc[m] * 30 * math.pi / 180
                theta[m, 0, 0], theta[m, 0, 1] = torch.cos(a), -torch.sin(a)
                theta[m, 1, 0], theta[m, 1, 1] = torch.sin(a), torch.cos(a)
        mask = torch.zeros(len(op), dtype=torch.bool)
        for k in geo:
            mask |= sel[k]
        xs = x[mask.to(dev)]
        grid = F.affine_grid(theta[mask].to(dev, x.dtype), list(xs.shape), align_corners=False)
        x[mask.to(dev)] = F.grid_sample(xs, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    for k, m in sel.items():
        if k in _GEOMETRIC or k == "identity":
            continue
        md = m.to(dev)
        xs, vs = x[md], v[md].view(-1, 1, 1, 1)
        if k == "brightness":
            xs = xs * (1 + 0.9 * vs)
        elif k == "color":
            if xs.shape[1] == 3:
                gray = _gray(xs)
                xs = gray + (1 + 0.9 * vs) * (xs - gray)
        elif k == "contrast":
            mean = _gray(xs).mean(dim=(1, 2, 3), keepdim=True)
            xs = mean + (1 + 0.9 * vs) * (xs - mean)
        elif k == "sharpness":
            blur = _smooth(xs)
            xs = blur + (1 + 0.9 * vs) * (xs - blur)
        elif k == "posterize":
            bits = 8 - torch.round(4 * vs.abs())
            step = torch.pow(2.0, 8 - bits)
            xs = torch.floor(torch.round(xs * 255) / step) * step / 255
        elif k == "solarize":
            xs = torch.where(xs > 1 - vs.abs(), 1 - xs, xs)
        elif k == "autocontrast":
            lo = xs.amin(dim=(2, 3), keepdim=True)
            hi = xs.amax(dim=(2, 3), keepdim=True)
            xs = torch.where(hi > lo, (xs - lo) / (hi - lo).clamp_min(1e-12), xs)
        elif k == "equalize":
            from torchvision.transforms.v2 import functional as TF

            u8 = (xs.clamp(0, 1) * 255).round().to(torch.uint8)
            xs = TF.equalize(u8).to(xs.dtype) / 255
        x[md] = xs.clamp(0, 1)
    return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x[:, :1]


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel (torchvision's adjust_sharpness), the border pixels left as they are."""
    c = x.shape[1]
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 5
    k = (k / k.sum()).expand(c, 1, 3, 3)
    out = x.clone()
    if x.shape[-1] > 2 and x.shape[-2] > 2:
        out[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    return out


def gather_update(policy: LossGuided, idx, losses: torch.Tensor, dd) -> None:
    """``policy.update`` with every DDP rank's (indices, losses) of the step, so all ranks keep the same moving
    losses (each rank's shard of a step has the same length)."""
    if dd.world == 1:
        policy.update(idx, losses)
        return
    import torch.distributed as dist

    i = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=losses.device)
    lv = losses.detach().float()
    ii, ll = [torch.empty_like(i) for _ in range(dd.world)], [torch.empty_like(lv) for _ in range(dd.world)]
    dist.all_gather(ii, i)
    dist.all_gather(ll, lv)
    for a, b in zip(ii, ll):
        policy.update(a.cpu().numpy(), b)


__all__ = ["LossGuided", "OPS", "randaugment_per_sample", "apply_ops", "gather_update"]
