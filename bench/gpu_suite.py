"""Everything a GPU changes, measured side by side in one command (no internet, no hub weights).

    python bench/gpu_suite.py                          # on a GPU: the full table below, ~5 min on one H100/H200
    python bench/gpu_suite.py --device cpu --small     # CPU: the same code paths at toy size, < 2 min (a test)
    python bench/gpu_suite.py --only train,ddp         # some sections only

Writes ``bench/results/gpu_<device-name>.json`` and ``.md`` (``--out`` for another folder) and prints
every figure. Sections:

sd      Stable Diffusion txt2img and img2img: tailforge's sampler (``gen.sd.SDSampler`` over
        ``gen.sd.load_pipeline``: prompt encoded once per batch, batched UNet calls, one seeded generator
        per image, channels-last) vs a plain ``StableDiffusionPipeline`` loop, one image at a time, same
        folder, dtype (bf16 on a GPU), scheduler, prompts, seeds, steps and image count. Full size: the
        SD-1.5 architecture built from its configs with random weights (``gen.sd_build``; random weights
        cost what real ones cost), 512 px; plus SDXL's UNet alone (batch 1 vs batch 8, 1024 px) when the
        GPU has >= 40 GB. ``--small``: the tiny components of the tests at 32 px. Goal: ratio >= 3.
train   training throughput: ``train.fit`` (the real trainer on a run folder) vs a plain torch loop on the
        same uint8 tensors, model (``create_model``, same seed), batch size, optimiser (SGD, nesterov),
        cosine schedule, loss (CE) and augmentation op (``augment(basic)``: crop by translation + flip),
        bf16 autocast + channels_last on a GPU. The plain loop keeps the loss on the device (no per-step
        ``.item()``), so it is the faster plain loop. Both are timed over steps 2..S of each epoch (the
        trainer through its progress callback, after a device sync); the best epoch counts. ResNet-32 at
        32 px always; timm ResNet-50 and ConvNeXt-T at 224 px unless ``--small``. Goal: ratio >= 0.9.
ddpm    the in-domain diffusion model (``gen.ddpm``) at 32 px: training steps/s and sampling images/s
        (preset ``full`` on a GPU, ``tiny`` with ``--small``).
ddp     ``torchrun --nproc-per-node 1 -m tailforge.train.ddp`` with ``TAILFORGE_DDP_FORCE=1``: the trainer joins
        a process group of one (NCCL on a GPU, gloo on CPU), wraps the model in DDP and writes the model.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("sd", "train", "ddpm", "ddp")
CLASSES = ["airplane", "ship"]


# ----------------------------------------------------------------------------- helpers
def sync(dev: str) -> None:
    import torch

    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(dev: str) -> None:
    import torch

    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(dev: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.startswith("cuda") else None


def device_name(dev: str) -> str:
    import torch

    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(dev))
    return "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def make_run(root: Path, num_classes: int, per_class: int, size: int, test_per_class: int = 2, seed: int = 0):
    """A measured run folder of random uint8 images (balanced train split, small val/test splits)."""
    import numpy as np

    from tailforge.data import DataConfig, RawDataset, RawSplit, RunDir, build_manifest, measure_run

    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.repeat(np.arange(num_classes), n)
        return RawSplit(labels=labels, images=rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8))

    raw = RawDataset("bench", [f"class{c}" for c in range(num_classes)],
                     {"train": split(per_class), "test": split(test_per_class)}, channels=3, image_size=(size, size))
    run = RunDir(root)
    build_manifest(DataConfig(dataset="bench", profile="none", imbalance=1, seed=seed), run, raw=raw)
    measure_run(run)
    return run


# ----------------------------------------------------------------------------- sd
def bench_sd(dev: str, small: bool, tmp: Path) -> dict:
    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    from tailforge.gen.config import SDOptions
    from tailforge.gen.sd import SDSampler, dtype_kwarg, load_pipeline, make_scheduler, pick_dtype, prompt_for
    from tailforge.gen.sd_build import save_pipeline

    arch = "tiny" if small else "sd15"
    px, per_class, batch, steps = (32, 4, 4, 4) if small else (512, 16, 16, 20)
    strength = 0.5 if small else 0.6
    init = torch.device(dev) if dev.startswith("cuda") else contextlib.nullcontext()
    with init:  # random init on the GPU: seconds instead of a minute for SD-1.5 on CPU
        folder = save_pipeline(tmp / f"sd-{arch}", size=arch)
    opts = SDOptions(sd_model=str(folder), sd_steps=steps, sd_size=px, sd_scheduler="dpm", sd_strength=strength)
    jobs = [(prompt_for(None, "cifar10", c), list(range(k * per_class, (k + 1) * per_class)))
            for k, c in enumerate(CLASSES)]
    n = per_class * len(CLASSES)
    parents = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    dtype = pick_dtype("auto", dev)

    # tailforge: one sampler call per class (a shard), batched
    reset_peak(dev)
    pipe = load_pipeline(str(folder), dev, "auto", "dpm")
    ours = SDSampler(pipe, opts, batch)
    ours.txt2img(jobs[0][0], [0])  # warm-up (kernels, allocator)
    ours.img2img(jobs[0][0], [0], parents[:1])
    sync(dev)
    t = {}
    for mode in ("txt2img", "img2img"):
        t0 = time.perf_counter()
        for prompt, seeds in jobs:
            if mode == "txt2img":
                ours.txt2img(prompt, seeds)
            else:
                ours.img2img(prompt, seeds, parents[seeds])
        sync(dev)
        t[("ours", mode)] = time.perf_counter() - t0
    mem_ours = peak_gib(dev)
    del ours, pipe

    # plain: the loop people write, one image per pipeline call
    reset_peak(dev)
    plain = StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None, **{dtype_kwarg(): dtype}).to(dev)
    plain.scheduler = make_scheduler("dpm", plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    plain_i2i = StableDiffusionImg2ImgPipeline(**plain.components, requires_safety_checker=False)
    plain_i2i.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=steps, guidance_scale=opts.sd_guidance, negative_prompt=opts.sd_negative_prompt)

    def pil(i):
        from PIL import Image

        return Image.fromarray(parents[i]).resize((px, px), Image.Resampling.BICUBIC)

    plain(jobs[0][0], height=px, width=px, **common)  # warm-up
    plain_i2i(jobs[0][0], image=pil(0), strength=strength, **common)
    sync(dev)
    for mode in ("txt2img", "img2img"):
        t0 = time.perf_counter()
        for prompt, seeds in jobs:
            for s in seeds:
                g = torch.Generator(dev).manual_seed(s)
                if mode == "txt2img":
                    plain(prompt, height=px, width=px, generator=g, **common).images[0]
                else:
                    plain_i2i(prompt, image=pil(s), strength=strength, generator=g, **common).images[0]
        sync(dev)
        t[("plain", mode)] = time.perf_counter() - t0
    mem_plain = peak_gib(dev)
    del plain, plain_i2i
    reset_peak(dev)

    rows = []
    for mode in ("txt2img", "img2img"):
        o, p = n / t[("ours", mode)], n / t[("plain", mode)]
        rows.append({"mode": mode, "architecture": arch, "pixels": px, "images": n, "steps": steps, "batch": batch,
                     "dtype": str(dtype).replace("torch.", ""), "strength": strength if mode == "img2img" else None,
                     "tailforge_images_per_s": round(o, 3), "plain_images_per_s": round(p, 3),
                     "ratio": round(o / p, 2), "peak_gib_tailforge": mem_ours, "peak_gib_plain": mem_plain})
    out = {"rows": rows, "goal_ratio": 3.0}
    if not small and dev.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(dev)).total_memory / 2**30
        out["sdxl_unet"] = bench_sdxl_unet(dev) if total >= 40 else {"skipped": f"{total:.0f} GiB < 40 GiB"}
    return out


SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def sdxl_unet_steps(unet, batch: int, steps: int, dev: str, dtype, latent: int = 128) -> float:
    """Seconds for ``steps`` classifier-free-guided UNet calls on ``batch`` latents (2 x batch rows)."""
    import torch

    b = 2 * batch
    x = torch.randn(b, 4, latent, latent, device=dev, dtype=dtype)
    ctx = torch.randn(b, 77, 2048, device=dev, dtype=dtype)
    cond = {"text_embeds": torch.randn(b, 1280, device=dev, dtype=dtype),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * b, device=dev,
                                     dtype=dtype)}
    sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):
            unet(x, 999 - i * 50, encoder_hidden_states=ctx, added_cond_kwargs=cond)
    sync(dev)
    return time.perf_counter() - t0


def bench_sdxl_unet(dev: str, big_batch: int = 8, steps: int = 10) -> dict:
    """SDXL's UNet (2.6 B parameters) built from its config, bf16: denoising throughput at batch 1 vs 8."""
    import torch
    from diffusers import UNet2DConditionModel

    dtype = torch.bfloat16
    reset_peak(dev)
    with torch.device(dev):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype).eval()
    unet.to(memory_format=torch.channels_last)
    sdxl_unet_steps(unet, 1, 2, dev, dtype)  # warm-up
    one = sdxl_unet_steps(unet, 1, steps, dev, dtype)
    sdxl_unet_steps(unet, big_batch, 1, dev, dtype)
    big = sdxl_unet_steps(unet, big_batch, steps, dev, dtype)
    res = {"pixels": 1024, "steps": steps, "batch": big_batch, "dtype": "bfloat16",
           "parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6),
           "batch1_image_steps_per_s": round(steps / one, 2),
           "batched_image_steps_per_s": round(big_batch * steps / big, 2),
           "ratio": round(big_batch * one / big, 2), "peak_gib": peak_gib(dev)}
    del unet
    reset_peak(dev)
    return res


