"""Distillation for the long tail: ``KD_LOSSES[name](cfg, class_counts)`` and patch-level feature distillation.

Every KD loss maps (student logits, teacher logits, true labels) to PER-SAMPLE values (N,), like
``train.losses.LOSSES``, so the trainer weighs synthetic samples and per-group weights the same way for all.
The trainer combines them per sample as ``(1 - a_i) * task_i + a_i * kd_i`` where ``a_i`` is ``kd_alpha``, or,
with ``kd_group_weights``, the weight of the group (many / medium / few, counts.json) of sample i's TRUE
class. ``a = 0.5`` is the papers' CE : KD = 1 : 1 at half the scale.

- ``hinton`` (Hinton et al. 2015, "Distilling the knowledge in a neural network"): T^2 KL(p_t^T || p_s^T).
- ``bkd``: Balanced Knowledge Distillation (Zhang, Chen, Hu, Peng 2021, "Balanced Knowledge Distillation
  for Long-tailed Learning", arXiv 2104.10510; official code github.com/EricZsy/BalancedKnowledgeDistillation,
  ``losses.py`` class ``BKDLoss`` and ``train_student.py``): an instance-balanced CE (no class weights; the
  official code samples instances uniformly) plus a class-balanced distillation term. As in the official
  code, the teacher's softened probabilities are multiplied by the per-class weights w_c and renormalised,
  ``q_c = w_c p_t,c / sum_k w_k p_t,k``, and the term is T^2 KL(q || p_s^T). w_c is the effective-number
  weight of Cui et al. 2019, ``(1 - beta) / (1 - beta^n_c)`` normalised to sum to C, beta = ``cb_beta``
  (0.9999, the code's value; its CIFAR-100 rule "Reweight": weights from the first epoch). Official T = 2.
- ``dkd``: Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu, Liang, CVPR 2022; official code
  github.com/megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``): KL = TCKD + (1 - p_t,y) NCKD is
  split and re-weighted as ``alpha * TCKD + beta * NCKD``, both times T^2:
  TCKD = KL([p_t,y, 1 - p_t,y] || [p_s,y, 1 - p_s,y]) (binary: target vs all non-target classes),
  NCKD = KL(p_t over the non-target classes, renormalised || the same of the student).
  mdistiller's CIFAR-100 defaults: alpha 1, beta 8, T 4, CE weight 1, and a linear warm-up of the DKD
  term over the first 20 of 240 epochs (``kd_warmup``; its default here is the same fraction of the
  epochs). mdistiller removes the target by subtracting 1000 from its logit; here the non-target
  log-probabilities are computed exactly with logsumexp over the other classes.

Patch-level feature distillation (``kd_patch`` > 0; ``PatchKD``): after the seed system's patch-based,
head/tail-decoupled student-teacher scheme. Steps, per batch:

1. the teacher (eval mode, ``no_grad``: its weights never get a gradient) and the student give their last
   feature maps; where their spatial sizes differ, both are average-pooled to the smaller one;
2. ``kd_patch_size`` x ``kd_patch_size`` windows are average-pooled (stride 1) and ``kd_patch_count``
   random locations per image are drawn (the same for student and teacher);
3. the student's vectors go through a learnt 1x1 projector to the teacher's channels (a linear map; the
   identity when the channels match, still learnt); the distance is 1 - cos(student, teacher);
4. each location's weight: ``1 - max(0, max_c cos(t - mu, proto_c - mu))`` over the classes c of the OTHER
   groups than the sample's true class (many vs medium vs few), where proto_c is the teacher's mean pooled
   feature of class c on the train split and mu the mean of the prototypes: a patch that looks like
   classes of another group (shared by head and tail) counts less; with one group only, every weight is 1.
   Weights are normalised to mean 1 over the batch's locations, so ``kd_patch`` sets the term's scale;
5. per-sample value: the weighted mean over its locations; the trainer adds ``kd_patch`` x its mean.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tailforge.data.errors import TailforgeError, unknown_name
from tailforge.data.measure import GROUPS  # one definition of the groups

from .config import TrainConfig
from .losses import effective_weights, kd_loss, registrar

KD_LOSSES: dict[str, type["KDLoss"]] = {}
register = registrar(KD_LOSSES)


def kd_name(cfg: TrainConfig) -> str | None:
    """The distillation loss in use: ``cfg.kd``, ``hinton`` when only a teacher is given, None without one."""
    if not cfg.teacher:
        return None
    return cfg.kd or "hinton"


def build_kd(cfg: TrainConfig, counts) -> "KDLoss":
    name = kd_name(cfg)
    if name not in KD_LOSSES:
        raise unknown_name("kd", name, KD_LOSSES)
    return KD_LOSSES[name](cfg, np.asarray(counts, dtype=np.float64))


def kd_warmup_epochs(cfg: TrainConfig) -> float:
    """Epochs of the linear warm-up of the KD term: ``kd_warmup``, else mdistiller's 20/240 of the epochs for dkd."""
    if cfg.kd_warmup is not None:
        return cfg.kd_warmup
    return cfg.epochs * 20 / 240 if kd_name(cfg) == "dkd" else 0.0


