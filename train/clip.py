"""CLIP in tailforge: one loader of local weights, the image features the filter and the classifier
share, and the ``clip_adapter`` classifier (a two-stage CLIP method with a class-balanced linear adapter).

Weights are a LOCAL folder (nothing is downloaded): ``CLIPModel.save_pretrained(DIR)`` plus the
tokenizer's ``save_pretrained(DIR)`` — ``config.json`` (``model_type: clip``), ``model.safetensors`` (or
``pytorch_model.bin``), and ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``). The filter's
``clip`` embedder needs the image tower only and also takes a hub id when online.

The classifier, read top to bottom:

1. **image features**: the frozen CLIP image tower + projection, L2-normalised (``ClipVision``), computed
   once per image and cached in the run folder by ``train/features.py`` under the same key as the
   filter's ``clip`` embedder: training the adapter after filtering with CLIP (or again with other
   settings) embeds nothing;
2. **stage 1, zero-shot**: one prompt per class from the dataset's class names (``"a photo of a {name}."``,
   several templates are averaged) through the text tower; zero-shot logits = logit_scale * cos(image, class);
3. **stage 2, adapter**: a linear head on the features, initialised from the zero-shot head and trained by
   the ordinary trainer (``train/trainer.py``'s ``FeatureTask``, as cRT), so every loss and sampler of the
   long-tail toolbox applies (balanced softmax, logit adjustment, class-balanced sampling, ...);
4. **blend**: log p = (1 - a) * log_softmax(zero-shot) + a * log_softmax(adapter), ``a`` chosen on the VAL
   split (balanced accuracy; ties: lower NLL) over 0, 0.05, ..., 1 unless ``clip.blend`` fixes it.

The features a ``ClipAdapter`` hands to its head are the unit embeddings standardised on the real train
split (its mean removed, divided by one spread: about unit variance per dimension). CLIP embeddings sit in a
narrow cone, so raw unit vectors would leave a linear head with tiny, nearly equal inputs; standardised, the
trainer's default SGD learning rate suits the adapter as it suits other heads. The head's initial weights
and bias are the zero-shot head rewritten for standardised inputs (equal logits).
The saved model (``model.safetensors``, a few KB) holds the adapter, the class text embeddings, the logit
scale and the blend; the image tower is referenced by path in ``config.json`` and loaded from there.

**ECVL's contrastive stage 1** (``train.clip_stage1: contrastive``; ECVL: "A Long-Tailed Image Classification
Method Based on Enhanced Contrastive Visual Language", Sensors 2023, 23(15), 6694, doi 10.3390/s23156694,
../shared/SEEDS.md item 4; its stage 1 follows BALLAD's phase A, Ma et al. 2021, arXiv 2111.14745), before
step 1 above:

0. fine-tune BOTH towers (image tower + projection, text tower + projection; CLIP's logit scale stays as it
   is) on the long-tailed train split as it is (instance sampling, the run's images plus accepted synthetic
   images), ``clip.stage1_epochs`` epochs of AdamW at ``clip.stage1_lr`` (cosine decay), with a symmetric
   image-text InfoNCE loss whose text side is one embedding per CLASS (its prompts' mean, as the zero-shot
   head), because the samples of a class share a text:
   - image -> text: logits = logit_scale * cos(image_i, class_c) over all classes, CE with the image's class;
   - text -> image: for each class u present in the batch, logits = logit_scale * cos(class_u, image_j) over
     the batch, cross-entropy against the uniform distribution over the batch's images of class u;
   - loss = (image->text + text->image) / 2.
   The images get the trainer's augmentation (``augment``) and, with ``aug_policy: loss_guided``, the per-sample
   RandAugment of ``train/lossaug.py`` driven by each image's image->text loss (ECVL's momentum loss). The tuned
   CLIP folder (weights + tokenizer) is written to ``models/.clip-stage1-<id>/`` (``<id>``: the training
   settings), steps 1-4 run on it (its features get their own cache entries), and it is moved into the model
   folder as ``clip/`` when the model is written: the model reloads from its own folder (``meta.clip.towers``)
   and the ``--pretrained`` folder is only read, never changed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tailforge.data.atomic import atomic_dir, atomic_path, read_json, write_json
from tailforge.data.errors import TailforgeError
from tailforge.data.images import load_images
from tailforge.data.run import RunDir

from .features import cache_dir, embed_cached, file_key, fit_input
from .models import make_head

log = logging.getLogger("tailforge")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
BLEND_GRID = tuple(round(i / 20, 2) for i in range(21))
HOW = ("a folder saved on a connected machine with CLIPModel.from_pretrained(ID).save_pretrained(DIR) and "
       "CLIPTokenizer.from_pretrained(ID).save_pretrained(DIR), or `hf download openai/clip-vit-base-patch32 "
       "--local-dir DIR`")


# ----------------------------------------------------------------------------- local weights

def check_folder(path, *, text: bool = True, option: str = "--pretrained") -> Path:
    """The local CLIP folder ``path``, or one line naming the missing file and how to provide it.

    ``text``: the zero-shot head also needs the text tower and the tokenizer (a full ``CLIPModel``).
    """
    if path is None or str(path) == "":
        raise TailforgeError(f"model clip_adapter needs local CLIP weights and {option} is not set",
                             f"pass {option} DIR, {HOW}")
    p = Path(path).expanduser()
    if not p.is_dir():
        what = "is a file, not a folder" if p.exists() else "does not exist (tailforge never downloads weights)"
        raise TailforgeError(f"CLIP weights folder {p} {what}", f"pass {option} DIR, {HOW}")
    conf = p / "config.json"
    if not conf.is_file():
        raise TailforgeError(f"CLIP folder {p} has no config.json", f"pass {option} DIR, {HOW}")
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise TailforgeError(f"CLIP folder {p} holds no weights ({' or '.join(WEIGHT_FILES[::2])})",
                             f"pass {option} DIR, {HOW}")
    if text:
        try:
            kind = json.loads(conf.read_text()).get("model_type")
        except (OSError, ValueError):
            kind = None
        if kind != "clip":
            raise TailforgeError(f"{conf} describes model_type {kind!r}, not a full CLIP model ('clip'): the "
                                 "zero-shot head needs the text tower too", f"pass {option} DIR, {HOW}")
        if not any(all((p / f).is_file() for f in group) for group in TOKENIZER_FILES):
            raise TailforgeError(f"CLIP folder {p} has no tokenizer (vocab.json + merges.txt, or tokenizer.json), "
                                 "which the class-name prompts need", f"save the tokenizer there too: {HOW}")
    return p


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No load reports (a CLIP folder read by the image tower alone lists the text keys it skips) and no
    progress bars while weights load: output is for people (errors still raise)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _cannot_load(path, exc: Exception) -> TailforgeError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return TailforgeError(f"cannot load a CLIP model from {str(path)!r} ({first})",
                          "pass a folder saved with save_pretrained (or a hub id when online, for the filter)")


class ClipVision(nn.Module):
    """The CLIP image tower and projection as a backbone: float images in [0, 1] (N x 1|3 x H x W), any size
    -> L2-normalised image embeddings (N x D). Grey images are repeated over RGB; the resize is bilinear
    with antialiasing, then CLIP's mean/std (from ``preprocessor_config.json`` when the folder has one)."""

    def __init__(self, model: nn.Module, mean, std, size: int):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.size = int(size)
        self.interpolate = self.size != int(model.config.image_size)
        self.num_features = int(model.config.projection_dim)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = fit_input(x01, (self.size, self.size), self.mean, self.std)
        out = self.model(pixel_values=x, interpolate_pos_encoding=True) if self.interpolate else \
            self.model(pixel_values=x)
        return F.normalize(out.image_embeds.float(), dim=-1)


