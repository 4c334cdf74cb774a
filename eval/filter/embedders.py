"""Image embedders for the filter, in one registry: ``classifier`` (default), ``clip``, ``timm``.

An embedder turns uint8 images (N x H x W x C) into L2-normalised float32 vectors (N x D), in
batches, on the GPU when there is one. ``key`` names the exact weights (path, size, mtime) so
that ``embed_cached`` can keep the vectors of a run under ``<run>/filter/cache`` and a re-run, or
a resumed run, does not recompute them.

- ``classifier``: penultimate features of a classifier trained on the run's real training split
  (``tailforge.train.load_model`` + ``tailforge.train.embed``); always available offline once ``tailforge train`` ran.
- ``clip``: a transformers ``CLIPVisionModelWithProjection`` (image embeddings after the
  projection) from a local folder, or a hub id when online.
- ``timm``: any timm backbone (``num_classes=0``: pooled features) with local weights: a folder
  holding ``config.json`` (``architecture``) and ``model.safetensors``/``pytorch_model.bin``, or a
  weights file plus ``embedder_arch``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from tailforge.data.atomic import atomic_path
from tailforge.data.errors import TailforgeError, unknown_name
from tailforge.data.run import RunDir

from .index import l2_normalize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "model.pth")


def pick_device(device: str | None) -> str:
    import torch

    if device:
        from tailforge.train.checkpoint import resolve_device

        resolve_device(device)  # an unknown name or a missing GPU: one clear error, not a torch traceback
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def file_key(path: Path) -> str:
    """Identity of weights on disk: path, size and mtime of every file (cheap, no hashing)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def to_tensor(images: np.ndarray, size: tuple[int, int], mean, std, device: str):
    """uint8 NHWC (1 or 3 channels) -> normalised float NCHW with 3 channels at ``size`` (h, w)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


class Embedder:
    """Base class: subclasses set ``name``, ``key`` and implement ``_embed_batch``."""

    name = "base"

    def __init__(self, batch_size: int = 256, device: str | None = None):
        self.batch_size = batch_size
        self.device = device

    @property
    def key(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _embed_batch(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C -> L2-normalised float32 N x D."""
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(images), self.batch_size):
                out.append(np.asarray(self._embed_batch(images[s:s + self.batch_size]), dtype=np.float32))
        if not out:
            raise TailforgeError("no images to embed", "the candidate or real set is empty")
        return l2_normalize(np.concatenate(out))


class ClassifierEmbedder(Embedder):
    """Penultimate features of a classifier of this run (``models/<model>``)."""

    name = "classifier"

    def __init__(self, run: RunDir, model: str | None = None, batch_size: int = 256, device: str | None = None):
        super().__init__(batch_size, device)
        self.run = run
        self.model_name = model or default_classifier(run)
        self.dir = run.model_dir(self.model_name)
        if not self.dir.is_dir():
            raise TailforgeError(
                f"run {run.root} has no classifier '{self.model_name}' (models/{self.model_name} is missing)",
                f"train one on the real data first: `tailforge train --run {run.root} --name {self.model_name}`, "
                "or choose --embedder clip/timm",
            )
        self._loaded = None

    @property
    def key(self) -> str:
        return f"classifier-{self.model_name}-{file_key(self.dir)}"

    def _load(self):
        if self._loaded is None:
            try:
                from tailforge import train
            except ImportError as exc:  # pragma: no cover - depends on the checkout
                raise TailforgeError(f"the train package cannot be imported ({exc})",
                                     "use --embedder clip or --embedder timm") from None
            self._loaded = train.load_model(self.dir, device=pick_device(self.device))
        return self._loaded

    @property
    def feature_dim(self) -> int:
        return int(self._load()[1]["feature_dim"])

    def embed(self, images: np.ndarray) -> np.ndarray:
        from tailforge import train

        model, meta = self._load()
        feats = train.embed(model, meta, images, batch_size=self.batch_size, device=pick_device(self.device))
        return l2_normalize(np.asarray(feats, dtype=np.float32))


