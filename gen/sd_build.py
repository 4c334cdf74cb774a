"""Stable Diffusion pipelines built from configs (random weights, nothing downloaded).

``tiny`` is the size diffusers' own tests use (runs in seconds on CPU); ``sd15`` is the Stable
Diffusion 1.5 architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M), whose random
weights cost exactly what the real ones cost, for throughput benchmarks on a GPU. The tokenizer is
a CLIP BPE tokenizer made locally from a hand-written character vocabulary (no merges).
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path


def make_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for ch in string.ascii_lowercase + string.digits + ",.-'":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length,
                             pad_token="!")


def components(size: str = "tiny", seed: int = 0) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler of a StableDiffusionPipeline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if size == "tiny":
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
        vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=4, sample_size=32)
        text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=16,
                                            intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                                            vocab_size=100, max_position_embeddings=77))
        max_length = 77
    elif size == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768))
        max_length = 77
    else:
        raise ValueError(f"unknown size {size!r}: tiny or sd15")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=make_tokenizer(max_length),
                scheduler=scheduler)


def save_pipeline(path, size: str = "tiny", seed: int = 0) -> Path:
    """Build a pipeline from configs and ``save_pretrained`` it to ``path`` (a diffusers folder)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components(size, seed), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