# ----------------------------------------------------------------------------- train
class StepClock:
    """Progress callback of ``train.fit``: times steps 2..S of every epoch (device synced at both ends)."""

    def __init__(self, steps: int, dev: str):
        self.steps, self.dev, self.t0, self.windows = steps, dev, None, []

    def __call__(self, done: int, total: int, info: dict) -> None:
        if info.get("event") == "epoch":
            return
        k = (done - 1) % self.steps + 1
        if k == 1:
            sync(self.dev)
            self.t0 = time.perf_counter()
        elif k == self.steps:
            sync(self.dev)
            self.windows.append(time.perf_counter() - self.t0)


def plain_loop(images, labels, mean, std, arch: str, num_classes: int, size: int, cfg, dev: str, steps: int,
               epochs: int, compile_model: bool = False) -> list[float]:
    """The hand-written loop on the same uint8 images: seconds of steps 2..S of each epoch."""
    import torch
    import torch.nn as nn

    from tailforge.train.augment import augment
    from tailforge.train.models import create_model, param_groups
    from tailforge.train.trainer import lr_lambda

    torch.manual_seed(cfg.seed)
    model = create_model(arch, num_classes, 3, size, width=cfg.width).to(dev)
    amp = dev.startswith("cuda") and cfg.amp
    if amp:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    x_all = torch.from_numpy(images).to(dev)
    y_all = torch.from_numpy(labels).to(dev)
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.epochs * steps, int(round(cfg.warmup * steps))))
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(cfg.seed)
    bs = cfg.batch_size
    windows = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=g)
        total = torch.zeros((), device=dev)
        for step in range(steps):
            if step == 1:
                sync(dev)
                t0 = time.perf_counter()
            idx = perm[step * bs:(step + 1) * bs].to(dev)
            x = x_all[idx].permute(0, 3, 1, 2).float().div_(255)
            x = augment(x, "basic", True, g)
            x = (x - m) / s
            if amp:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                logits = net(x)
            loss = crit(logits.float(), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        sync(dev)
        windows.append(time.perf_counter() - t0)
        total.item()
    return windows


def bench_train_one(arch: str, size: int, n_train: int, batch: int, epochs: int, dev: str, tmp: Path,
                    width: int | None = None, compile_plain: bool = False) -> dict:
    import numpy as np

    from tailforge.data import load_images, read_manifest
    from tailforge.train import TrainConfig, fit
    from tailforge.train.trainer import channel_stats

    num_classes = 10
    per_class = -(-n_train // num_classes)
    run = make_run(tmp / f"train-{arch}-{size}", num_classes, per_class, size)
    steps = per_class * num_classes // batch  # the trainer drops the last partial batch; so does the plain loop
    cfg = TrainConfig(model=arch, width=width, epochs=epochs, batch_size=batch, lr=0.1, weight_decay=5e-4,
                      warmup=1, loss="ce", sampler="instance", augment="basic", hflip=True, clip_grad=None,
                      device=dev, amp=True, eval_batch_size=256, ddp="off", seed=0)
    df = read_manifest(run.real)
    tr = df[df["split"] == "train"]
    images = load_images(tr["uri"], run.root, 3, (size, size))
    labels = tr["label"].to_numpy().astype(np.int64)
    mean, std = channel_stats(images)
    # plain, trainer, plain: a load that drifts during the run (a shared machine, clocks) hits both sides
    reset_peak(dev)
    half = max(2, epochs // 2)
    plain = plain_loop(images, labels, mean, std, arch, num_classes, size, cfg, dev, steps, half)
    mem_plain = peak_gib(dev)
    clock = StepClock(steps, dev)
    reset_peak(dev)
    fit(run, cfg, "trainer", progress=clock)
    mem_trainer = peak_gib(dev)
    plain += plain_loop(images, labels, mean, std, arch, num_classes, size, cfg, dev, steps, half)
    per_window = (steps - 1) * batch
    ours_ips, plain_ips = per_window / min(clock.windows), per_window / min(plain)
    row = {"model": arch, "pixels": size, "batch": batch, "train_images": per_class * num_classes, "epochs": epochs,
           "timed_steps_per_epoch": steps - 1, "width": width,
           "trainer_images_per_s": round(ours_ips, 1), "plain_images_per_s": round(plain_ips, 1),
           "ratio": round(ours_ips / plain_ips, 3),
           "ratio_median_epoch": round(statistics.median(plain) / statistics.median(clock.windows), 3),
           "trainer_epoch_s": [round(w, 3) for w in clock.windows], "plain_epoch_s": [round(w, 3) for w in plain],
           "peak_gib_trainer": mem_trainer, "peak_gib_plain": mem_plain}
    if compile_plain:
        reset_peak(dev)
        comp = plain_loop(images, labels, mean, std, arch, num_classes, size, cfg, dev, steps, epochs,
                          compile_model=True)
        row["plain_compiled_images_per_s"] = round(per_window / min(comp[1:] or comp), 1)
    shutil.rmtree(run.root, ignore_errors=True)
    return row


def bench_train(dev: str, small: bool, tmp: Path, compile_plain: bool = False) -> dict:
    if small:
        jobs = [("resnet32", 32, 384, 128, 4)]  # 3 steps an epoch, 2 timed
    else:
        jobs = [("resnet32", 32, 128 * 40, 128, 3), ("resnet50", 224, 128 * 16, 128, 3),
                ("convnext_tiny", 224, 128 * 16, 128, 3)]
    rows = []
    for arch, size, n, bs, ep in jobs:
        rows.append(bench_train_one(arch, size, n, bs, ep, dev, tmp, compile_plain=compile_plain))
        report_rows("train", [rows[-1]])
    return {"rows": rows, "goal_ratio": 0.9}


# ----------------------------------------------------------------------------- ddpm
def bench_ddpm(dev: str, small: bool, tmp: Path) -> dict:
    from tailforge.data import read_json
    from tailforge.gen.config import DDPMOptions, GenerateConfig
    from tailforge.gen.ddpm import DDPMGenerator

    preset, steps, batch, n, per_class = ("tiny", 10, 8, 8, 8) if small else ("full", 200, 256, 512, 256)
    run = make_run(tmp / "ddpm", 10, per_class, 32)
    cfg = GenerateConfig(generator="ddpm", device=dev, batch_size=batch,
                         ddpm=DDPMOptions(ddpm_preset=preset, ddpm_train_steps=steps))
    gen = DDPMGenerator(run, cfg, run.dataset_info())
    gen.prepare(None)  # trains (timed inside: done.json) and loads the EMA UNet
    done = read_json(gen.model_dir / "done.json")
    gen.sample(0, [0])  # warm-up
    sync(dev)
    t0 = time.perf_counter()
    gen.sample(1, list(range(n)))
    sync(dev)
    secs = time.perf_counter() - t0
    res = {"preset": preset, "pixels": 32, "parameters_m": round(done["parameters"] / 1e6, 2),
           "train_steps": done["steps"], "train_batch": gen.preset["batch"],
           "train_steps_per_s": round(done["steps"] / done["train_seconds"], 2),
           "sample_images": n, "sample_batch": batch, "sample_steps": gen.preset["sample_steps"],
           "sample_images_per_s": round(n / secs, 2)}
    shutil.rmtree(run.root, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- ddp
def bench_ddp(dev: str, small: bool, tmp: Path) -> dict:
    from tailforge.data import read_json
    from tailforge.train import TrainConfig

    backend = "nccl" if dev.startswith("cuda") else "gloo"
    run = make_run(tmp / "ddp", 10, 8 if small else 64, 32)
    cfg = TrainConfig(model="tiny" if small else "resnet32", width=8 if small else None, epochs=1 if small else 2,
                      batch_size=16 if small else 128, hflip=True, device="cuda" if dev.startswith("cuda") else "cpu",
                      ddp="auto", seed=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "tailforge.train.ddp", str(run.root), "ddp-smoke", cfg.model_dump_json()]
    env = dict(os.environ, TAILFORGE_DDP_FORCE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - t0
    res = {"command": "torchrun --standalone --nproc-per-node 1 -m tailforge.train.ddp RUN ddp-smoke CONFIG "
           "(TAILFORGE_DDP_FORCE=1)", "backend": backend, "model": cfg.model, "epochs": cfg.epochs,
           "exit_code": proc.returncode, "seconds": round(secs, 1)}
    conf = run.model_dir("ddp-smoke") / "config.json"
    if proc.returncode != 0 or not conf.exists():
        res.update(ok=False, output_tail=(proc.stdout + proc.stderr)[-2000:])
        return res
    meta = read_json(conf)["meta"]
    res.update(ok=meta.get("ddp_world_size") == 1, world_size=meta.get("ddp_world_size"), device=meta.get("device"),
               best_epoch=meta.get("best_epoch"))
    shutil.rmtree(run.root, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- report
def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k)) for _, k in cols) + " |")
    return "\n".join(out)


SD_COLS = [("mode", "mode"), ("architecture", "architecture"), ("px", "pixels"), ("images", "images"),
           ("steps", "steps"), ("batch", "batch"), ("dtype", "dtype"), ("tailforge img/s", "tailforge_images_per_s"),
           ("plain img/s", "plain_images_per_s"), ("ratio", "ratio"), ("peak GiB tailforge", "peak_gib_tailforge"),
           ("peak GiB plain", "peak_gib_plain")]
TRAIN_COLS = [("model", "model"), ("px", "pixels"), ("batch", "batch"), ("train images", "train_images"),
              ("epochs", "epochs"), ("trainer img/s", "trainer_images_per_s"), ("plain img/s", "plain_images_per_s"),
              ("ratio (best epoch)", "ratio"), ("ratio (median epoch)", "ratio_median_epoch"),
              ("peak GiB trainer", "peak_gib_trainer"), ("peak GiB plain", "peak_gib_plain")]
DDPM_COLS = [("preset", "preset"), ("px", "pixels"), ("params (M)", "parameters_m"), ("train steps", "train_steps"),
             ("train batch", "train_batch"), ("train steps/s", "train_steps_per_s"), ("sample images", "sample_images"),
             ("sample steps", "sample_steps"), ("sample img/s", "sample_images_per_s")]
DDP_COLS = [("backend", "backend"), ("model", "model"), ("epochs", "epochs"), ("ok", "ok"),
            ("world size", "world_size"), ("device", "device"), ("seconds", "seconds")]
SDXL_COLS = [("px", "pixels"), ("params (M)", "parameters_m"), ("steps", "steps"), ("batch", "batch"),
             ("batch-1 image-steps/s", "batch1_image_steps_per_s"), ("batched image-steps/s",
                                                                    "batched_image_steps_per_s"),
             ("ratio", "ratio"), ("peak GiB", "peak_gib")]


def report_rows(section: str, rows: list[dict]) -> None:
    for r in rows:
        print(f"[{section}] " + ", ".join(f"{k} {fmt(v)}" for k, v in r.items() if not isinstance(v, list)),
              flush=True)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# GPU suite: {m['device_name']}{' (--small)' if res['small'] else ''}", "",
             f"`{res['command']}` on {m['date']}: device {m['device_name']}, torch {m['torch']}, diffusers "
             f"{m['diffusers']}, timm {m['timm']}, {m['cpus']} CPUs, {m['torch_threads']} torch threads, load "
             f"average {m['load_average']}; whole suite {res['seconds']:.0f} s.", ""]
    s = res["sections"]
    if "sd" in s:
        lines += ["## Stable Diffusion: tailforge's sampler vs a plain one-image-at-a-time pipeline loop", ""]
        if "error" in s["sd"]:
            lines += [f"error: {s['sd']['error']}", ""]
        else:
            lines += [table(s["sd"]["rows"], SD_COLS), "", f"Goal: ratio >= {s['sd']['goal_ratio']:g}.", ""]
            xl = s["sd"].get("sdxl_unet")
            if xl:
                lines += ["SDXL UNet alone (random weights, classifier-free guidance, denoising steps only):", ""]
                lines += [f"skipped: {xl['skipped']}" if "skipped" in xl else
                          f"error: {xl['error']}" if "error" in xl else table([xl], SDXL_COLS), ""]
    if "train" in s:
        lines += ["## Training throughput: `train.fit` vs a plain torch loop (same tensors, model, batch)", ""]
        if "error" in s["train"]:
            lines += [f"error: {s['train']['error']}", ""]
        else:
            lines += [table(s["train"]["rows"], TRAIN_COLS), "",
                      f"Goal: ratio >= {s['train']['goal_ratio']:g}. Timed: steps 2..S of each epoch, best epoch "
                      "(ratio) and median epoch; the plain loop keeps the loss on the device.", ""]
    if "ddpm" in s:
        lines += ["## In-domain diffusion (gen.ddpm) at 32 px", ""]
        lines += [f"error: {s['ddpm']['error']}" if "error" in s["ddpm"] else table([s["ddpm"]], DDPM_COLS), ""]
    if "ddp" in s:
        lines += ["## DDP smoke through the trainer", ""]
        lines += [f"error: {s['ddp']['error']}" if "error" in s["ddp"] else table([s["ddp"]], DDP_COLS), ""]
        if "command" in s["ddp"]:
            lines += [f"`{s['ddp']['command']}`", ""]
    return "\n".join(lines)


def machine(dev: str) -> dict:
    import diffusers
    import timm
    import torch

    return {"device": dev, "device_name": device_name(dev), "torch": torch.__version__,
            "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "timm": timm.__version__,
            "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}


def quiet_libraries() -> None:
    """No progress bars or advice from diffusers/transformers: one line per figure."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cuda:N or cpu")
    ap.add_argument("--small", action="store_true", help="toy sizes (tiny SD, ResNet-32 only, tiny ddpm): CPU, "
                    "under 2 minutes; the full sizes need a GPU")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of gpu_<device-name>.json/.md")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU, torch's default on GPU)")
    ap.add_argument("--compile", action="store_true", help="train: also time the plain loop under torch.compile")
    args = ap.parse_args(argv)

    import torch

    quiet_libraries()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {', '.join(bad)}: choose from {', '.join(SECTIONS)}")
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {dev}: no CUDA GPU is visible (use --device cpu --small)")
    if not dev.startswith("cuda") and not args.small:
        ap.error("the full-size suite (SD-1.5 at 512 px, ResNet-50 at 224 px) needs a GPU: on CPU pass --small")
    if args.threads or not dev.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)
    if dev.startswith("cuda"):
        torch.backends.cudnn.benchmark = True

    name = slug(device_name(dev)) + ("-small" if args.small and dev.startswith("cuda") else "")
    res = {"command": "python bench/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "small": args.small, "machine": machine(dev), "sections": {}}
    print(f"gpu suite on {res['machine']['device_name']} ({dev}{', small' if args.small else ''}): "
          f"{', '.join(sections)}", flush=True)
    t_all = time.perf_counter()
    failed = []
    tmp = Path(tempfile.mkdtemp(prefix="tf-gpu-suite-"))
    try:
        for sec in sections:
            t0 = time.perf_counter()
            try:
                if sec == "sd":
                    out = bench_sd(dev, args.small, tmp)
                    report_rows("sd", out["rows"])
                    if out.get("sdxl_unet"):
                        report_rows("sdxl-unet", [out["sdxl_unet"]])
                elif sec == "train":
                    out = bench_train(dev, args.small, tmp, args.compile)
                elif sec == "ddpm":
                    out = bench_ddpm(dev, args.small, tmp)
                    report_rows("ddpm", [out])
                else:
                    out = bench_ddp(dev, args.small, tmp)
                    report_rows("ddp", [out])
                    if not out.get("ok"):
                        failed.append(sec)
            except Exception as exc:  # noqa: BLE001 - one section's failure must not cost the others' figures
                traceback.print_exc()
                out = {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"}
                failed.append(sec)
            out["seconds"] = round(time.perf_counter() - t0, 1)
            res["sections"][sec] = out
            print(f"[{sec}] {out['seconds']} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - t_all, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = args.out / f"gpu_{name}.json", args.out / f"gpu_{name}.md"
    jpath.write_text(json.dumps(res, indent=2) + "\n")
    mpath.write_text(markdown(res))
    print(f"wrote {jpath} and {mpath} ({res['seconds']:.0f} s)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
