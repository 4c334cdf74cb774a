"""Stable Diffusion generator: text-to-image from per-dataset prompt templates, or image-to-image
from real exemplars of the class, resized (antialiased, grey when the dataset is grey) to the
dataset's resolution.

Throughput comes from doing per batch what a plain per-prompt loop does per image: the prompt
(and negative prompt) are encoded once per shard, ``batch_size`` images go through the UNet in one
call with one seeded ``torch.Generator`` per image (so an image does not depend on its batch
mates), weights in bf16/fp16 on a GPU, channels-last, PyTorch SDPA attention.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np

from tailforge.data import TailforgeError, load_images

from .base import Generator
from .config import SDOptions
from .planner import Plan
from .shards import Progress, Shard, class_rows, resolve_device, sample_seed

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_PROMPT = "a photo of a {class}"
PROMPTS = {
    "digits": "a scan of the handwritten digit {class}, white ink on black",
    "fashion-mnist": "a product photo of a {class}, grayscale, centered on a black background",
    "cifar10": "a photo of a {class}",
    "cifar100": "a photo of a {class}",
    "mini-imagenet": "a photo of a {class}",
}
NEEDS_MODEL_HINT = ("pass --sd-model PATH (a local diffusers Stable Diffusion folder with model_index.json, "
                    "unet/, vae/, text_encoder/, tokenizer/, scheduler/), or a hub id when online")


def prompt_for(template: str | None, dataset: str, class_name: str) -> str:
    return (template or PROMPTS.get(dataset, DEFAULT_PROMPT)).replace("{class}", class_name.replace("_", " "))


def pick_dtype(name: str, device: str):
    import torch

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name in ("fp16", "bf16") and not device.startswith("cuda"):
        raise TailforgeError(f"--sd-dtype {name} needs a GPU, and the device is {device}", "use --sd-dtype fp32 on CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_folder(path: Path) -> None:
    """A local pipeline folder must hold model_index.json and every component; name what is missing."""
    if not path.is_dir():
        raise TailforgeError(f"--sd-model {path} is not a folder", NEEDS_MODEL_HINT)
    if not (path / "model_index.json").is_file():
        raise TailforgeError(f"--sd-model {path} is not a diffusers pipeline folder (no model_index.json)",
                             NEEDS_MODEL_HINT)
    for comp in COMPONENTS:
        d = path / comp
        if not d.is_dir() or not any(d.iterdir()):
            raise TailforgeError(f"Stable Diffusion folder {path} lacks the '{comp}' component ({d}/ is missing "
                                 "or empty)", "copy the complete pipeline folder (save_pretrained writes all "
                                 "of " + ", ".join(COMPONENTS) + ")")


def load_pipeline(model: str | None, device: str = "cpu", dtype: str = "auto", scheduler: str = "default"):
    """StableDiffusionPipeline from a local folder (checked) or a hub id; no safety checker."""
    import torch
    from diffusers import StableDiffusionPipeline

    if not model:
        raise TailforgeError("the sd generator needs Stable Diffusion weights, and none were given", NEEDS_MODEL_HINT)
    path = Path(model).expanduser()
    kw = dict(safety_checker=None, requires_safety_checker=False,
              feature_extractor=None)
    kw[dtype_kwarg()] = pick_dtype(dtype, device)
    # accelerate is optional: with it, low-memory loading (less peak RAM); without it, say so to diffusers,
    # which otherwise prints its "accelerate not found" advice on every run
    kw["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
    if path.exists():
        check_folder(path)
        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kw)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith("."):
        try:
            pipe = StableDiffusionPipeline.from_pretrained(model, **kw)
        except Exception as exc:  # offline, unknown repo, gated model ...
            raise TailforgeError(f"could not load Stable Diffusion '{model}' from the hub "
                                 f"({type(exc).__name__}; offline?)", NEEDS_MODEL_HINT) from None
    else:
        raise TailforgeError(f"--sd-model {model} does not exist", NEEDS_MODEL_HINT)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device.startswith("cuda"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA (flash / mem-efficient kernels)
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.36); use whichever this version takes."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"


def make_scheduler(kind: str, config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
           "pndm": PNDMScheduler}.get(kind)
    if cls is None:  # "default": the scheduler the pipeline was saved with
        import diffusers

        return getattr(diffusers, config["_class_name"]).from_config(config)
    return cls.from_config(config)


class SDSampler:
    """Batched, seeded Stable Diffusion sampling: prompt encoded once, one generator per image."""

    def __init__(self, pipe, opts: SDOptions, batch_size: int, size: int | None = None):
        self.pipe, self.opts, self.batch_size = pipe, opts, batch_size
        self.size = size or opts.sd_size or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self._img2img = None

    @property
    def device(self):
        return self.pipe._execution_device

    def _embeds(self, prompt: str, n: int):
        import torch

        with torch.no_grad():
            pos, neg = self.pipe.encode_prompt(prompt, self.device, n, self.opts.sd_guidance > 1,
                                               self.opts.sd_negative_prompt)
        return pos, neg

    def _generators(self, seeds):
        import torch

        return [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def txt2img(self, prompt: str, seeds) -> np.ndarray:
        """uint8 N x S x S x 3, one image per seed."""
        out = []
        for i in range(0, len(seeds), self.batch_size):
            chunk = seeds[i:i + self.batch_size]
            pos, neg = self._embeds(prompt, len(chunk))
            res = self.pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=self.size, width=self.size,
                            num_inference_steps=self.opts.sd_steps, guidance_scale=self.opts.sd_guidance,
                            generator=self._generators(chunk), output_type="np")
            out.append(res.images)
        return to_uint8(np.concatenate(out))

    def img2img(self, prompt: str, seeds, parents: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 from uint8 exemplars N x h x w x 3 (resized up to the generation size)."""
        from diffusers import StableDiffusionImg2ImgPipeline
        from PIL import Image

        if int(self.opts.sd_steps * self.opts.sd_strength) < 1:
            raise TailforgeError(f"img2img with --sd-steps {self.opts.sd_steps} and --sd-strength "
                                 f"{self.opts.sd_strength} runs no denoising step", "raise --sd-steps or --sd-strength")
        if self._img2img is None:
            self._img2img = StableDiffusionImg2ImgPipeline(**self.pipe.components, requires_safety_checker=False)
            self._img2img.set_progress_bar_config(disable=True)
        out = []
        for i in range(0, len(seeds), self.batch_size):
            chunk = seeds[i:i + self.batch_size]
            images = [Image.fromarray(p).convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
                      for p in parents[i:i + self.batch_size]]
            pos, neg = self._embeds(prompt, len(chunk))
            res = self._img2img(prompt_embeds=pos, negative_prompt_embeds=neg, image=images,
                                strength=self.opts.sd_strength, num_inference_steps=self.opts.sd_steps,
                                guidance_scale=self.opts.sd_guidance, generator=self._generators(chunk),
                                output_type="np")
            out.append(res.images)
        return to_uint8(np.concatenate(out))


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


