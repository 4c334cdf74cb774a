"""Feature diffusion (``fdiff``): a small class-conditional diffusion model over a classifier's features.

After LDMLR (Han et al., "Latent-based Diffusion Model for Long-tailed Recognition", CVPR-W 2024,
arXiv 2404.04517): instead of generating images, learn the distribution of the penultimate
features of the long-tail classifier with a diffusion model and sample tail features from it;
the classifier head is then re-trained on real + synthetic features (the crt recipe). Our
construction (CPU-sized, deterministic):

- **Data**: the real TRAIN features of ``feature_model`` (N x D), standardised per dimension.
- **Model**: an MLP denoiser eps(x_t, t, y): [x_t, sinusoidal(t) -> 128, class embedding (C + 1 ids,
  the last one is the null class) -> 128] -> ``fdiff_width`` x 3 (SiLU) -> D.
- **Training**: the DDPM epsilon objective on a cosine schedule (1000 steps, diffusers' scheduler),
  ``fdiff_steps`` AdamW steps; batches are drawn class-balanced (each class equally often, as in
  class-balanced diffusion training, CBDM, Qin et al. CVPR 2023) so the tail is learned, with the
  null class at probability 0.1 (classifier-free guidance); EMA weights sample.
- **Sampling**: DDIM (eta 0) with ``fdiff_sample_steps`` steps and guidance ``fdiff_guidance``
  (eps_u + w (eps_c - eps_u); w = 1: the conditional model alone); the initial noise of each sample
  comes from its own seed, so a shard regenerates identical values. Features of a ReLU backbone
  (all >= 0) are clipped at 0.

The model trains in ``prepare`` (seconds to a minute on a CPU; not checkpointed: a rerun retrains it
from the same seed to the same weights).
"""
from __future__ import annotations

import copy
import math

import numpy as np

from tailforge.data import TailforgeError

from .featdict import FeatureGenerator, train_features
from .planner import Plan
from .shards import Progress, resolve_device


def _timestep_embedding(t, dim: int = 64):
    import torch

    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def build_denoiser(dim: int, num_classes: int, width: int):
    import torch.nn as nn

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.t_proj = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 128))
            self.y_emb = nn.Embedding(num_classes + 1, 128)
            self.net = nn.Sequential(nn.Linear(dim + 256, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                     nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

        def forward(self, x, t, y):
            import torch

            return self.net(torch.cat([x, self.t_proj(_timestep_embedding(t)), self.y_emb(y)], dim=1))

    return Denoiser()


class FeatureDiffusion:
    """Fit a class-conditional diffusion model on (X, y) features; ``sample(label, seeds)``."""

    def __init__(self, steps: int = 2000, width: int = 256, batch: int = 256, lr: float = 1e-3,
                 sample_steps: int = 25, guidance: float = 1.0, class_dropout: float = 0.1, ema: float = 0.995,
                 seed: int = 0, device: str = "cpu"):
        self.steps, self.width, self.batch, self.lr = steps, width, batch, lr
        self.sample_steps, self.guidance, self.class_dropout, self.ema_decay = sample_steps, guidance, class_dropout, ema
        self.seed, self.device = seed, device

    def fit(self, X, y, progress: Progress | None = None) -> "FeatureDiffusion":
        import torch
        from diffusers import DDPMScheduler

        X = np.asarray(X, np.float32)
        y = np.asarray(y, np.int64)
        if X.ndim != 2 or len(X) != len(y) or len(X) < 2:
            raise TailforgeError(f"fdiff needs an N x D feature array with N >= 2 and one label each, got {X.shape}",
                                 "train the feature model on the run first")
        self.classes_ = np.unique(y)
        self.num_classes = int(y.max()) + 1
        self.nonneg_ = bool(X.min() >= 0)
        self.mu_, self.sd_ = X.mean(0), X.std(0) + 1e-6
        Z = torch.from_numpy((X - self.mu_) / self.sd_).to(self.device)
        Y = torch.from_numpy(y).to(self.device)
        order = np.argsort(y, kind="stable")  # rows of each class contiguous: class c = order[start[c]:start[c]+n[c]]
        n_c = np.bincount(y)[self.classes_]
        start = torch.from_numpy(np.r_[0, np.cumsum(n_c)[:-1]]).to(self.device)
        n_c, order = torch.from_numpy(n_c).to(self.device), torch.from_numpy(order).to(self.device)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        torch.manual_seed(self.seed)
        self.model = build_denoiser(X.shape[1], self.num_classes, self.width).to(self.device)
        self.ema = copy.deepcopy(self.model).eval()
        self.sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                   prediction_type="epsilon", clip_sample=False)
        abar = self.sched.alphas_cumprod.to(self.device)
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=1e-4)
        lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / self.steps)))
        n_cls = len(self.classes_)
        for step in range(self.steps):
            cls = torch.randint(n_cls, (self.batch,), generator=g).to(self.device)  # class-balanced batches
            pos = (torch.rand(self.batch, generator=g).to(self.device) * n_c[cls]).long()
            idx = order[start[cls] + pos]
            x0, lab = Z[idx], Y[idx].clone()
            lab[torch.rand(self.batch, generator=g).to(self.device) < self.class_dropout] = self.num_classes
            t = torch.randint(0, 1000, (self.batch,), generator=g).to(self.device)
            noise = torch.randn(x0.shape, generator=g).to(self.device)
            a = abar[t][:, None]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = torch.nn.functional.mse_loss(self.model(xt, t, lab), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_at.step()
            with torch.no_grad():
                for e, m in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(m, 1 - self.ema_decay)
            if progress and (step % 100 == 0 or step == self.steps - 1):
                progress(step + 1, self.steps, {"loss": round(float(loss), 4)})
        return self

    def sample(self, label: int, seeds) -> np.ndarray:
        """float32 (len(seeds), D): one feature of class ``label`` per seed (independent of batching)."""
        import torch
        from diffusers import DDIMScheduler

        if label not in set(self.classes_.tolist()):
            raise TailforgeError(f"class {label} has no real features to learn from",
                                 "plan only classes with at least one train image")
        d = len(self.mu_)
        x = torch.stack([torch.randn(d, generator=torch.Generator().manual_seed(int(s) % 2**63)) for s in seeds])
        x = x.to(self.device)
        sch = DDIMScheduler.from_config(self.sched.config, clip_sample=False, set_alpha_to_one=True)
        sch.set_timesteps(self.sample_steps)
        y = torch.full((len(x),), int(label), device=self.device)
        null = torch.full_like(y, self.num_classes)
        with torch.no_grad():
            for t in sch.timesteps:
                tt = torch.full((len(x),), int(t), device=self.device)
                eps = self.ema(x, tt, y)
                if self.guidance != 1.0:
                    eps_u = self.ema(x, tt, null)
                    eps = eps_u + self.guidance * (eps - eps_u)
                x = sch.step(eps, t, x, eta=0.0).prev_sample
        out = x.cpu().numpy() * self.sd_ + self.mu_
        return (np.maximum(out, 0) if self.nonneg_ else out).astype(np.float32)


class FDiffGenerator(FeatureGenerator):
    name = "fdiff"
    source = "fdiff"

    def prepare(self, plan: Plan, progress: Progress | None = None) -> None:
        o = self.cfg.fdiff
        X, y = train_features(self.run, self.cfg.feature_model, progress)
        self.sampler = FeatureDiffusion(steps=o.fdiff_steps, width=o.fdiff_width, sample_steps=o.fdiff_sample_steps,
                                      guidance=o.fdiff_guidance, seed=self.cfg.seed,
                                      device=resolve_device(self.cfg.device)).fit(X, y, progress)