def default_classifier(run: RunDir) -> str:
    """``baseline`` if the run has it, else its only model; otherwise ask for ``--model``."""
    models = run.models()
    if "baseline" in models or not models:
        return "baseline"
    if len(models) == 1:
        return models[0]
    raise TailforgeError(f"run {run.root} has several classifiers ({', '.join(models)}) and none is 'baseline'",
                         "name the one trained on real data only with --model")


def _missing(path: str | None, what: str, option: str) -> TailforgeError:
    if not path:
        return TailforgeError(f"the {what} embedder needs local weights, and {option.split()[0]} is not set",
                              f"pass a local folder or file with {option} (no download happens offline)")
    return TailforgeError(f"{what} embedder weights not found at {path!r}",
                          f"pass a local folder or file with {option} (no download happens offline)")


class ClipEmbedder(Embedder):
    """CLIP image encoder + projection (transformers), from a local folder or a hub id."""

    name = "clip"

    def __init__(self, path: str | None, batch_size: int = 256, device: str | None = None,
                 image_size: int | None = None):
        super().__init__(batch_size, device)
        if not path:
            raise _missing(path, "clip", "--embedder-path")
        self.path = str(path)
        self.local = Path(self.path).exists()
        if not self.local and (self.path.startswith((".", "/", "~")) or self.path.count("/") != 1):
            raise _missing(self.path, "clip", "--embedder-path")
        self.image_size = image_size
        self._model = None

    @property
    def key(self) -> str:
        ident = file_key(Path(self.path)) if self.local else hashlib.sha1(self.path.encode()).hexdigest()[:16]
        return f"clip-{ident}-{self.image_size}"

    def _load(self):
        if self._model is None:
            from transformers import CLIPVisionModelWithProjection

            try:
                model = CLIPVisionModelWithProjection.from_pretrained(self.path, local_files_only=self.local)
            except OSError as exc:
                raise TailforgeError(f"cannot load a CLIP vision model from {self.path!r} ({str(exc)[:120]})",
                                     "pass a folder saved with save_pretrained, or a hub id when online") from None
            self.dev = pick_device(self.device)
            self._model = model.eval().to(self.dev)
            mean, std = CLIP_MEAN, CLIP_STD
            pre = Path(self.path) / "preprocessor_config.json"
            if pre.is_file():
                conf = json.loads(pre.read_text())
                mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
            self.mean, self.std = mean, std
            size = self.image_size or model.config.image_size
            self.size = (size, size)
        return self._model

    def _embed_batch(self, images: np.ndarray) -> np.ndarray:
        model = self._load()
        x = to_tensor(images, self.size, self.mean, self.std, self.dev)
        return model(pixel_values=x).image_embeds.float().cpu().numpy()


class TimmEmbedder(Embedder):
    """A timm backbone with local weights; pooled features (``num_classes=0``)."""

    name = "timm"

    def __init__(self, path: str | None, arch: str | None = None, batch_size: int = 256,
                 device: str | None = None, image_size: int | None = None):
        super().__init__(batch_size, device)
        if not path or not Path(path).exists():
            raise _missing(path, "timm", "--embedder-path (and --embedder-arch for a weights file)")
        self.path = Path(path)
        self.arch = arch
        self.image_size = image_size
        self._model = None

    @property
    def key(self) -> str:
        return f"timm-{self.arch}-{file_key(self.path)}-{self.image_size}"

    def _weights_and_arch(self) -> tuple[Path, str]:
        arch, weights = self.arch, self.path
        if self.path.is_dir():
            conf = self.path / "config.json"
            if conf.is_file() and not arch:
                arch = json.loads(conf.read_text()).get("architecture")
            found = [self.path / n for n in WEIGHT_NAMES if (self.path / n).is_file()]
            if not found:
                raise TailforgeError(f"timm embedder folder {self.path} holds no weights ({', '.join(WEIGHT_NAMES)})",
                                     "save the backbone's state dict there")
            weights = found[0]
        if not arch:
            raise TailforgeError(f"the timm architecture of {self.path} is unknown",
                                 "pass --embedder-arch NAME (e.g. resnet50) or add config.json with 'architecture'")
        return weights, arch

    def _load(self):
        if self._model is None:
            import timm
            import torch

            weights, arch = self._weights_and_arch()
            if arch not in timm.list_models():
                raise unknown_name("timm architecture", arch, timm.list_models())
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            if weights.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(weights))
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
                state = state.get("state_dict", state) if isinstance(state, dict) else state
            own = model.state_dict()
            usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            missing = [k for k in own if k not in usable]
            if missing:
                raise TailforgeError(f"weights {weights} do not fit timm '{arch}' ({len(missing)} tensors missing, "
                                     f"e.g. {missing[0]})", "pass the architecture the weights were saved from")
            model.load_state_dict(usable)
            self.dev = pick_device(self.device)
            self._model = model.eval().to(self.dev)
            pcfg = getattr(model, "pretrained_cfg", {}) or {}
            self.mean = tuple(pcfg.get("mean", (0.485, 0.456, 0.406)))
            self.std = tuple(pcfg.get("std", (0.229, 0.224, 0.225)))
            size = self.image_size or (pcfg.get("input_size") or (3, 224, 224))[-1]
            self.size = (size, size)
        return self._model

    def _embed_batch(self, images: np.ndarray) -> np.ndarray:
        model = self._load()
        x = to_tensor(images, self.size, self.mean, self.std, self.dev)
        return model(x).float().cpu().numpy()