class SDGenerator(Generator):
    name = "sd"
    source = "sd"

    def prepare(self, plan: Plan, progress: Progress | None = None) -> None:
        o = self.cfg.sd
        device = resolve_device(self.cfg.device)
        pipe = load_pipeline(o.sd_model, device, o.sd_dtype, o.sd_scheduler)
        self.sampler = SDSampler(pipe, o, self.cfg.batch_size)

    def run_shard(self, shard: Shard, out_dir: Path) -> list[dict]:
        o = self.cfg.sd
        prompt = prompt_for(o.sd_prompt, self.info.get("name", ""), shard.class_name)
        seeds = [sample_seed(self.cfg.seed, shard.label, i) for i in shard.indices()]
        if o.sd_mode == "txt2img":
            images = self.sampler.txt2img(prompt, seeds)
            extra = [{"prompt": prompt} for _ in seeds]
            return self.write_images(shard, images, out_dir, source="sd", extra=extra)
        ex = class_rows(self.run, shard.label)
        if ex.empty:
            raise TailforgeError(f"img2img needs real train images of class '{shard.class_name}', and it has none",
                                 "use --sd-mode txt2img for this class")
        pick = [int(s % len(ex)) for s in seeds]  # the exemplar follows from the sample's seed
        parents = load_images(ex["uri"].iloc[pick], self.run.root, 3, self.size)
        images = self.sampler.img2img(prompt, seeds, parents)
        extra = [{"prompt": prompt, "strength": o.sd_strength, "parent_id": ex["sample_id"].iloc[j]} for j in pick]
        return self.write_images(shard, images, out_dir, source="sd-img2img", extra=extra)