class KDLoss(nn.Module):
    name = ""

    def __init__(self, cfg: TrainConfig, counts: np.ndarray):
        super().__init__()
        self.cfg = cfg
        self.t = cfg.kd_temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register("hinton")
class Hinton(KDLoss):
    """T^2 KL(teacher_T || student_T) (Hinton et al. 2015)."""

    def forward(self, student, teacher, target):
        return kd_loss(student, teacher, self.t)


@register("bkd")
class BKD(KDLoss):
    """Class-balanced KD term of BKD: T^2 KL(renormalised w * p_t^T || p_s^T), w the effective-number weights."""

    def __init__(self, cfg, counts):
        super().__init__(cfg, counts)
        self.register_buffer("w", torch.tensor(effective_weights(counts, cfg.cb_beta), dtype=torch.float32),
                             persistent=False)

    def forward(self, student, teacher, target):
        q = F.softmax(teacher.float() / self.t, dim=1) * self.w
        q = q / q.sum(1, keepdim=True)
        logp = F.log_softmax(student.float() / self.t, dim=1)
        return (torch.xlogy(q, q) - q * logp).sum(1) * self.t * self.t


def _target_split(logits: torch.Tensor, target: torch.Tensor, t: float):
    """log p_y, log (1 - p_y) and the log-probabilities over the non-target classes (renormalised; -inf at y)."""
    z = logits.float() / t
    mask = F.one_hot(target, z.shape[1]).bool()
    lse = torch.logsumexp(z, 1)
    log_py = z.gather(1, target[:, None]).squeeze(1) - lse
    other = z.masked_fill(mask, float("-inf"))
    lse_other = torch.logsumexp(other, 1)
    return log_py, lse_other - lse, other - lse_other[:, None], mask


@register("dkd")
class DKD(KDLoss):
    """alpha * TCKD + beta * NCKD, both times T^2 (Zhao et al. 2022)."""

    def forward(self, student, teacher, target):
        s_y, s_o, s_n, mask = _target_split(student, target, self.t)
        t_y, t_o, t_n, _ = _target_split(teacher, target, self.t)
        tckd = t_y.exp() * (t_y - s_y) + t_o.exp() * (t_o - s_o)
        pt = t_n.exp()
        nckd = (pt * (t_n - s_n)).masked_fill(mask, 0.0).sum(1)
        return (self.cfg.kd_dkd_alpha * tckd + self.cfg.kd_dkd_beta * nckd) * self.t * self.t


def group_alpha(cfg: TrainConfig, groups: list[str]) -> torch.Tensor:
    """Per-class KD weight (C,): ``kd_group_weights`` of each class's group, ``kd_alpha`` for a group not given."""
    w = cfg.kd_group_weights or {}
    return torch.tensor([float(w.get(g, cfg.kd_alpha)) for g in groups], dtype=torch.float32)


def mix_kd(task: torch.Tensor, kd: torch.Tensor, alpha_c: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor,
           lam: float = 1.0, ramp: float = 1.0) -> torch.Tensor:
    """Per-sample ``(1 - a_i) task_i + ramp a_i kd_i`` with ``a_i`` the KD weight of sample i's TRUE class
    (``alpha_c`` (C,); mixed like the targets under mixup/cutmix); ``ramp`` the warm-up factor."""
    a = lam * alpha_c[ya] + (1 - lam) * alpha_c[yb]
    return (1 - a) * task + ramp * a * kd


