"""``fit``: train one classifier on a run, selecting the epoch by val balanced accuracy.

Read top to bottom like torchvision's reference script: data -> model -> loss -> optimiser and
schedule -> epochs (sample, augment, mix, step, EMA, validate, save a resumable state) -> write
``models/<name>/`` atomically. Work in progress lives in ``models/.work-<name>/``; every epoch
ends with a state (weights, optimiser, schedule, EMA, best so far, log) from which ``resume``
replays the remaining epochs exactly: each epoch's sampling and augmentation are seeded by
(seed, epoch), not by what ran before.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from tailforge.data.atomic import atomic_dir, atomic_path, read_json, write_json, write_text
from tailforge.data.errors import TailforgeError, unknown_name
from tailforge.data.integrity import folder_ok
from tailforge.data.images import load_images, load_npy
from tailforge.data.manifest import is_feature, read_manifest, train_rows
from tailforge.data.measure import ClassStats
from tailforge.data.run import RunDir

from .augment import augment, mix
from .checkpoint import build_from_meta, embed, load_model, resolve_device
from .features import backbone_features
from .heads import finish as finish_head
from .clip import ClipAdapter, adapter_for_run, base_features, check_folder, move_towers
from .config import CLIP_ADAPTER, TrainConfig
from .kd import KD_LOSSES, build_kd, class_prototypes, feature_map_or_error, group_alpha, kd_warmup_epochs, mix_kd, \
    PatchKD
from .losses import LOSSES, build_loss, supcon
from .lossaug import LossGuided, gather_update
from .models import (MODELS, TIMM_MODELS, create_model, load_pretrained, make_head, param_groups, pretrained_norm,
                     use_nhwc)
from .weights import check_arch, resolve as resolve_weights
from .samplers import SAMPLERS, epoch_indices, shard_indices
from . import tb

STATE = "state.pt"
log = logging.getLogger("tailforge")


# ----------------------------------------------------------------------------- data
def training_table(run: RunDir, cfg: TrainConfig) -> pd.DataFrame:
    """Real train rows plus the synthetic rows ``cfg.synthetic`` asks for (accepted ones only)."""
    real = read_manifest(run.require(run.real, "measure"))
    if cfg.synthetic == "none":
        return train_rows(real[real["source"] == "real"])
    run = run.view(cfg.synthetic_source)
    if cfg.synthetic == "filtered":
        syn = read_manifest(run.require(run.filtered, "filter"))
    else:
        syn = read_manifest(run.require(run.candidates, "generate")).assign(accepted=True)
    df = pd.concat([real, syn[~syn["sample_id"].isin(real["sample_id"])]], ignore_index=True)
    return train_rows(df)


def topped_classes(run: RunDir, real_counts: np.ndarray) -> np.ndarray:
    """Class ids the run's plan tops up (need > 0), or a room / uniform plan chose among (its curve_classes:
    headroom's curve stays the same whatever the split); without a plan, every class below the largest."""
    if run.plan.exists():
        plan = read_json(run.plan)
        if plan.get("curve_classes"):
            return np.array(sorted(int(c) for c in plan["curve_classes"]), dtype=np.int64)
        return np.array(sorted(int(q["label"]) for q in plan["classes"] if int(q["need"]) > 0), dtype=np.int64)
    return np.flatnonzero(real_counts < real_counts.max())


