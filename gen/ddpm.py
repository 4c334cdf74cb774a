"""In-domain class-conditional diffusion (the offline default generator, as in DiffuLT).

A diffusers ``UNet2DModel`` with a class embedding (``num_class_embeds = C + 1``; the extra id is the
null class) is trained with the DDPM objective (epsilon prediction, cosine schedule) on the run's
real TRAIN split, all classes, so tail classes borrow structure from the head. Labels are replaced by
the null class with probability ``ddpm_class_dropout``, which gives classifier-free guidance at
sampling time: ``eps = eps_null + w (eps_class - eps_null)``. Sampling uses the EMA weights and DDIM
(eta 0) or DPM-Solver++, both deterministic given the initial noise, which is drawn per sample from
that sample's seed, so a shard regenerates identical bytes.

Checkpoints live in ``synthetic/ddpm/model/``: ``state.pt`` (model, EMA, optimizer, step, RNG;
written atomically every ``ddpm_checkpoint_every`` steps, so an interrupted training resumes), then
``unet/`` (EMA weights, ``save_pretrained``) and ``done.json`` (what it was trained on) when finished.
Images whose side is not a multiple of ``2 ** (levels - 1)`` are resized up for the UNet and back
(antialiased) to the dataset's size.
"""
from __future__ import annotations

import copy
import fcntl
import math
import time
from pathlib import Path

import numpy as np

from tailforge.data import TailforgeError, atomic_dir, atomic_path, load_images, read_json, read_manifest, write_json
from tailforge.data.integrity import folder_ok

from .base import Generator
from .config import DDPMOptions
from .planner import Plan
from .shards import Progress, Shard, resolve_device, sample_seed, to_uint8

PRESETS = {
    # name: UNet shape + training + sampling defaults
    # max_side: the largest image side the preset was sized for; past it the model draws noise (measured:
    # 'fast' on 28 px Fashion-MNIST, bench/results/ddpm_fashion_cpu/), so the generator refuses
    "tiny": dict(blocks=(8, 16), attn=(False, False), layers=1, groups=4, steps=30, batch=16, lr=3e-3,
                 sample_steps=4, max_side=16),
    "fast": dict(blocks=(16, 32), attn=(False, False), layers=1, groups=8, steps=400, batch=64, lr=3e-3,
                 sample_steps=10, max_side=16),
    "full": dict(blocks=(128, 256, 256), attn=(False, True, True), layers=2, groups=32, steps=40_000, batch=256,
                 lr=2e-4, sample_steps=50, max_side=64),
}


def resolved(opts: DDPMOptions) -> dict:
    """The preset with the explicit options applied."""
    p = dict(PRESETS[opts.ddpm_preset])
    for key, field in (("steps", "ddpm_train_steps"), ("batch", "ddpm_train_batch"), ("lr", "ddpm_lr"),
                       ("sample_steps", "ddpm_sample_steps")):
        if getattr(opts, field) is not None:
            p[key] = getattr(opts, field)
    return p


def model_size(size: tuple[int, int], levels: int) -> tuple[int, int]:
    m = 2 ** (levels - 1)
    return tuple(max(m, math.ceil(s / m) * m) for s in size)  # type: ignore[return-value]


def build_unet(num_classes: int, channels: int, size: tuple[int, int], preset: dict):
    from diffusers import UNet2DModel

    levels = len(preset["blocks"])
    return UNet2DModel(
        sample_size=model_size(size, levels), in_channels=channels, out_channels=channels,
        layers_per_block=preset["layers"], block_out_channels=tuple(preset["blocks"]),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in preset["attn"]),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(preset["attn"])),
        norm_num_groups=preset["groups"], attention_head_dim=8, num_class_embeds=num_classes + 1,
    )


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=True)


def sampling_scheduler(kind: str, steps: int):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cfg = noise_scheduler().config
    if kind == "ddim":
        s = DDIMScheduler.from_config(cfg, clip_sample=True, set_alpha_to_one=True)
    else:
        s = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)
    s.set_timesteps(steps)
    return s


