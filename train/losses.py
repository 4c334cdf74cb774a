"""Long-tail losses in one registry, ``LOSSES[name](cfg, class_counts)``.

Each loss returns PER-SAMPLE values (N,) so the trainer can weigh synthetic samples and mix
targets (mixup/cutmix) the same way for every loss. ``head`` says which classifier head it needs:
margin losses (LDAM, ArcFace, CosFace, SphereFace) work on a cosine head whose logits are
``scale * cos(theta)``.

Class weights are normalised so that they average 1 over the training samples' distribution of
classes ("sum to C" in Cui et al.), which keeps the loss scale comparable to CE: a weighting that
shrinks every weight towards 0 (a classic class-balanced-loss bug) makes training collapse.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tailforge.data.errors import unknown_name

from .config import TrainConfig, drw_start  # noqa: F401 - drw_start: part of the losses' face

LOSSES: dict[str, type["Loss"]] = {}


def registrar(table: dict):
    """``@register(name)`` for a table of classes by name (the losses here, the distillation losses in kd.py)."""
    def register(name: str):
        def deco(cls):
            table[name] = cls
            cls.name = name
            return cls

        return deco

    return register


register = registrar(LOSSES)


def build_loss(cfg: TrainConfig, counts) -> "Loss":
    if cfg.loss not in LOSSES:
        raise unknown_name("loss", cfg.loss, LOSSES)
    return LOSSES[cfg.loss](cfg, np.asarray(counts, dtype=np.float64))


def effective_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """Cui et al. 2019: w_c proportional to (1 - beta) / (1 - beta^n_c), normalised to sum to C."""
    n = np.maximum(counts, 1)
    w = (1.0 - beta) / (1.0 - np.power(beta, n))
    return w / w.sum() * len(n)


def inverse_weights(counts: np.ndarray) -> np.ndarray:
    w = 1.0 / np.maximum(counts, 1)
    return w / w.sum() * len(counts)


class Loss(nn.Module):
    head = "linear"
    name = ""

    def __init__(self, cfg: TrainConfig, counts: np.ndarray):
        super().__init__()
        self.cfg = cfg
        self.num_classes = len(counts)
        prior = np.maximum(counts, 1) / np.maximum(counts, 1).sum()
        self.register_buffer("log_prior", torch.tensor(np.log(prior), dtype=torch.float32), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        raise NotImplementedError


def _weights(values: np.ndarray) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@register("ce")
class CrossEntropy(Loss):
    """Softmax cross-entropy (optionally label-smoothed): the baseline."""

    def forward(self, logits, target, epoch=0):
        return F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=self.cfg.label_smoothing)


@register("weighted_ce")
class WeightedCE(Loss):
    """CE with per-class weights: inverse frequency, or effective number (``class_weights``)."""

    def __init__(self, cfg, counts):
        super().__init__(cfg, counts)
        w = inverse_weights(counts) if cfg.class_weights == "inverse" else effective_weights(counts, cfg.cb_beta)
        self.register_buffer("w", _weights(w), persistent=False)

    def forward(self, logits, target, epoch=0):
        return self.w[target] * F.cross_entropy(logits.float(), target, reduction="none")


def focal(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return -((1 - logp.exp()).clamp_min(0) ** gamma) * logp


@register("focal")
class Focal(Loss):
    """Focal loss (Lin et al. 2017): (1 - p_y)^gamma * CE."""

    def forward(self, logits, target, epoch=0):
        return focal(logits, target, self.cfg.focal_gamma)


@register("class_balanced")
class ClassBalanced(Loss):
    """Class-balanced loss (Cui et al. 2019): effective-number weights on softmax CE or focal."""

    def __init__(self, cfg, counts):
        super().__init__(cfg, counts)
        self.register_buffer("w", _weights(effective_weights(counts, cfg.cb_beta)), persistent=False)

    def forward(self, logits, target, epoch=0):
        base = focal(logits, target, self.cfg.focal_gamma) if self.cfg.cb_base == "focal" else \
            F.cross_entropy(logits.float(), target, reduction="none")
        return self.w[target] * base


@register("balanced_softmax")
class BalancedSoftmax(Loss):
    """Balanced softmax (Ren et al. 2020): CE on logits + log prior; predict with plain logits."""

    def forward(self, logits, target, epoch=0):
        return F.cross_entropy(logits.float() + self.log_prior, target, reduction="none")


@register("logit_adjust")
class LogitAdjust(Loss):
    """Logit-adjusted CE (Menon et al. 2021): logits + tau * log prior during training."""

    def forward(self, logits, target, epoch=0):
        return F.cross_entropy(logits.float() + self.cfg.la_tau * self.log_prior, target, reduction="none")


@register("ldam")
class LDAM(Loss):
    """LDAM (Cao et al. 2019): subtract a margin C / n_c^(1/4) (max ``ldam_max_margin``) from the target cosine."""

    head = "cosine"
    drw = False

    def __init__(self, cfg, counts):
        super().__init__(cfg, counts)
        m = 1.0 / np.power(np.maximum(counts, 1), 0.25)
        m = m * (cfg.ldam_max_margin / m.max())
        self.register_buffer("margins", _weights(m), persistent=False)
        self.register_buffer("w", _weights(effective_weights(counts, cfg.cb_beta)), persistent=False)

    def forward(self, logits, target, epoch=0):
        s = self.cfg.scale
        adj = logits.float().clone()
        adj[torch.arange(len(target)), target] -= s * self.margins[target]
        loss = F.cross_entropy(adj, target, reduction="none")
        if self.drw and epoch >= drw_start(self.cfg):
            loss = self.w[target] * loss
        return loss


@register("ldam_drw")
class LDAMDRW(LDAM):
    """LDAM with deferred re-weighting: effective-number class weights from ``drw_epoch`` on."""

    drw = True


@register("equalization")
class Equalization(Loss):
    """Softmax equalization loss (Tan et al. 2020): tail classes' negative logits are dropped from the
    softmax denominator (with probability ``eql_gamma``), so head samples do not push tail classes down."""

    def __init__(self, cfg, counts):
        super().__init__(cfg, counts)
        tail = counts / max(counts.sum(), 1) < cfg.eql_lambda
        self.register_buffer("tail", torch.tensor(tail), persistent=False)

    def forward(self, logits, target, epoch=0):
        z = logits.float()
        n, c = z.shape
        drop = self.tail[None, :].expand(n, c) & (torch.rand(n, c, device=z.device) < self.cfg.eql_gamma)
        drop = drop & (F.one_hot(target, c) == 0)
        return F.cross_entropy(z.masked_fill(drop, -1e4), target, reduction="none")


class _Angular(Loss):
    head = "cosine"
    default_margin = 0.0

    @property
    def m(self) -> float:
        return self.default_margin if self.cfg.margin is None else self.cfg.margin

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits, target, epoch=0):
        s = self.cfg.scale
        cos = (logits.float() / s).clamp(-1 + 1e-6, 1 - 1e-6)
        idx = torch.arange(len(target))
        adj = cos.clone()
        adj[idx, target] = self.target_logit(cos[idx, target])
        return F.cross_entropy(s * adj, target, reduction="none")


@register("arcface")
class ArcFace(_Angular):
    """ArcFace (Deng et al. 2019): cos(theta + m) for the target class."""

    default_margin = 0.3

    def target_logit(self, cos):
        theta = torch.acos(cos)
        # beyond pi - m, cos(theta + m) stops decreasing: fall back to the CosFace-style penalty
        return torch.where(theta + self.m < math.pi, torch.cos(theta + self.m), cos - self.m * math.sin(self.m))


@register("cosface")
class CosFace(_Angular):
    """CosFace / AM-softmax (Wang et al. 2018): cos(theta) - m for the target class."""

    default_margin = 0.35

    def target_logit(self, cos):
        return cos - self.m


@register("sphereface")
class SphereFace(_Angular):
    """SphereFace (Liu et al. 2017): psi(theta) = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi);
    monotone in theta for any m >= 1."""

    default_margin = 1.5

    def target_logit(self, cos):
        mt = self.m * torch.acos(cos)
        k = torch.floor(mt / math.pi)
        sign = 1 - 2 * torch.remainder(k, 2)
        return sign * torch.cos(mt) - 2 * k


def supcon(features: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over one view: positives are same-class batch mates.

    Returns the mean over anchors that have at least one positive (0 when none has).
    """
    z = F.normalize(features.float(), dim=1)
    sim = z @ z.t() / temperature
    n = len(target)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, -1e4)
    pos = (target[:, None] == target[None, :]) & ~eye
    logprob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    npos = pos.sum(1)
    has = npos > 0
    if not has.any():
        return z.sum() * 0
    per = -(logprob * pos).sum(1)[has] / npos[has]
    return per.mean()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample logit distillation (Hinton et al. 2015): T^2 * KL(teacher_T || student_T)."""
    t = temperature
    p = F.log_softmax(teacher.float() / t, dim=1)
    q = F.log_softmax(student.float() / t, dim=1)
    return (p.exp() * (p - q)).sum(1) * t * t
