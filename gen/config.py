"""Configuration of the plan and generate stages (pydantic, the single source of truth).

Per-generator options are nested models whose field names carry the generator's prefix
(``ddpm_*``, ``featdict_*``, ``sd_*``) so that the CLI options generated from them
(``--sd-model``, ``--ddpm-preset``...) never collide.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class PlanConfig(BaseModel):
    """How many synthetic samples each class gets."""

    model_config = ConfigDict(extra="forbid")

    target: Literal["balance", "fixed", "sqrt", "room", "uniform"] = Field(
        "balance", description="per-class target: balance (every class up to the largest), fixed (`count` per "
        "class), sqrt (sqrt(n_c * n_max): the imbalance factor becomes its square root); with a `budget`: room "
        "(the budget goes where the estimated room is: each class's learning curve from `tailforge headroom`, "
        "quotas by the largest estimated marginal gain, no class above the largest) or uniform (the same number "
        "for every class below the largest)")
    count: Union[int, None] = Field(None, ge=1, description="target 'fixed': train images per class to reach")
    overgen: float = Field(1.5, ge=1.0, description="over-generation factor: generate ceil(need * overgen) so "
                           "the filter can reject the bad ones")
    budget: Union[int, None] = Field(None, description="cap on the total number of samples to generate; "
                                     "quotas shrink in proportion to need (targets room and uniform: the total "
                                     "they split)")
    classes: Union[list[Union[str, int]], None] = Field(
        None, description="which classes to top up: class names, ids, or groups (few, medium, many); "
        "default: every class below its target")

    @field_validator("classes", mode="before")
    @classmethod
    def _one_class(cls, v):
        return [v] if isinstance(v, (str, int)) else v

    @field_validator("budget")
    @classmethod
    def _budget_positive(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"budget must be at least 1 sample, got {v}")
        return v

    @model_validator(mode="after")
    def _count_for_fixed(self) -> "PlanConfig":
        if self.target == "fixed" and self.count is None:
            raise ValueError("target 'fixed' needs `count` (train images per class to reach)")
        if self.target in ("room", "uniform") and self.budget is None:
            raise ValueError(f"target '{self.target}' splits a total: set `budget` (samples to generate in all)")
        return self


class DDPMOptions(BaseModel):
    """In-domain class-conditional diffusion (diffusers UNet2DModel, classifier-free guidance)."""

    model_config = ConfigDict(extra="forbid")

    ddpm_preset: Literal["tiny", "fast", "full"] = Field(
        "fast", description="model/training size: tiny (tests, seconds on CPU), fast (digits default, ~30-60 s "
        "on 2 CPU cores), full (GPU: a real UNet trained for 40k steps)")
    ddpm_train_steps: Union[int, None] = Field(None, ge=1, description="optimizer steps (default: the preset's)")
    ddpm_train_batch: Union[int, None] = Field(None, ge=1, description="training batch size (default: the preset's)")
    ddpm_lr: Union[float, None] = Field(None, gt=0, description="AdamW learning rate (default: the preset's)")
    ddpm_sampler: Literal["ddim", "dpm"] = Field("ddim", description="sampler: ddim (eta 0) or dpm (DPM-Solver++)")
    ddpm_sample_steps: Union[int, None] = Field(None, ge=1, description="sampling steps (default: the preset's)")
    ddpm_guidance: float = Field(2.0, ge=0, description="classifier-free guidance scale w (eps_u + w (eps_c - eps_u))")
    ddpm_class_dropout: float = Field(0.1, ge=0, lt=1, description="training: probability of the null class (CFG)")
    ddpm_ema_decay: float = Field(0.995, ge=0, lt=1, description="EMA decay of the weights used for sampling")
    ddpm_checkpoint_every: int = Field(500, ge=1, description="save a resumable checkpoint every N steps")


class FeatDictOptions(BaseModel):
    """Feature-dictionary oversampling (after Park et al. 2022) in a trained classifier's feature space."""

    model_config = ConfigDict(extra="forbid")

    featdict_atoms: int = Field(32, ge=1, description="dictionary atoms per class (k-means centroids)")
    featdict_k: int = Field(5, ge=1, description="nearest same-class atoms to interpolate towards")
    featdict_variation: float = Field(0.5, ge=0, description="scale of the transferred head-class variation")


class FeatCovOptions(BaseModel):
    """Feature-space oversampling with borrowed head-class covariance (gen/featcov.py)."""

    model_config = ConfigDict(extra="forbid")

    featcov_scale: float = Field(1.0, ge=0, description="scale of the borrowed head-class variation added to a "
                                 "real tail anchor (0: copies of real features)")
    featcov_heads: int = Field(0, ge=0, description="borrow the covariance of the k head classes nearest to the "
                               "class (0: of every head class)")
    featcov_shrink: float = Field(0.0, ge=0, le=1, description="shrink the borrowed covariance towards its diagonal")
    featcov_pull: float = Field(0.0, ge=0, le=1, description="calibrated mean (TailCalibX, Yang et al.): move each "
                                "tail sample this fraction of the way from its anchor towards the mean of the "
                                "featcov_heads nearest head classes (needs featcov_heads > 0; 0: off)")
    featcov_alpha: float = Field(0.0, ge=0, description="add alpha x the mean variance to the borrowed covariance's "
                                 "diagonal (Yang et al.'s alpha, isotropic and scaled to the features; 0: off)")