class DDPMGenerator(Generator):
    name = "ddpm"
    source = "ddpm"

    def __init__(self, run, cfg, info):
        super().__init__(run, cfg, info)
        self.opts = cfg.ddpm
        self.preset = resolved(self.opts)
        self.model_dir = run.synthetic("ddpm") / "model"
        self.device = resolve_device(cfg.device)
        self.num_classes = int(info["num_classes"])
        self.unet = None

    # ---- training -------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        p = self.preset
        return {"dataset": self.info.get("fingerprint"), "seed": self.cfg.seed, "blocks": list(p["blocks"]),
                "attn": list(p["attn"]), "layers": p["layers"], "steps": p["steps"], "batch": p["batch"],
                "lr": p["lr"], "class_dropout": self.opts.ddpm_class_dropout, "ema": self.opts.ddpm_ema_decay}

    def train_images(self):
        """Real TRAIN images of all classes as float [-1, 1] N x C x h x w at the UNet's size, and labels."""
        import torch
        import torch.nn.functional as F

        df = read_manifest(self.run.require(self.run.real, "measure"))
        df = df[(df["split"] == "train") & (df["source"] == "real")]
        imgs = load_images(df["uri"], self.run.root, self.channels, self.size)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        msize = model_size(self.size, len(self.preset["blocks"]))
        if tuple(msize) != tuple(self.size):
            x = F.interpolate(x, size=msize, mode="bilinear", antialias=True, align_corners=False)
        return x, torch.from_numpy(df["label"].to_numpy().astype(np.int64))

    def check_size(self) -> None:
        """A preset must fit the image size it is given: refuse, rather than silently draw noise."""
        side, cap = max(self.size), self.preset["max_side"]
        if side > cap and self.opts.ddpm_train_steps is None:
            bigger = [n for n, p in PRESETS.items() if p["max_side"] >= side]
            raise TailforgeError(
                f"ddpm preset '{self.opts.ddpm_preset}' is sized for images up to {cap} px; these are {side} px, "
                "where it draws noise",
                (f"use --ddpm-preset {bigger[0]} (a GPU job)" if bigger else "no preset fits this size: use sd")
                + ", or a feature generator (--generator featcov) with the crt recipe "
                "(flows/recipes/small-images.yaml); to train this preset anyway, set --ddpm-train-steps")

    def prepare(self, plan: Plan, progress: Progress | None = None) -> None:
        from diffusers import UNet2DModel

        self.check_size()
        done = self.model_dir / "done.json"
        self.model_dir.mkdir(parents=True, exist_ok=True)
        # One trainer at a time: parallel `--shard i/n` workers wait here for the first one's model.
        with open(self.model_dir / ".train.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if done.exists() and not folder_ok(self.model_dir / "unet", "the ddpm training", self.run.root):
                done.unlink()  # a damaged UNet: train it again
            if done.exists():
                meta = read_json(done)
                if meta["fingerprint"] != self.fingerprint():
                    raise TailforgeError(
                        f"{self.model_dir} holds a diffusion model trained with other settings",
                        f"use the same ddpm options and seed, or delete {self.model_dir.parent} to retrain")
            else:
                self.train(progress)
        # low_cpu_mem_usage=False: the UNet is a few MB, low-memory loading buys nothing here; it needs
        # accelerate (without it diffusers prints "accelerate not found" advice on every run), whose loader
        # patches torch.nn.Module globally: not thread-safe with parallel shard workers in one process
        self.unet = UNet2DModel.from_pretrained(self.model_dir / "unet", low_cpu_mem_usage=False)
        self.unet = self.unet.to(self.device).eval()

    def train(self, progress: Progress | None = None) -> None:
        import torch
        import torch.nn.functional as F

        p, fp = self.preset, self.fingerprint()
        x_all, y_all = self.train_images()
        torch.manual_seed(self.cfg.seed)
        unet = build_unet(self.num_classes, self.channels, self.size, p).to(self.device)
        ema = copy.deepcopy(unet).eval().requires_grad_(False)
        opt = torch.optim.AdamW(unet.parameters(), lr=p["lr"], weight_decay=0.0)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        sched = noise_scheduler()
        step, seconds, losses = 0, 0.0, []
        state_path = self.model_dir / "state.pt"
        if state_path.exists():
            st = torch.load(state_path, map_location=self.device, weights_only=False)
            if st["fingerprint"] == fp:
                unet.load_state_dict(st["model"]), ema.load_state_dict(st["ema"]), opt.load_state_dict(st["opt"])
                gen.set_state(st["rng"])
                step, seconds, losses = st["step"], st["seconds"], st["losses"]
        sched_alphas = sched.alphas_cumprod.to(self.device)
        t_start = time.perf_counter() - seconds
        unet.train()
        while step < p["steps"]:
            idx = torch.randint(0, len(x_all), (p["batch"],), generator=gen)
            x0, y = x_all[idx].to(self.device), y_all[idx].clone()
            y[torch.rand(len(y), generator=gen) < self.opts.ddpm_class_dropout] = self.num_classes  # null class
            noise = torch.randn(x0.shape, generator=gen).to(self.device)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen).to(self.device)
            a = sched_alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.device != "cpu"):
                pred = unet(xt, t, class_labels=y.to(self.device)).sample
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            step += 1
            decay = min(self.opts.ddpm_ema_decay, (1 + step) / (10 + step))  # EMA warm-up
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(pm, 1 - decay)
            losses.append(float(loss.detach()))
            if progress and (step % 20 == 0 or step == p["steps"]):
                progress(step, p["steps"], {"stage": "ddpm-train", "loss": round(float(np.mean(losses[-20:])), 5)})
            if step % self.opts.ddpm_checkpoint_every == 0 and step < p["steps"]:
                self.save_state(state_path, unet, ema, opt, gen, step, time.perf_counter() - t_start, losses, fp)
        seconds = time.perf_counter() - t_start
        with atomic_dir(self.model_dir / "unet") as tmp:
            ema.save_pretrained(tmp, safe_serialization=True)
        write_json(self.model_dir / "done.json", {
            "fingerprint": fp, "steps": step, "train_seconds": round(seconds, 2),
            "final_loss": round(float(np.mean(losses[-50:])), 5), "train_images": len(x_all),
            "model_size": list(model_size(self.size, len(p["blocks"]))),
            "parameters": sum(q.numel() for q in ema.parameters())})
        state_path.unlink(missing_ok=True)

    def save_state(self, path: Path, unet, ema, opt, gen, step, seconds, losses, fp) -> None:
        import torch

        with atomic_path(path) as tmp:
            torch.save({"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "rng": gen.get_state(), "step": step, "seconds": seconds, "losses": losses,
                        "fingerprint": fp}, tmp)

    # ---- sampling -------------------------------------------------------------------------
    def sample(self, label: int, seeds: list[int]) -> np.ndarray:
        """uint8 N x H x W x C images of class ``label``, one per seed (the UNet's size)."""
        import torch

        c = self.channels
        h, w = model_size(self.size, len(self.preset["blocks"]))
        out = []
        for i in range(0, len(seeds), self.cfg.batch_size):
            chunk = seeds[i:i + self.cfg.batch_size]
            x = torch.stack([torch.randn((c, h, w), generator=torch.Generator().manual_seed(s)) for s in chunk])
            x = x.to(self.device)
            n = len(chunk)
            y = torch.tensor([label] * n + [self.num_classes] * n, device=self.device)
            sched = sampling_scheduler(self.opts.ddpm_sampler, self.preset["sample_steps"])
            g = self.opts.ddpm_guidance
            with torch.no_grad():
                for t in sched.timesteps:
                    eps_c, eps_u = self.unet(torch.cat([x, x]), t, class_labels=y).sample.chunk(2)
                    eps = eps_u + g * (eps_c - eps_u)
                    x = sched.step(eps, t, x).prev_sample
            out.append(to_uint8(x))
        return np.concatenate(out)

    def run_shard(self, shard: Shard, out_dir: Path) -> list[dict]:
        seeds = [sample_seed(self.cfg.seed, shard.label, i) for i in shard.indices()]
        return self.write_images(shard, self.sample(shard.label, seeds), out_dir)