def subsample_topped(run: RunDir, rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Keep ``fraction`` of the REAL train rows of each class the plan tops up (at least 2, or all a class has),
    a seeded choice; the other rows stay. The learning-curve points of ``tailforge headroom``."""
    real = (rows["source"] == "real").to_numpy()
    labels = rows["label"].to_numpy()
    topped = set(topped_classes(run, np.bincount(labels[real])).tolist())
    rng = np.random.default_rng([seed, 4099])
    drop = []
    for c in sorted(topped):
        idx = np.flatnonzero(real & (labels == c))
        keep = min(len(idx), max(2, int(round(fraction * len(idx)))))
        drop.append(np.setdiff1d(idx, rng.choice(idx, keep, replace=False)))
    drop = np.concatenate(drop) if drop else np.zeros(0, np.int64)
    return rows.drop(index=rows.index[drop])


def featdict_vectors(run: RunDir, rows: pd.DataFrame) -> np.ndarray:
    """Feature vectors of featdict rows (``path.npy#row`` uris), float32 (N, D)."""
    out = []
    for uri in rows["uri"]:
        path, row = run.resolve(uri)
        arr = load_npy(path)
        out.append(np.asarray(arr[row] if row is not None else arr, dtype=np.float32).reshape(-1))
    return np.stack(out) if out else np.zeros((0, 0), np.float32)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255
    return x.mean(0).round(6).tolist(), np.maximum(x.std(0), 1e-3).round(6).tolist()


# ----------------------------------------------------------------------------- helpers
class EMA:
    """Exponential moving average of a module's parameters and buffers (the copy is what we validate)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), module.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - self.decay)
            else:
                e.copy_(m)


def lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Seed torch's global RNG (dropout, RandAugment, equalization) and return the augmentation generator.

    Each DDP rank gets its own stream (rank 0's is the single-process one).
    """
    s = (seed * 1_000_003 + epoch * 7919 + 12345 + rank * 104_729) % (2**63 - 1)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s + 1)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    n = np.bincount(y)
    hit = np.bincount(y[pred == y], minlength=len(n))
    present = n > 0
    return float(np.mean(hit[present] / n[present]))


# ----------------------------------------------------------------------------- tasks
class ImageTask:
    """Full training: the trainable module is the whole model; inputs are augmented images."""

    def __init__(self, model, meta, images, val_images, cfg: TrainConfig, dev, teacher=None):
        self.model, self.meta, self.cfg, self.dev, self.teacher = model, meta, cfg, dev, teacher
        keep_on_dev = dev.type == "cuda" and images.nbytes < 4e9
        self.images = torch.from_numpy(images).to(dev if keep_on_dev else "cpu")
        self.val_images = val_images
        self.mean = torch.tensor(meta["mean"], device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor(meta["std"], device=dev).view(1, -1, 1, 1)
        self.channels_last = use_nhwc(model, cfg.channels_last, cfg.amp, dev)
        self.patch = None  # PatchKD (train/kd.py) when cfg.kd_patch > 0
        self.policy: LossGuided | None = None  # aug_policy loss_guided (set by fit)

    @property
    def net(self) -> nn.Module:
        return self.model

    def inputs(self, idx: np.ndarray, y: torch.Tensor, g: torch.Generator):
        x = self.images[torch.from_numpy(idx).to(self.images.device)].to(self.dev, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255)
        if self.policy is not None:  # per-sample RandAugment from the moving losses, before the base augmentation
            x = self.policy.augment(x, idx, g)
        x = augment(x, self.cfg.augment, self.cfg.hflip, g)
        x, ya, yb, lam = mix(x, y, self.cfg.mixup, self.cfg.cutmix, g)
        return x, ya, yb, lam

    def forward(self, net, x01):
        x = (x01 - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.patch is not None:  # patch distillation: the feature map too (inside DDP's forward)
            fmap = net.feature_map(x)
            f = net.pool_map(fmap)
            return net.forward_head(f), f, fmap
        f = net.forward_features(x)
        return net.forward_head(f), f

    def _teacher_in(self, x01):
        t, tmeta = self.teacher
        mean = torch.tensor(tmeta["mean"], device=self.dev).view(1, -1, 1, 1)
        std = torch.tensor(tmeta["std"], device=self.dev).view(1, -1, 1, 1)
        return t, (x01 - mean) / std

    @torch.no_grad()
    def teacher_out(self, x01):
        """The teacher's logits and (with patch distillation) its last feature map; no gradient, eval mode."""
        t, x = self._teacher_in(x01)
        if self.patch is None:
            return t(x).float(), None
        fmap = t.feature_map(x)
        return t.forward_head(t.pool_map(fmap)).float(), fmap

    def teacher_logits(self, x01):
        return self.teacher_out(x01)[0]

    def make_patch(self, labels: np.ndarray, groups: list[str]) -> PatchKD:
        """PatchKD for this student and teacher: channels from one forward, class prototypes from the teacher's
        pooled features of the (un-augmented) train images."""
        t, tmeta = self.teacher
        probe = self.images[:2].to(self.dev).permute(0, 3, 1, 2).float().div_(255)
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            s_ch = feature_map_or_error(self.model, (probe - self.mean) / self.std, "student").shape[1]
            self.model.train(was)
            t_ch = feature_map_or_error(t, self._teacher_in(probe)[1], "teacher").shape[1]
        bs = self.cfg.eval_batch_size
        batches = (self._teacher_in(self.images[i:i + bs].to(self.dev).permute(0, 3, 1, 2).float().div_(255))[1]
                   for i in range(0, len(self.images), bs))
        protos = class_prototypes(t.forward_features, batches, labels, len(groups))
        order = {g: i for i, g in enumerate(("many", "medium", "few"))}
        class_group = torch.tensor([order.get(g, 0) for g in groups])
        return PatchKD(s_ch, t_ch, protos, class_group, self.cfg.kd_patch_count, self.cfg.kd_patch_size).to(self.dev)

    @torch.no_grad()
    def val_logits(self, net) -> np.ndarray:
        from .checkpoint import predict_logits

        was = net.training
        out = predict_logits(net, self.meta, self.val_images, self.cfg.eval_batch_size, None)
        net.train(was)
        return out


class FeatureTask:
    """cRT: the backbone is frozen; the trainable module is the head; inputs are precomputed features."""

    def __init__(self, model, feats, val_feats, cfg: TrainConfig, dev):
        self.model, self.cfg, self.dev = model, cfg, dev
        self.feats = torch.from_numpy(feats).to(dev)
        self.val_feats = torch.from_numpy(val_feats).to(dev)
        self.teacher = None

    @property
    def net(self) -> nn.Module:
        return self.model.head

    def inputs(self, idx, y, g):
        return self.feats[torch.from_numpy(idx).to(self.dev)], y, y, 1.0

    def forward(self, net, f):
        return net(f), f

    @torch.no_grad()
    def val_logits(self, net) -> np.ndarray:
        was = net.training
        net.eval()
        out = torch.cat([net(self.val_feats[i:i + 4096]).float().cpu() for i in range(0, len(self.val_feats), 4096)])
        net.train(was)
        return out.numpy()


# ----------------------------------------------------------------------------- setup
def check_names(cfg: TrainConfig) -> None:
    if cfg.loss not in LOSSES:
        raise unknown_name("loss", cfg.loss, LOSSES)
    if cfg.sampler not in SAMPLERS:
        raise unknown_name("sampler", cfg.sampler, SAMPLERS)
    if cfg.stage == "full" and cfg.model not in MODELS:
        import timm

        if not timm.is_model(cfg.model):
            raise unknown_name("model", cfg.model, MODELS)
    if cfg.kd is not None and cfg.kd not in KD_LOSSES:
        raise unknown_name("kd", cfg.kd, KD_LOSSES)
    if cfg.stage == "crt" and cfg.teacher:
        raise TailforgeError("distillation (teacher) is not supported with stage crt",
                             "distil in the full stage, then run crt on the student")
    if cfg.stage == "full" and cfg.model == CLIP_ADAPTER:
        check_folder(cfg.pretrained)  # before anything runs: the missing file and how to provide it
    elif cfg.stage == "full" and cfg.pretrained is not None:  # the weights exist and fit --model, or one line
        check_arch(resolve_weights(cfg.pretrained), cfg.model, TIMM_MODELS.get(cfg.model, (cfg.model,))[0])


def _model_folder(run: RunDir, name: str) -> Path:
    p = Path(name)
    if p.is_dir() and (p / "config.json").exists():
        return p
    d = run.model_dir(name)
    if not (d / "config.json").exists():
        raise TailforgeError(f"model '{name}' is not trained in run {run.root}",
                             f"train it first (models here: {', '.join(run.models()) or 'none'})")
    return d


def _setup(run: RunDir, cfg: TrainConfig, dev: torch.device):
    """Build (task, labels, sample weights, meta, info) for the stage."""
    info = run.dataset_info()
    nc, chans = info["num_classes"], info["channels"]
    size = tuple(info["image_size"])
    rows = training_table(run, cfg)
    is_real = (rows["source"] == "real").to_numpy()
    # the budget is that of the full real set, also when tail_fraction thins the topped-up classes
    budget = {"real_samples": int(is_real.sum()),
              "real_class_max": int(rows.loc[is_real, "label"].value_counts().max()) if is_real.any() else 0}
    if cfg.tail_fraction < 1:
        rows = subsample_topped(run, rows, cfg.tail_fraction, cfg.seed)
    real_all = read_manifest(run.real)
    val = real_all[(real_all["split"] == "val") & (real_all["source"] == "real")]
    if rows.empty or (rows["source"] == "real").sum() == 0:
        raise TailforgeError(f"run {run.root} has no real training images", "build the run with `tailforge measure`")
    if val.empty:
        raise TailforgeError(f"run {run.root} has no val split for model selection",
                             "rebuild the run with a val fraction > 0")
    is_feat = pd.Series(is_feature(rows), index=rows.index)
    img_rows = rows[~is_feat]
    meta_extra = {"n_real": int((rows["source"] == "real").sum()), "n_synthetic_images": int((~is_feat).sum()
                  - (rows["source"] == "real").sum()), "n_featdict": 0}

    if cfg.stage == "crt":
        bdir = _model_folder(run, cfg.base)
        base, bmeta = load_model(bdir, dev)
        if bmeta["num_classes"] != nc:
            raise TailforgeError(f"base model '{cfg.base}' has {bmeta['num_classes']} classes, this run {nc}",
                                 "use a base model trained on this run")
        loss_head = LOSSES[cfg.loss].head
        base.head = make_head(loss_head, base.feature_dim, nc, cfg.scale).to(dev)
        for p in base.backbone.parameters():
            p.requires_grad_(False)
        if isinstance(base, ClipAdapter):  # its features are in the run's cache
            feats, val_feats = base_features(run, base, bmeta, img_rows, val, info, cfg.eval_batch_size, dev)
        else:
            enc = lambda x: embed(base, bmeta, x, cfg.eval_batch_size, dev)  # noqa: E731
            feats, val_feats = (backbone_features(run, bdir, enc, r["uri"].tolist(), chans, size) for r in (img_rows, val))
        fd = rows[is_feat]
        if "feature_model" in fd.columns:
            fd = fd[fd["feature_model"] == cfg.base]
        else:
            fd = fd.iloc[0:0]
        labels = img_rows["label"].to_numpy()
        sources = img_rows["source"].to_numpy()
        if len(fd):
            vec = featdict_vectors(run, fd)
            if vec.shape[1] != feats.shape[1]:
                raise TailforgeError(f"featdict features have dimension {vec.shape[1]} but '{cfg.base}' gives "
                                     f"{feats.shape[1]}", "generate featdict samples from this base model")
            feats = np.concatenate([feats, vec])
            labels = np.concatenate([labels, fd["label"].to_numpy()])
            sources = np.concatenate([sources, fd["source"].to_numpy()])
        meta_extra["n_featdict"] = int(len(fd))
        meta = {**bmeta, "head": loss_head, "scale": cfg.scale}
        task = FeatureTask(base, feats, val_feats, cfg, dev)
        model = base
    elif cfg.model == CLIP_ADAPTER:  # frozen CLIP: the adapter trains on cached features, like cRT
        loss_head = LOSSES[cfg.loss].head
        model, feats, val_feats, clip_meta = adapter_for_run(run, cfg, info, img_rows, val, loss_head, dev)
        meta = {"arch": CLIP_ADAPTER, "num_classes": nc, "in_chans": chans, "image_size": list(size),
                "input_size": model.input_size, "mean": [0.0] * chans, "std": [1.0] * chans,  # CLIP normalises
                "feature_dim": model.feature_dim, "class_names": info["class_names"], "head": loss_head,
                "scale": cfg.scale, "width": None, "clip": clip_meta}
        model = model.to(dev)
        task = FeatureTask(model, feats, val_feats, cfg, dev)
        labels = img_rows["label"].to_numpy()
        sources = img_rows["source"].to_numpy()
        meta_extra["n_featdict_ignored"] = int(is_feat.sum())
    else:
        imgs = load_images(img_rows["uri"], run.root, chans, size)
        real_imgs = imgs[(img_rows["source"] == "real").to_numpy()]
        mean, std = channel_stats(real_imgs)
        loss_head = LOSSES[cfg.loss].head
        model = create_model(cfg.model, nc, chans, max(size), width=cfg.width, head=loss_head, scale=cfg.scale,
                             input_size=cfg.input_size)
        if cfg.pretrained is not None:  # the weights' own inputs (pretrained_cfg), recorded in the model folder
            mean, std = pretrained_norm(cfg.pretrained, chans)
            meta_extra["pretrained"] = pre = {"path": str(cfg.pretrained), **load_pretrained(model, cfg.pretrained)}
            log.info("pretrained %s: %d of %d backbone tensors loaded (by %s), %d of the file's %d not used (a "
                     "classifier, or tensors this backbone lacks)", cfg.pretrained, pre["loaded"], pre["loaded"] + pre["missing"], pre["rule"],
                     pre["skipped"], pre["file_tensors"])
            if pre["missing"]:
                log.warning("pretrained %s: %d backbone tensors have no match there and keep their random "
                            "initialisation", cfg.pretrained, pre["missing"])
        meta = {"arch": cfg.model, "num_classes": nc, "in_chans": chans, "image_size": list(size),
                "input_size": model.input_size, "mean": mean, "std": std, "feature_dim": model.feature_dim,
                "class_names": info["class_names"], "head": loss_head, "scale": cfg.scale, "width": cfg.width}
        model = model.to(dev)
        if use_nhwc(model, cfg.channels_last, cfg.amp, dev):
            model = model.to(memory_format=torch.channels_last)
        teacher = None
        if cfg.teacher:
            t, tmeta = load_model(_model_folder(run, cfg.teacher), dev)
            if tmeta["num_classes"] != nc:
                raise TailforgeError(f"teacher '{cfg.teacher}' has {tmeta['num_classes']} classes, this run {nc}",
                                     "use a teacher trained on this dataset")
            t.requires_grad_(False)  # the teacher never learns: no gradient reaches it
            teacher = (t.eval(), tmeta)
        val_imgs = load_images(val["uri"], run.root, chans, size)
        task = ImageTask(model, meta, imgs, val_imgs, cfg, dev, teacher)
        labels = img_rows["label"].to_numpy()
        sources = img_rows["source"].to_numpy()
        meta_extra["n_featdict_ignored"] = int(is_feat.sum())
    weights = np.where(sources == "real", 1.0, cfg.synthetic_weight).astype(np.float32)
    counts = np.bincount(labels, minlength=nc)
    meta["train_counts"] = counts.tolist()
    meta.update(budget)
    if cfg.prior == "real":  # the loss sees the real class frequencies (the sampler still sees every sample)
        counts = np.bincount(labels[sources == "real"], minlength=nc)
        meta["prior_counts"] = counts.tolist()
    meta.update(meta_extra)
    return task, model, labels, weights, counts, meta, val["label"].to_numpy()


# ----------------------------------------------------------------------------- distributed
def dist_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when torchrun launched this process in a job of more than one, else None.

    ``TAILFORGE_DDP_FORCE=1`` joins a process group (and wraps the model in DDP) in a job of one too: the
    NCCL smoke of ``bench/gpu_suite.py`` on a one-GPU machine.
    """
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if (world > 1 or os.environ.get("TAILFORGE_DDP_FORCE") == "1") and "LOCAL_RANK" in os.environ:
        return int(os.environ.get("RANK", os.environ["LOCAL_RANK"])), world, int(os.environ["LOCAL_RANK"])
    return None


class Dist:
    """This process's place in a DDP job; rank 0 of a world of 1 outside torchrun (every call a no-op)."""

    def __init__(self, rank: int = 0, world: int = 1, dev: torch.device | None = None, owns_group: bool = False):
        self.rank, self.world, self.dev, self.owns_group = rank, world, dev, owns_group

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if self.dev is not None and self.dev.type == "cuda":
                dist.barrier(device_ids=[self.dev.index])
            else:
                dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the ranks (a detached copy)."""
        t = t.detach().float().clone()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= self.world
        return t

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.world == 1 and not self.owns_group:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(cfg: TrainConfig) -> tuple[Dist, torch.device]:
    """Join the torchrun job this process belongs to (nccl on CUDA, one GPU per LOCAL_RANK; gloo on CPU).

    Outside torchrun (or in a job of one) returns ``(Dist(), device)`` and touches nothing.
    """
    dev = resolve_device(cfg.device)
    env = dist_env()
    if env is None:
        return Dist(dev=dev), dev
    import torch.distributed as dist

    rank, world, local = env
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise TailforgeError(f"DDP process {local} has no GPU: only {torch.cuda.device_count()} visible",
                                 "launch at most one process per GPU (nproc), or use --device cpu")
        dev = torch.device("cuda", local)  # one GPU per process; a pinned cuda:K is ignored under DDP
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev, owns), dev


class _Forward(nn.Module):
    """The task's forward as a module's ``forward``, so that DDP (which hooks ``forward``) can wrap it."""

    def __init__(self, task, net: nn.Module):
        super().__init__()
        self.net = net
        self.task = task

    def forward(self, x):
        return self.task.forward(self.net, x)


# ----------------------------------------------------------------------------- fit
def data_fingerprint(run: RunDir, cfg: TrainConfig) -> str:
    """Hash of what a training reads besides its settings: the training table's rows (real + accepted synthetic)
    and, for crt, the frozen base's weights file. A model whose data changed (a re-filtered source) is stale."""
    import hashlib

    rows = training_table(run, cfg)
    h = hashlib.sha256(pd.util.hash_pandas_object(rows[["sample_id", "uri", "label"]], index=False).values.tobytes())
    if cfg.stage == "crt" and cfg.base:
        w = _model_folder(run, cfg.base) / "model.safetensors"
        if w.exists():
            h.update(f"{w.stat().st_size}:{w.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def finished(run: RunDir, cfg: TrainConfig, name: str) -> Path | None:
    """``models/<name>/`` when it is already trained with ``cfg``'s settings, else None.

    Raises on an invalid name, and on a model of that name with other settings unless ``cfg.overwrite``.
    """
    if not name or "/" in name or name.startswith("."):
        raise TailforgeError(f"invalid model name '{name}'", "use a plain folder name like resnet32-ce-s0")
    final = run.model_dir(name)
    if (final / "config.json").exists() and not folder_ok(final, f"training {name}", show_root=run.root):
        return None  # damaged (a truncated checkpoint): trained again, replacing the folder
    if (final / "config.json").exists():
        saved = read_json(final / "config.json")
        if saved.get("identity") == cfg.identity():
            if saved.get("data") in (None, data_fingerprint(run, cfg)):  # None: trained before data was recorded
                return final
            log.warning("the training data of models/%s changed since it was trained (re-filtered or re-generated "
                        "synthetic rows, or a new base); training it again", name)
            return None
        if not cfg.overwrite:
            raise TailforgeError(f"model '{name}' already exists in {run.root} with other settings",
                                 "choose another --name, or pass --overwrite")
    return None


def fit(run: RunDir, cfg: TrainConfig, name: str, progress=None) -> Path:
    """Train ``cfg`` on ``run`` and write ``models/<name>/``; returns that folder.

    A finished model with the same settings is returned as is (resume of a whole pipeline);
    one with other settings is refused unless ``cfg.overwrite``.

    Under torchrun (``WORLD_SIZE`` > 1) every process calls ``fit``: it joins the process group, wraps
    the model in DistributedDataParallel and trains on its shard of each epoch; rank 0 alone validates,
    writes the resumable state, calls ``progress`` and writes ``models/<name>/``. ``cfg.batch_size`` is
    global (each of N processes takes ``batch_size // N`` per step). To launch such a job from one
    process use ``tailforge.train.ddp.launch_fit``.
    """
    run = RunDir(run.root if isinstance(run, RunDir) else run)
    check_names(cfg)
    done = finished(run, cfg, name)
    if done is not None:
        return done
    dd, dev = init_distributed(cfg)
    curves = tb.Curves()
    try:
        return _fit(run, cfg, name, dd, dev, progress, curves)
    finally:
        curves.close()  # also when training fails: the events so far stay readable, no open file is left
        dd.close()


def _fit(run: RunDir, cfg: TrainConfig, name: str, dd: Dist, dev: torch.device, progress, curves: tb.Curves) -> Path:
    final = run.model_dir(name)
    ident = {**cfg.identity(), "_data": data_fingerprint(run, cfg)}  # a state of other data is not resumed
    work = run.root / "models" / f".work-{name}"
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    task, model, labels, weights, counts, meta, val_y = _setup(run, cfg, dev)
    if len(labels) < 2 * dd.world:
        raise TailforgeError(f"{len(labels)} training samples cannot be shared by {dd.world} processes",
                             "train in one process (ddp: off)")
    loss_fn = build_loss(cfg, counts).to(dev)
    net = task.net
    kd_fn = kd_a = None
    if task.teacher is not None:  # distillation (train/kd.py): per-sample KD term, KD weight per true class
        groups = ClassStats.load(run).groups
        kd_fn, kd_a = build_kd(cfg, counts).to(dev), group_alpha(cfg, groups).to(dev)
        if cfg.kd_patch > 0:
            task.patch = task.make_patch(labels, groups)
    transfer = cfg.stage == "full" and cfg.transfer.active  # two phases: head alone, then everything
    opt = _optimizer(cfg, net, model.backbone if transfer else None)
    if getattr(task, "patch", None) is not None:  # the patch projector learns with the student
        opt.add_param_group({"params": list(task.patch.parameters()), "weight_decay": cfg.weight_decay})
    bs = max(1, min(cfg.batch_size, len(labels)) // dd.world)  # per process; the global batch is bs * world
    n_epoch = len(labels)
    if cfg.epoch_samples == "balanced":  # the same budget with or without synthetic samples
        n_epoch = len(counts) * int(meta["real_class_max"])
    elif cfg.epoch_samples == "real":  # the budget of the same training on real data only
        n_epoch = int(meta["real_samples"])
    steps = max(1, n_epoch // (bs * dd.world))  # drop the last partial batch (BatchNorm needs > 1 sample)
    meta["steps_per_epoch"] = steps  # the budget, recorded: arms meant to be equal can be checked
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, steps, opt.param_groups, transfer))
    ema = EMA(net, cfg.ema) if cfg.ema > 0 else None
    policy = None  # loss-guided augmentation of images (clip_adapter: in its stage 1, train/clip.py)
    if cfg.aug_policy == "loss_guided" and isinstance(task, ImageTask):
        policy = task.policy = LossGuided(len(labels), **cfg.lossaug.model_dump())
    state = {"epoch": 0, "best": {"epoch": -1, "val_balanced_acc": -1.0}, "log": [], "best_weights": None}
    start = 0
    if cfg.resume and (work / STATE).exists():  # every rank loads the same state (DDP then starts in sync)
        saved = torch.load(work / STATE, map_location=dev, weights_only=False)
        if saved.get("identity") == json.dumps(ident, sort_keys=True):
            net.load_state_dict(saved["net"])
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
            if ema is not None:
                ema.module.load_state_dict(saved["ema"])
            if saved.get("kd_patch") is not None:
                task.patch.load_state_dict(saved["kd_patch"])
            if policy is not None:
                policy.load_state_dict(saved["lossaug"])
            state = saved["state"]
            start = state["epoch"]
    dd.barrier()  # all ranks have read the state before rank 0 clears the work folder
    if dd.main:
        if not (cfg.resume and start > 0):
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    writer = curves.open(work / tb.FOLDER, start + 1) if dd.main and cfg.tensorboard else None
    frozen = transfer and start < cfg.transfer.freeze_epochs
    if transfer:
        model.backbone.requires_grad_(not frozen)  # before DDP sees the parameters it must synchronise
    fwd = dd.wrap(_Forward(task, net))  # DDP broadcasts rank 0's weights here and averages gradients

    amp = dev.type == "cuda" and cfg.amp
    y_all = torch.from_numpy(np.array(labels, dtype=np.int64)).to(dev)
    w_all = torch.from_numpy(weights).to(dev)
    total = cfg.epochs * steps
    kd_warm = kd_warmup_epochs(cfg) * steps if kd_fn is not None else 0
    for epoch in range(start, cfg.epochs):
        g = seed_epoch(cfg.seed, epoch, dd.rank)
        order = epoch_indices(cfg.sampler, labels, cfg.seed, epoch,  # the same global order on every rank
                              n_epoch if cfg.epoch_samples != "data" else None)
        mine = shard_indices(order, dd.rank, dd.world)
        if frozen and epoch >= cfg.transfer.freeze_epochs:  # phase 2: the backbone trains too
            frozen = False
            model.backbone.requires_grad_(True)
            fwd = dd.wrap(_Forward(task, net))
        if policy is not None:
            policy.new_epoch()  # this epoch's per-sample strengths, from the moving losses so far
        fwd.train()
        if cfg.stage == "crt" or frozen:  # a frozen backbone keeps its BatchNorm statistics too
            model.backbone.eval()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for step in range(steps):
            idx = mine[step * bs:(step + 1) * bs]
            tidx = torch.from_numpy(idx).to(dev)
            x, ya, yb, lam = task.inputs(idx, y_all[tidx], g)
            w = w_all[tidx]
            # the weighted mean is over the global batch: this rank's sum / the global weight sum, times
            # world because DDP averages the gradients of the ranks
            gw = w if dd.world == 1 else w_all[torch.from_numpy(order[step * bs * dd.world:(step + 1) * bs * dd.world])
                                                 .to(dev)]
            wsum = gw.sum().clamp_min(1e-12)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                out = fwd(x)
            logits, feats = out[0], out[1]
            per = lam * loss_fn(logits, ya, epoch)
            if lam < 1:
                per = per + (1 - lam) * loss_fn(logits, yb, epoch)
            if policy is not None:  # the task loss (before distillation) feeds the moving per-sample loss
                gather_update(policy, idx, per, dd)
            if kd_fn is not None:  # (1 - a_i) task_i + ramp a_i kd_i, a_i the KD weight of i's true class
                t_logits, t_map = task.teacher_out(x)
                ramp = min(1.0, (epoch * steps + step + 1) / kd_warm) if kd_warm > 0 else 1.0
                per = mix_kd(per, kd_fn(logits, t_logits, ya), kd_a, ya, yb, lam, ramp)
                if task.patch is not None:
                    per = per + cfg.kd_patch * task.patch(out[2], t_map, ya, g)
            loss = (w * per).sum() / wsum * dd.world
            if cfg.supcon_weight > 0:
                loss = loss + cfg.supcon_weight * supcon(feats, ya, cfg.supcon_temperature)
            loss_v = dd.mean(loss).item() if dd.world > 1 else loss.item()  # the same value on every rank
            if not math.isfinite(loss_v):
                raise TailforgeError(f"training loss became {loss_v} at epoch {epoch + 1}, step {step + 1}",
                                     "lower --lr, keep --clip-grad on, or turn off --amp")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if dd.world > 1 and getattr(task, "patch", None) is not None:  # outside DDP: average by hand
                for p in task.patch.parameters():
                    dd_all_mean(p.grad, dd.world)
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(net)
            seen += len(idx) * dd.world
            loss_sum += loss_v * len(idx) * dd.world
            if progress and dd.main:
                progress(epoch * steps + step + 1, total, {"epoch": epoch + 1, "loss": round(loss_v, 4),
                                                           "lr": sched.get_last_lr()[-1]})
        train_s = time.perf_counter() - t0
        if dd.main:  # validation, model selection and the saved state are rank 0's; the others wait
            judged = ema.module if ema is not None else net
            vlog = task.val_logits(judged)
            vpred = vlog.argmax(1)
            rec = {"epoch": epoch + 1, "train_loss": round(loss_sum / max(seen, 1), 6),
                   "lr": sched.get_last_lr()[-1], "val_balanced_acc": round(balanced_accuracy(val_y, vpred), 6),
                   "val_top1": round(float((vpred == val_y).mean()), 6), "images_per_s": round(seen / train_s, 1),
                   "time_s": round(train_s, 3)}
            if transfer:
                rec.update(phase=1 if frozen else 2, backbone_lr=0.0 if frozen else sched.get_last_lr()[0])
            if policy is not None:
                rec["lossaug"] = policy.summary()
            state["log"].append(rec)
            if rec["val_balanced_acc"] > state["best"]["val_balanced_acc"]:
                state["best"] = {"epoch": epoch + 1, "val_balanced_acc": rec["val_balanced_acc"],
                                 "val_top1": rec["val_top1"], "split": "val"}
                state["best_weights"] = {k: v.detach().cpu().clone() for k, v in judged.state_dict().items()}
                state["best_val_pred"] = vpred.astype(np.int32)  # the TensorBoard confusion matrix at the end
            state["epoch"] = epoch + 1
            if writer is not None:  # before the state: a resume replays (and purges) what the state lacks
                tb.write_epoch(writer, rec)
            _save_state(work, ident, net, opt, sched, ema, state, getattr(task, "patch", None), policy)
            if progress:
                progress((epoch + 1) * steps, total, {"event": "epoch", **rec})
        dd.barrier()

    if dd.main:
        net.load_state_dict(state["best_weights"])
        finish_head(model, task, val_y, cfg, meta, state, balanced_accuracy)  # post-hoc choices on val (heads.py)
        meta.update({"images_per_s": state["log"][-1]["images_per_s"] if state["log"] else None,
                     "device": str(dev), "best_epoch": state["best"]["epoch"]})
        if dd.world > 1 or dd.owns_group:
            meta["ddp_world_size"] = dd.world
        if writer is not None:
            if state.get("best_val_pred") is not None:
                tb.write_confusion(writer, val_y, state["best_val_pred"], meta["class_names"], meta["train_counts"],
                                   state["best"]["epoch"])
            curves.close()
        _write_model(final, model, cfg, meta, state, ident["_data"],
                     work / tb.FOLDER if writer is not None else None)
        shutil.rmtree(work, ignore_errors=True)
    dd.barrier()  # the model folder is complete before any rank returns it
    return final


def dd_all_mean(t: torch.Tensor | None, world: int) -> None:
    """Average ``t`` over the DDP ranks in place (a gradient of a module DDP does not wrap)."""
    if t is not None:
        import torch.distributed as dist

        dist.all_reduce(t)
        t /= world


def _optimizer(cfg: TrainConfig, net: nn.Module, backbone: nn.Module | None = None):
    """SGD or AdamW over ``net``; with ``backbone`` (two-phase transfer) its parameters form their own groups at
    lr x ``transfer.backbone_lr_mult`` (marked ``"backbone": True``), the rest of ``net`` (the head) at lr."""
    if backbone is None:
        groups = param_groups(net, cfg.weight_decay)
    else:
        own = {id(p) for p in backbone.parameters()}
        rest = [p for p in net.parameters() if id(p) not in own]
        groups = [{**g, "lr": cfg.lr * cfg.transfer.backbone_lr_mult, "backbone": True}
                  for g in param_groups(backbone, cfg.weight_decay)]
        groups += [{**g, "lr": cfg.lr} for g in param_groups(rest, cfg.weight_decay)]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)


def _schedule(cfg: TrainConfig, steps: int, groups: list[dict], transfer: bool):
    """LR factor(s) per step: linear warm-up then cosine over all epochs. Two-phase transfer: the head warms up
    and decays over phase 1, then again over phase 2; the backbone is at 0 in phase 1 and follows phase 2."""
    warm = int(round(cfg.warmup * steps))
    if not transfer:
        return lr_lambda(cfg.epochs * steps, warm)
    p1_end = cfg.transfer.freeze_epochs * steps
    p1, p2 = lr_lambda(p1_end, warm), lr_lambda(cfg.epochs * steps - p1_end, warm)

    def head(step: int) -> float:
        return p1(step) if step < p1_end else p2(step - p1_end)

    def backbone(step: int) -> float:
        return 0.0 if step < p1_end else p2(step - p1_end)

    return [backbone if g.get("backbone") else head for g in groups]


def _save_state(work: Path, ident: dict, net, opt, sched, ema, state: dict, patch=None, policy=None) -> None:
    blob = {"identity": json.dumps(ident, sort_keys=True), "net": net.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
            "state": state, "kd_patch": patch.state_dict() if patch is not None else None}
    if policy is not None:
        blob["lossaug"] = policy.state_dict()
    with atomic_path(work / STATE) as tmp:
        torch.save(blob, tmp)
    write_text(work / "log.jsonl", "".join(json.dumps(r) + "\n" for r in state["log"]))


def _write_model(final: Path, model, cfg: TrainConfig, meta: dict, state: dict, data: str | None = None,
                 tb_folder: Path | None = None) -> None:
    """``models/<name>/`` atomically: weights, config (with the training data's fingerprint ``data``), log, best
    epoch and the TensorBoard events (``tb_folder``)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(final) as tmp:
        move_towers(meta, tmp)  # clip_adapter after a contrastive stage 1: its tuned CLIP towers
        save_file(sd, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", {"train": cfg.model_dump(mode="json"), "identity": cfg.identity(),
                                         "data": data, "meta": meta})
        write_text(tmp / "log.jsonl", "".join(json.dumps(r) + "\n" for r in state["log"]))
        write_json(tmp / "best.json", state["best"])
        if tb_folder is not None and tb_folder.is_dir():
            shutil.copytree(tb_folder, tmp / tb.FOLDER)  # sealed with the rest by atomic_dir


__all__ = ["fit", "finished", "training_table", "build_from_meta", "init_distributed", "dist_env"]