def load_clip_vision(path, image_size: int | None = None) -> ClipVision:
    """``ClipVision`` from a CLIP folder (a full ``CLIPModel`` or an image tower alone), or a hub id when online."""
    from transformers import CLIPVisionModelWithProjection

    local = Path(str(path)).expanduser().exists()
    try:
        with quiet_transformers():
            model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=local)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _cannot_load(path, exc) from None
    mean, std = CLIP_MEAN, CLIP_STD
    pre = Path(str(path)) / "preprocessor_config.json"
    if local and pre.is_file():
        conf = json.loads(pre.read_text())
        mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
    return ClipVision(model.eval(), mean, std, image_size or model.config.image_size)


class ClipImages:
    """uint8 images (N x H x W x C) -> L2-normalised CLIP image embeddings (N x D float32), in batches.

    ``key`` names the weights (path, size and mtime of every file; a hub id by its name) and the input
    size: the feature cache's key, the same for the filter's ``clip`` embedder and for ``clip_adapter``.
    """

    name = "clip"

    def __init__(self, path, batch_size: int = 256, device=None, image_size: int | None = None,
                 model: ClipVision | None = None):
        self.path = str(path)
        self.local = Path(self.path).expanduser().exists()
        self.batch_size, self.device, self.image_size = batch_size, device, image_size
        self._model = model  # the tower of a loaded clip_adapter, or None: loaded on first use

    @property
    def key(self) -> str:
        ident = file_key(Path(self.path)) if self.local else hashlib.sha1(self.path.encode()).hexdigest()[:16]
        return f"clip-{ident}-{self.image_size}"

    def load(self) -> ClipVision:
        if self._model is None:
            dev = torch.device(self.device) if self.device else \
                torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self._model = load_clip_vision(self.path, self.image_size).to(dev)
        return self._model

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            raise TailforgeError("no images to embed", "the candidate or real set is empty")
        model = self.load()
        dev = model.mean.device
        out = []
        for s in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.array(images[s:s + self.batch_size], dtype=np.uint8)).to(dev)
            out.append(model(x.permute(0, 3, 1, 2).float().div_(255)).cpu().numpy())
        return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------- stage 1: class prompts