# ----------------------------------------------------------------------------- patch-level feature distillation
def feature_map_or_error(model, x: torch.Tensor, who: str) -> torch.Tensor:
    try:
        return model.feature_map(x)
    except NotImplementedError:
        raise TailforgeError(f"--kd-patch needs the {who}'s last feature map, which its architecture does not "
                             "give", "use a CNN (tiny, resnet32, resnet10, timm CNNs) or drop --kd-patch") from None


class PatchKD(nn.Module):
    """Patch-level feature distillation with head/tail-shared patches down-weighted (module docstring, 1-5).

    ``protos``: (C, Ct) teacher class prototypes; ``class_group``: (C,) group index of every class.
    The module holds the learnt projector (student channels -> teacher channels); the trainer optimises it.
    """

    def __init__(self, student_ch: int, teacher_ch: int, protos: torch.Tensor, class_group: torch.Tensor,
                 count: int = 16, size: int = 1):
        super().__init__()
        self.proj = nn.Conv2d(student_ch, teacher_ch, 1, bias=False)
        nn.init.kaiming_uniform_(self.proj.weight, a=5 ** 0.5)
        self.count, self.size = count, size
        mu = protos.mean(0, keepdim=True)
        self.register_buffer("protos", F.normalize(protos - mu, dim=1), persistent=False)
        self.register_buffer("mu", mu, persistent=False)
        self.register_buffer("class_group", class_group.long(), persistent=False)

    @torch.no_grad()
    def location_weights(self, t_vec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N, K) weights: 1 - max cos to another group's (centred) prototypes, normalised to mean 1."""
        n, k, _ = t_vec.shape
        sim = F.normalize(t_vec - self.mu, dim=2) @ self.protos.t()  # (N, K, C)
        other = self.class_group[None, :] != self.class_group[target][:, None]  # (N, C)
        if not other.any():
            return torch.ones(n, k, device=t_vec.device)
        sim = sim.masked_fill(~other[:, None, :], float("-inf")).amax(2)
        w = 1 - sim.clamp(0, 1).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # a sample with no other group: -inf -> 0
        return w / w.mean().clamp_min(1e-6)

    def forward(self, s_map: torch.Tensor, t_map: torch.Tensor, target: torch.Tensor,
                gen: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample patch distillation loss (N,); ``t_map`` must come from the teacher under ``no_grad``."""
        t_map = t_map.detach().float()
        s_map = self.proj(s_map.float())
        h, w = min(s_map.shape[2], t_map.shape[2]), min(s_map.shape[3], t_map.shape[3])
        if s_map.shape[2:] != (h, w):
            s_map = F.adaptive_avg_pool2d(s_map, (h, w))
        if t_map.shape[2:] != (h, w):
            t_map = F.adaptive_avg_pool2d(t_map, (h, w))
        p = max(1, min(self.size, h, w))
        if p > 1:
            s_map, t_map = F.avg_pool2d(s_map, p, 1), F.avg_pool2d(t_map, p, 1)
        n, c, hh, ww = t_map.shape
        loc = torch.randint(0, hh * ww, (n, self.count), generator=gen).to(t_map.device)
        s_vec = s_map.flatten(2).gather(2, loc[:, None, :].expand(-1, s_map.shape[1], -1)).transpose(1, 2)
        t_vec = t_map.flatten(2).gather(2, loc[:, None, :].expand(-1, c, -1)).transpose(1, 2)  # (N, K, Ct)
        dist = 1 - F.cosine_similarity(s_vec, t_vec, dim=2)  # (N, K)
        wts = self.location_weights(t_vec, target)
        return (wts * dist).mean(1)


@torch.no_grad()
def class_prototypes(teacher, x01_batches, labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(C, Ct) mean teacher pooled feature per class (zeros for a class without samples)."""
    feats = torch.cat([teacher(x) for x in x01_batches]).float().cpu()
    y = torch.tensor(np.asarray(labels, dtype=np.int64))
    out = torch.zeros(num_classes, feats.shape[1])
    out.index_add_(0, y, feats)
    return out / torch.bincount(y, minlength=num_classes).clamp_min(1)[:, None].float()


__all__ = ["KD_LOSSES", "build_kd", "kd_name", "kd_warmup_epochs", "group_alpha", "mix_kd", "PatchKD", "class_prototypes",
           "GROUPS"]