EMBEDDERS: dict[str, Callable[..., Embedder]] = {
    "classifier": lambda run, cfg: ClassifierEmbedder(run, cfg.model, cfg.batch_size, cfg.device),
    "clip": lambda run, cfg: ClipEmbedder(cfg.embedder_path, cfg.batch_size, cfg.device, cfg.image_size),
    "timm": lambda run, cfg: TimmEmbedder(cfg.embedder_path, cfg.embedder_arch, cfg.batch_size, cfg.device,
                                          cfg.image_size),
}


def make_embedder(run: RunDir, cfg) -> Embedder:
    """The embedder named by ``cfg.embedder`` (a ``FilterConfig``)."""
    if cfg.embedder not in EMBEDDERS:
        raise unknown_name("embedder", cfg.embedder, EMBEDDERS)
    return EMBEDDERS[cfg.embedder](run, cfg)


def uri_hash(uris, run: RunDir | None = None) -> str:
    """Hash of a uri list and, with ``run``, of the size and mtime of every file they name.

    A regenerated image or feature shard under the same name therefore gets a new hash.
    """
    h = hashlib.sha1()
    files = set()
    for u in uris:
        h.update(str(u).encode())
        h.update(b"\0")
        files.add(str(u).partition("#")[0])
    if run is not None:
        for f in sorted(files):
            p, _ = run.resolve(f)
            st = p.stat() if p.exists() else None
            h.update(f"{f}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()[:16]


def embed_cached(embedder: Embedder, uris: list[str], run: RunDir, load: Callable[[list[str]], np.ndarray],
                 *, chunk: int = 4096, use_cache: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Embeddings of ``uris`` (loaded ``chunk`` at a time by ``load``), cached under ``filter/cache``.

    The cache file is named by the embedder's key and a hash of the uri list, so new weights or
    new candidates never reuse stale vectors.
    """
    path = run.root / "filter" / "cache" / f"{embedder.key}-{uri_hash(uris, run)}.npy"
    if use_cache and path.is_file():
        arr = np.load(path)
        if len(arr) == len(uris):
            if progress:
                progress(len(uris), len(uris))
            return arr
    parts = []
    for s in range(0, len(uris), chunk):
        parts.append(embedder.embed(load(uris[s:s + chunk])))
        if progress:
            progress(min(s + chunk, len(uris)), len(uris))
    arr = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if use_cache:
        with atomic_path(path) as tmp:
            np.save(tmp, arr)
    return arr


def cache_dir(run: RunDir) -> Path:
    return run.root / "filter" / "cache"


__all__ = ["EMBEDDERS", "Embedder", "ClassifierEmbedder", "ClipEmbedder", "TimmEmbedder", "make_embedder",
           "embed_cached", "pick_device", "cache_dir"]