def prompts_for(class_names: list[str], templates: list[str]) -> list[list[str]]:
    """One prompt per class and template; ``{name}`` is the class name with underscores as spaces."""
    return [[t.format(name=str(n).replace("_", " ")) for t in templates] for n in class_names]


@torch.inference_mode()
def text_features(path, class_names: list[str], templates: list[str]) -> tuple[np.ndarray, float]:
    """(class embeddings C x D, unit rows: each the mean of its prompts' unit embeddings; CLIP's logit scale)."""
    from transformers import AutoTokenizer, CLIPModel

    path = check_folder(path)
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _cannot_load(path, exc) from None
    missing = [k for k in info.get("missing_keys", ()) if k.startswith(("text_model.", "text_projection", "logit"))]
    if missing:
        raise TailforgeError(f"CLIP folder {path} lacks the text tower ({len(missing)} tensors, e.g. {missing[0]})",
                             f"save the full CLIPModel there, {HOW}")
    texts = [t for group in prompts_for(class_names, templates) for t in group]
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt",
              max_length=int(model.config.text_config.max_position_embeddings))
    out = model.eval().get_text_features(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"))
    emb = out if torch.is_tensor(out) else out.pooler_output
    emb = F.normalize(emb.float(), dim=-1).view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).numpy(), float(model.logit_scale.exp())


def cached_text_features(run: RunDir, path, class_names: list[str], templates: list[str]) -> tuple[np.ndarray, float]:
    """``text_features`` kept next to the image features (``filter/cache/cliptext-*.npz``): a re-run loads no model."""
    ident = hashlib.sha1(json.dumps([list(map(str, class_names)), list(templates)]).encode()).hexdigest()[:16]
    cache = cache_dir(run) / f"cliptext-{file_key(Path(path))}-{ident}.npz"
    if cache.is_file():
        z = np.load(cache)
        return z["text"], float(z["logit_scale"])
    text, scale = text_features(path, class_names, templates)
    with atomic_path(cache) as tmp:
        np.savez(tmp, text=text, logit_scale=np.float32(scale))
    return text, scale


# ----------------------------------------------------------------------------- the classifier

