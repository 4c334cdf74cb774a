"""Image embedders for the filter, in one registry: ``classifier`` (default), ``clip``, ``timm``.

An embedder turns uint8 images (N x H x W x C) into L2-normalised float32 vectors (N x D), in
batches, on the GPU when there is one. ``key`` names the exact weights (path, size, mtime) so
that ``embed_cached`` (``tailforge.train.features``) can keep the vectors of a run under
``<run>/filter/cache`` and a re-run, or a resumed run, does not recompute them. The cache is shared:
the ``clip_adapter`` classifier (``tailforge.train.clip``) embeds with the same CLIP code under the
same key, so training it after filtering with CLIP (or the other way round) embeds nothing twice.

- ``classifier``: penultimate features of a classifier trained on the run's real training split
  (``tailforge.train.load_model`` + ``tailforge.train.embed``); always available offline once ``tailforge train`` ran.
- ``clip``: a transformers ``CLIPVisionModelWithProjection`` (image embeddings after the
  projection) from a local folder, or a hub id when online (``tailforge.train.clip.ClipImages``).
- ``timm``: any timm backbone (``num_classes=0``: pooled features) with local weights: a folder
  holding ``config.json`` (``architecture``) and ``model.safetensors``/``pytorch_model.bin``, or a
  weights file plus ``embedder_arch``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from tailforge.data.errors import TailforgeError, unknown_name
from tailforge.data.run import RunDir
from tailforge.train.features import cache_dir, embed_cached, file_key, fit_input, uri_hash  # noqa: F401 - the face

from .index import l2_normalize

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "model.pth")


def pick_device(device: str | None) -> str:
    import torch

    if device:
        from tailforge.train.checkpoint import resolve_device

        resolve_device(device)  # an unknown name or a missing GPU: one clear error, not a torch traceback
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_tensor(images: np.ndarray, size: tuple[int, int], mean, std, device: str):
    """uint8 NHWC (1 or 3 channels) -> normalised float NCHW with 3 channels at ``size`` (h, w)."""
    import torch

    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float().div_(255)
    return fit_input(x, size, mean, std)


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
    """CLIP image encoder + projection (transformers), from a local folder or a hub id (``ClipImages``)."""

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
        from tailforge.train.clip import ClipImages  # torch and transformers load on first use

        self.images = ClipImages(self.path, batch_size, None, image_size)

    @property
    def key(self) -> str:
        return self.images.key

    def embed(self, images: np.ndarray) -> np.ndarray:
        if self.images.device is None:
            self.images.device = pick_device(self.device)
        return self.images.embed(images)


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
        from tailforge.train.models import pretrained_arch

        arch, weights = self.arch, self.path
        if self.path.is_dir():
            arch = arch or pretrained_arch(self.path)
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

            from tailforge.train.models import read_weights

            weights, arch = self._weights_and_arch()
            if arch not in timm.list_models():
                raise unknown_name("timm architecture", arch, timm.list_models())
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            state = read_weights(weights)
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


__all__ = ["EMBEDDERS", "Embedder", "ClassifierEmbedder", "ClipEmbedder", "TimmEmbedder", "make_embedder",
           "embed_cached", "pick_device", "cache_dir"]