class WarpOptions(BaseModel):
    """Smooth random deformation of real tail exemplars (gen/warp.py). Sizes are fractions of the image side."""

    model_config = ConfigDict(extra="forbid")

    warp_elastic: float = Field(0.035, ge=0, description="elastic displacement: standard deviation as a fraction "
                                "of the side (0.035 = 1 px at 28 px; 0: affine only)")
    warp_smooth: float = Field(0.14, gt=0, description="smoothness of the displacement field: Gaussian sigma as a "
                               "fraction of the side (0.14 = 4 px at 28 px, Simard et al.)")
    warp_rotate: float = Field(8.0, ge=0, le=180, description="largest rotation in degrees")
    warp_scale: float = Field(0.1, ge=0, lt=1, description="largest relative change of scale")
    warp_shear: float = Field(0.1, ge=0, le=1, description="largest shear")
    warp_translate: float = Field(0.0, ge=0, le=0.5, description="largest shift as a fraction of the side (the "
                                  "trainer's augmentation already shifts)")
    warp_flip: bool = Field(False, description="mirror half of the samples (photos; not letters or digits)")


class FDiffOptions(BaseModel):
    """Feature diffusion (gen/fdiff.py): a class-conditional diffusion model over a classifier's features."""

    model_config = ConfigDict(extra="forbid")

    fdiff_steps: int = Field(2000, ge=1, description="training steps of the denoiser (class-balanced batches of 256)")
    fdiff_width: int = Field(256, ge=8, description="hidden width of the MLP denoiser")
    fdiff_sample_steps: int = Field(25, ge=1, description="DDIM sampling steps")
    fdiff_guidance: float = Field(1.0, ge=0, description="classifier-free guidance scale (1: conditional model alone)")


class SDOptions(BaseModel):
    """Stable Diffusion text-to-image / image-to-image (diffusers)."""

    model_config = ConfigDict(extra="forbid")

    sd_model: Union[str, None] = Field(None, description="local diffusers folder (or hub id when online) of a "
                                       "Stable Diffusion pipeline")
    sd_mode: Literal["txt2img", "img2img"] = Field("txt2img", description="text-to-image, or image-to-image "
                                                   "from real exemplars of the class")
    sd_prompt: Union[str, None] = Field(None, description="prompt template; {class} is the class name (default: "
                                        "the dataset's template, else 'a photo of a {class}')")
    sd_negative_prompt: str = Field("blurry, low quality, text, watermark, cropped",
                                    description="negative prompt")
    sd_strength: float = Field(0.6, gt=0, le=1, description="img2img: how far from the exemplar (0..1)")
    sd_guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale")
    sd_steps: int = Field(30, ge=1, description="denoising steps")
    sd_scheduler: Literal["default", "ddim", "dpm", "euler", "pndm"] = Field(
        "dpm", description="scheduler (built from the model's scheduler config)")
    sd_size: Union[int, None] = Field(None, ge=8, description="generation size in pixels (default: the model's)")
    sd_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="weights dtype: auto = bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU")


class GenerateConfig(BaseModel):
    """Which generator runs the plan, and how."""

    model_config = ConfigDict(extra="forbid")

    generator: str = Field("ddpm", description="ddpm (in-domain image diffusion), featdict, featcov, fdiff "
                           "(feature vectors for the crt recipe), sd (Stable Diffusion), warp (deformed real tail images), oracle (the "
                           "long tail's held-back real train images: a perfect generator, the benchmark's oracle arm)")
    shard_size: int = Field(64, ge=1, description="samples per work unit: a class quota above this is split into shards of this size, "
                            "smaller quotas are grouped, several classes per unit (a shard is one class and an index range)")
    seed: int = Field(0, description="run seed; each sample's seed is f(seed, class, index)")
    batch_size: int = Field(64, ge=1, description="samples generated per forward pass")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:1 ...")
    feature_model: str = Field("baseline", description="feature generators (featdict, featcov, fdiff): the trained "
                               "classifier (models/<name>) whose backbone gives the feature space")
    ddpm: DDPMOptions = Field(default_factory=DDPMOptions, description="options of the ddpm generator")
    featdict: FeatDictOptions = Field(default_factory=FeatDictOptions, description="options of featdict")
    featcov: FeatCovOptions = Field(default_factory=FeatCovOptions, description="options of featcov")
    fdiff: FDiffOptions = Field(default_factory=FDiffOptions, description="options of fdiff")
    sd: SDOptions = Field(default_factory=SDOptions, description="options of the sd generator")
    warp: WarpOptions = Field(default_factory=WarpOptions, description="options of the warp generator")

    @field_validator("generator")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()