class ClipAdapter(nn.Module):
    """Frozen CLIP image tower -> (zero-shot head, linear adapter), blended; a ``Classifier`` like the others
    (``backbone``, ``head``, ``feature_dim``, ``input_size``, ``forward_features``, ``forward_head``).

    ``backbone`` is a ``ClipVision``, or None while the adapter trains on cached features. It is never part
    of the state dict: the CLIP folder's path in the model's ``config.json`` says where it comes from.
    """

    def __init__(self, text: torch.Tensor, logit_scale: float, input_size: int, head: str = "linear",
                 scale: float = 16.0, backbone: ClipVision | None = None, center=None, spread: float = 1.0):
        super().__init__()
        num_classes, dim = text.shape
        self.backbone = backbone
        self.feature_dim, self.input_size = int(dim), int(input_size)
        self.register_buffer("text", F.normalize(torch.as_tensor(text, dtype=torch.float32), dim=1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.register_buffer("blend", torch.tensor(1.0))
        self.register_buffer("center", torch.zeros(dim) if center is None else torch.as_tensor(center).float())
        self.register_buffer("spread", torch.tensor(float(spread)))
        self.head = make_head(head, dim, num_classes, scale)
        with torch.no_grad():  # stage 2 starts where stage 1 is: head(features(u)) = logit_scale * text . u
            if isinstance(self.head, nn.Linear):
                self.head.weight.copy_(self.text * (self.logit_scale * self.spread))
                self.head.bias.copy_(self.logit_scale * self.text @ self.center)
            else:
                self.head.weight.copy_(self.text)
        self.register_state_dict_post_hook(_without_backbone)
        self.register_load_state_dict_post_hook(_backbone_not_expected)

    def features(self, unit):
        """Unit CLIP embeddings -> what the head sees: standardised on the real train split."""
        return (unit - self.center.cpu().numpy()) / float(self.spread) if isinstance(unit, np.ndarray) else \
            (unit - self.center) / self.spread

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            raise RuntimeError("ClipAdapter has no image tower loaded (train.load_model loads it)")
        return self.features(self.backbone(x))

    def zero_shot(self, f: torch.Tensor) -> torch.Tensor:
        """Stage 1 on the head's features: logit_scale * cos(unit embedding, class text embedding)."""
        with torch.autocast(f.device.type, enabled=False):  # float32: CLIP's logit scale (100) magnifies bf16 error
            unit = f.float() * self.spread + self.center
            return self.logit_scale * F.normalize(unit, dim=1) @ self.text.T

    def mix(self, f: torch.Tensor, blend) -> torch.Tensor:
        return (1 - blend) * self.zero_shot(f).log_softmax(1) + blend * self.head(f).float().log_softmax(1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.mix(f, self.blend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def choose_blend(self, val_feats: torch.Tensor, val_y: np.ndarray, score, fixed: float | None = None) -> dict:
        """Set ``blend`` to the value of best VAL ``score(y, pred)`` over ``BLEND_GRID`` (ties: lower NLL), or to
        ``fixed``; returns the choice, zero-shot (a = 0) and adapter-only (a = 1) val scores, and every value seen."""
        y = torch.as_tensor(np.array(val_y, dtype=np.int64), device=val_feats.device)
        seen = []
        for a in sorted(set(BLEND_GRID) | ({float(fixed)} if fixed is not None else set())):
            logp = torch.cat([self.mix(val_feats[i:i + 4096], a) for i in range(0, len(val_feats), 4096)])
            pred = logp.argmax(1).cpu().numpy()
            nll = float(-logp.gather(1, y[:, None]).mean())
            seen.append({"blend": float(a), "val_balanced_acc": round(float(score(val_y, pred)), 6),
                         "val_top1": round(float((pred == val_y).mean()), 6), "val_nll": round(nll, 6)})
        by = {r["blend"]: r for r in seen}
        best = by[float(fixed)] if fixed is not None else max(seen, key=lambda r: (r["val_balanced_acc"], -r["val_nll"]))
        self.blend.fill_(best["blend"])
        return {"blend": best["blend"], "blend_chosen_on": "fixed" if fixed is not None else "val",
                "val_balanced_acc": best["val_balanced_acc"], "val_top1": best["val_top1"],
                "zero_shot_val_balanced_acc": by[0.0]["val_balanced_acc"],
                "adapter_val_balanced_acc": by[1.0]["val_balanced_acc"], "grid": seen}


def _without_backbone(module, state_dict, prefix, local_metadata) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
        del state_dict[k]


def _backbone_not_expected(module, incompatible) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith("backbone.")]


def unit_features(run: RunDir, enc: ClipImages, uris: list[str], info: dict) -> np.ndarray:
    """Unit CLIP embeddings of a run's images, from the feature cache (computed and stored on first use)."""
    if not uris:
        return np.zeros((0, 0), np.float32)
    chans, size = info["channels"], tuple(info["image_size"])
    return embed_cached(enc, list(uris), run, lambda u: load_images(u, run.root, chans, size))


def row_features(run: RunDir, enc: ClipImages, rows, info: dict) -> np.ndarray:
    """``unit_features`` of manifest rows: the real ones as one cache entry (the list the filter embeds, so
    the two hit the same file), the synthetic images as another."""
    real = (rows["source"] == "real").to_numpy()
    uris = rows["uri"].to_numpy()
    parts = {flag: unit_features(run, enc, uris[real == flag].tolist(), info) for flag in (True, False)}
    dim = max(p.shape[1] for p in parts.values())
    out = np.zeros((len(rows), dim), np.float32)
    for flag, part in parts.items():
        if len(part):
            out[real == flag] = part
    return out


def adapter_for_run(run: RunDir, cfg, info: dict, img_rows, val_rows, head: str, dev: torch.device):
    """(model without its image tower, train features, val features, meta["clip"]) for ``fit``; with
    ``clip_stage1: contrastive`` on the towers stage 1 tunes first."""
    path = check_folder(cfg.pretrained).resolve()
    stage1 = None
    if cfg.clip_stage1 == "contrastive":
        src, (path, stage1) = path, contrastive_stage1(run, cfg, info, img_rows, dev)
    text, logit_scale = cached_text_features(run, path, list(info["class_names"]), cfg.clip.prompts)
    enc = ClipImages(path, cfg.eval_batch_size, dev, cfg.clip.image_size)
    feats, val = row_features(run, enc, img_rows, info), unit_features(run, enc, val_rows["uri"].tolist(), info)
    if feats.shape[1] != text.shape[1]:
        raise TailforgeError(f"CLIP image features of {path} have dimension {feats.shape[1]}, its text features "
                             f"{text.shape[1]}", "the folder's image and text towers differ: re-save the CLIPModel")
    real = feats[(img_rows["source"] == "real").to_numpy()]
    center = real.mean(0)
    spread = max(float(np.sqrt(((real - center) ** 2).mean())), 1e-6)  # RMS per dimension
    model = ClipAdapter(torch.from_numpy(text), logit_scale, cfg.clip.image_size or _config_image_size(path),
                        head=head, scale=cfg.scale, center=torch.from_numpy(center), spread=spread)
    meta = {"path": str(path), "key": file_key(path), "prompts": list(cfg.clip.prompts),
            "image_size": cfg.clip.image_size, "logit_scale": round(logit_scale, 6)}
    if stage1 is not None:  # the towers move into the model folder (``move_towers``) and load from there
        meta.update(path=str(src), key=file_key(src), towers=TOWERS, stage1_dir=str(path), stage1=stage1)
    return model, model.features(feats), model.features(val), meta


def base_features(run: RunDir, base: ClipAdapter, meta: dict, rows, val_rows, info: dict, batch_size: int, dev):
    """cRT on a clip_adapter: the features its head sees, from the same cache."""
    towers = getattr(base, "tower_path", None) or meta["clip"]["path"]  # stage-1 towers: the model folder's
    enc = ClipImages(towers, batch_size, dev, meta["clip"].get("image_size"), model=base.backbone)
    return (base.features(row_features(run, enc, rows, info)),
            base.features(unit_features(run, enc, val_rows["uri"].tolist(), info)))


def _config_image_size(path: Path) -> int:
    conf = json.loads((path / "config.json").read_text())
    return int((conf.get("vision_config") or conf).get("image_size", 224))


def adapter_from_meta(meta: dict, folder=None) -> ClipAdapter:
    """A saved ``clip_adapter`` with its image tower loaded from the CLIP folder its config.json names (the
    model ``folder``'s own ``clip/`` after a contrastive stage 1)."""
    c = meta["clip"]
    if c.get("towers"):
        if folder is None:
            raise TailforgeError("this clip_adapter model carries its stage-1 CLIP towers in its folder",
                                 "load it with tailforge.train.load_model(MODEL_DIR)")
        path = Path(folder) / c["towers"]
        text = torch.zeros(meta["num_classes"], meta["feature_dim"])
        model = ClipAdapter(text, 1.0, meta["input_size"], head=meta.get("head", "linear"),
                            scale=meta.get("scale", 16.0), backbone=load_clip_vision(path, c.get("image_size")))
        model.tower_path = str(path)  # the model folder's integrity record covers these files
        return model
    path = Path(c["path"])
    try:
        check_folder(path, text=False)
    except TailforgeError as exc:
        raise TailforgeError(f"this clip_adapter model reads its image tower from {path}, which is unusable: "
                             f"{exc.problem}", "put the CLIP folder it was trained with back there, or train "
                             "the model again with --pretrained DIR") from None
    if file_key(path) != c.get("key"):
        log.warning("the CLIP folder %s changed since this clip_adapter model was trained (files, sizes or times "
                    "differ); its predictions assume the original weights", path)
    text = torch.zeros(meta["num_classes"], meta["feature_dim"])
    return ClipAdapter(text, 1.0, meta["input_size"], head=meta.get("head", "linear"),
                       scale=meta.get("scale", 16.0), backbone=load_clip_vision(path, c.get("image_size")))


# ----------------------------------------------------------------------------- ECVL's stage 1

TOWERS = "clip"  # the tuned towers' folder inside the model folder


def contrastive_stage1(run: RunDir, cfg, info: dict, rows, dev: torch.device) -> tuple[Path, dict]:
    """Fine-tune both towers of ``cfg.pretrained`` contrastively on ``rows`` (step 0 of the module docstring).

    Returns (the tuned CLIP folder ``models/.clip-stage1-<id>/``, its record). A finished folder of the same
    settings is reused (a resumed training does not tune again).
    """
    from transformers import AutoTokenizer, CLIPModel

    from .augment import augment
    from .lossaug import LossGuided
    from .samplers import epoch_indices
    from tailforge.data.integrity import folder_ok

    src = check_folder(cfg.pretrained).resolve()
    ident = hashlib.sha1(json.dumps(cfg.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = run.root / "models" / f".clip-stage1-{ident}"
    if (out / "stage1.json").is_file() and folder_ok(out, "CLIP stage 1", show_root=run.root):
        return out, read_json(out / "stage1.json")
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
            model = CLIPModel.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _cannot_load(src, exc) from None
    names, templates = list(info["class_names"]), list(cfg.clip.prompts)
    texts = [t for group in prompts_for(names, templates) for t in group]
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt",
              max_length=int(model.config.text_config.max_position_embeddings))
    ids, mask = enc["input_ids"].to(dev), enc.get("attention_mask")
    mask = mask.to(dev) if mask is not None else None
    size = int(cfg.clip.image_size or model.config.vision_config.image_size)
    interp = size != int(model.config.vision_config.image_size)
    mean, std = CLIP_MEAN, CLIP_STD
    if (src / "preprocessor_config.json").is_file():
        conf = json.loads((src / "preprocessor_config.json").read_text())
        mean, std = conf.get("image_mean", mean), conf.get("image_std", std)

    images = load_images(rows["uri"], run.root, info["channels"], tuple(info["image_size"]))
    labels = rows["label"].to_numpy().astype(np.int64)
    torch.manual_seed(cfg.seed)
    model = model.to(dev).train()
    model.logit_scale.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.clip.stage1_lr, weight_decay=cfg.weight_decay)
    bs = max(2, min(cfg.batch_size, len(labels)))
    steps = max(1, len(labels) // bs)
    total = cfg.clip.stage1_epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + np.cos(np.pi * k / total)))
    policy = LossGuided(len(labels), **cfg.lossaug.model_dump()) if cfg.aug_policy == "loss_guided" else None
    amp = dev.type == "cuda" and cfg.amp
    y_all = torch.from_numpy(labels).to(dev)
    log_rows = []
    for epoch in range(cfg.clip.stage1_epochs):
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch * 7919 + 4242) % (2**63 - 1))
        order = epoch_indices("instance", labels, cfg.seed, 1000 + epoch)
        if policy is not None:
            policy.new_epoch()
        loss_sum = 0.0
        for step in range(steps):
            idx = order[step * bs:(step + 1) * bs]
            x = torch.from_numpy(images[idx]).to(dev).permute(0, 3, 1, 2).float().div_(255)
            if policy is not None:
                x = policy.augment(x, idx, g)
            x = augment(x, cfg.augment, cfg.hflip, g)
            y = y_all[torch.from_numpy(idx).to(dev)]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                per, loss = _stage1_loss(model, fit_input(x, (size, size), mean, std), interp, ids, mask, y,
                                         len(names), len(templates))
            if not torch.isfinite(loss):
                raise TailforgeError(f"CLIP stage 1: the contrastive loss became {loss.item()} at epoch {epoch + 1}",
                                     "lower --clip-stage1-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
            sched.step()
            if policy is not None:
                policy.update(idx, per)
            loss_sum += loss.item()
        row = {"epoch": epoch + 1, "train_loss": round(loss_sum / steps, 6), "steps": steps}
        if policy is not None:
            row["lossaug"] = policy.summary()
        log_rows.append(row)
        log.info("CLIP stage 1 epoch %d: contrastive loss %.4f", epoch + 1, row["train_loss"])
    record = {"source": str(src), "epochs": cfg.clip.stage1_epochs, "lr": cfg.clip.stage1_lr, "batch_size": bs,
              "steps_per_epoch": steps, "train_images": int(len(labels)), "log": log_rows}
    model = model.eval().cpu()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if (src / "preprocessor_config.json").is_file():
            (tmp / "preprocessor_config.json").write_bytes((src / "preprocessor_config.json").read_bytes())
        write_json(tmp / "stage1.json", record)
    return out, record


def _stage1_loss(model, pixels, interp: bool, ids, mask, y, num_classes: int, templates: int):
    """(per-image image->text CE, the symmetric class-level InfoNCE loss) of one batch."""
    img = model.get_image_features(pixel_values=pixels, **({"interpolate_pos_encoding": True} if interp else {}))
    img = F.normalize((img if torch.is_tensor(img) else img.pooler_output).float(), dim=-1)
    txt = model.get_text_features(input_ids=ids, attention_mask=mask)
    txt = F.normalize((txt if torch.is_tensor(txt) else txt.pooler_output).float(), dim=-1)
    txt = F.normalize(txt.view(num_classes, templates, -1).mean(1), dim=-1)
    scale = model.logit_scale.exp().float()
    per = F.cross_entropy(scale * img @ txt.T, y, reduction="none")  # image -> its class's text
    present = torch.unique(y)
    target = (y[None, :] == present[:, None]).float()
    target = target / target.sum(1, keepdim=True)  # text -> the batch's images of its class, shared target
    t2i = -(target * (scale * txt[present] @ img.T).log_softmax(1)).sum(1).mean()
    return per.detach(), (per.mean() + t2i) / 2


def move_towers(meta: dict, folder: Path) -> None:
    """Into the model ``folder`` being written: the stage-1 towers (``meta.clip.stage1_dir``, removed from meta)."""
    import shutil

    c = meta.get("clip") or {}
    src = c.pop("stage1_dir", None)
    if src:
        shutil.move(src, Path(folder) / c["towers"])


__all__ = ["ClipAdapter", "ClipImages", "ClipVision", "load_clip_vision", "text_features", "check_folder",
           "adapter_for_run", "adapter_from_meta", "prompts_for", "contrastive_stage1", "move_towers"]
