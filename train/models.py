"""Model factory: one ``create_model`` over our own small nets and timm, with a split backbone / head.

Every model is a ``Classifier``: ``forward_features(x) -> (N, D)`` (pooled), ``forward_head(f) -> logits``.
Inputs are normalized float NCHW; a model resizes them to its ``input_size`` itself, so 8x8 digits
can feed a ConvNeXt. Heads are linear, or cosine (normalized weights and features, times a fixed
scale) for the margin losses.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tailforge.data.errors import TailforgeError, unknown_name

from .weights import find_weights, read_weights  # noqa: F401  (their home is weights.py; kept importable here)

# our name -> (timm name, smallest input side the architecture accepts)
TIMM_MODELS = {
    "resnet18": ("resnet18", 16),
    "resnet50": ("resnet50", 16),
    "mobilenetv2": ("mobilenetv2_100", 16),
    "convnext_tiny": ("convnext_tiny", 32),
    "convnext_base": ("convnext_base", 32),
    "vit_b_16": ("vit_base_patch16_224", 32),
}
OWN_MODELS = ("tiny", "resnet32", "resnet10")
CLIP_MODELS = ("clip_adapter",)  # frozen CLIP + zero-shot head + adapter (train/clip.py); built from its weights
MODELS = OWN_MODELS + tuple(TIMM_MODELS) + CLIP_MODELS


class TinyNet(nn.Module):
    """Three conv blocks and global pooling: the fast default for CPU tests and tiny datasets."""

    def __init__(self, in_chans: int, width: int = 32):
        super().__init__()
        w = width

        def block(i, o, stride):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(in_chans, w, 1), block(w, 2 * w, 2), block(2 * w, 4 * w, 2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 4 * w

    def forward(self, x):
        return self.body(x)

    def feature_map(self, x):
        """The last conv block's output (N, 4w, H/4, W/4); ``forward`` is its spatial mean."""
        return self.body[:-2](x)


class BasicBlock(nn.Module):
    def __init__(self, i: int, o: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(o)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(o)
        self.short = nn.Identity() if stride == 1 and i == o else nn.Sequential(
            nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class CifarResNet(nn.Module):
    """ResNet-32 for 32x32 inputs (He et al. 2016, section 4.2): 3 stages x 5 basic blocks, 16/32/64 channels.

    The backbone of the long-tail literature (Cao et al. 2019, Cui et al. 2019). 1x1-conv shortcuts.
    """

    def __init__(self, in_chans: int, width: int = 16, blocks: int = 5):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_chans, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        layers, c = [], w
        for stage, o in enumerate((w, 2 * w, 4 * w)):
            for b in range(blocks):
                layers.append(BasicBlock(c, o, 2 if (stage > 0 and b == 0) else 1))
                c = o
        self.layers = nn.Sequential(*layers)
        self.num_features = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.feature_map(x), 1).flatten(1)

    def feature_map(self, x):
        """The last stage's output (N, 4w, H/4, W/4); ``forward`` is its spatial mean."""
        return self.layers(self.stem(x))


class CosineHead(nn.Module):
    """Logits = scale * cos(feature, class weight): the normalized head of LDAM/ArcFace/CosFace/SphereFace."""

    def __init__(self, dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = scale

    def forward(self, f):
        return self.scale * F.linear(F.normalize(f, dim=1), F.normalize(self.weight, dim=1))


class Classifier(nn.Module):
    """Backbone + head with a fixed input size; the model every stage passes around."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, input_size: int,
                 head: str = "linear", scale: float = 16.0):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.input_size = input_size
        self.head = make_head(head, feature_dim, num_classes, scale)

    def forward_features(self, x):
        return self.backbone(self._resize(x))

    def forward_head(self, f):
        return self.head(f)

    def _resize(self, x):
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return x

    def feature_map(self, x):
        """The backbone's last feature map (N, C, h, w), for feature distillation; ``pool_map`` of it is
        ``forward_features(x)``. Raises NotImplementedError for a backbone without one (a ViT's tokens)."""
        x = self._resize(x)
        own = getattr(self.backbone, "feature_map", None)
        if own is not None:
            return own(x)
        if hasattr(self.backbone, "forward_features") and hasattr(self.backbone, "forward_head"):  # timm CNNs
            out = self.backbone.forward_features(x)
            if out.ndim == 4 and getattr(self.backbone, "global_pool", None) is not None:
                return out
        raise NotImplementedError(f"{type(self.backbone).__name__} gives no feature map")

    def pool_map(self, fmap):
        """Pooled features (N, D) of a ``feature_map`` output: what ``forward_features`` returns."""
        if hasattr(self.backbone, "feature_map"):
            return fmap.mean((2, 3))
        return self.backbone.forward_head(fmap)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def make_head(kind: str, dim: int, num_classes: int, scale: float) -> nn.Module:
    return CosineHead(dim, num_classes, scale) if kind == "cosine" else nn.Linear(dim, num_classes)


def min_input(arch: str) -> int:
    if arch == "resnet10":
        return 16
    return TIMM_MODELS[arch][1] if arch in TIMM_MODELS else 4


def create_model(arch: str, num_classes: int, in_chans: int, image_size: int, *, width: int | None = None,
                 head: str = "linear", scale: float = 16.0, input_size: int | None = None) -> Classifier:
    """Build a ``Classifier``; ``arch`` is one of ``MODELS`` or any timm model name."""
    size = input_size or max(image_size, min_input(arch))
    if arch in CLIP_MODELS:
        raise TailforgeError(f"model {arch} is built from its CLIP weights, not by create_model",
                             "train it with `tailforge train --model clip_adapter --pretrained DIR`; load a saved one "
                             "with tailforge.train.load_model")
    if arch == "tiny":
        body = TinyNet(in_chans, width or 32)
    elif arch == "resnet32":
        body = CifarResNet(in_chans, width or 16)
    elif arch == "resnet10":  # ImageNet-LT's ResNet-10 (Liu et al. 2019): basic blocks [1, 1, 1, 1], not in timm
        from timm.models.resnet import BasicBlock as TimmBasicBlock, ResNet

        body = ResNet(TimmBasicBlock, [1, 1, 1, 1], num_classes=0, in_chans=in_chans)
    else:
        import timm

        name = TIMM_MODELS.get(arch, (arch, 32))[0]
        if arch not in TIMM_MODELS and not timm.is_model(name):
            raise unknown_name("model", arch, MODELS)
        kw = {"img_size": size} if "vit" in name else {}
        body = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kw)
    return Classifier(body, int(body.num_features), num_classes, size, head=head, scale=scale)


def pretrained_norm(path, chans: int) -> tuple[list[float], list[float]]:
    """The input mean/std the pretrained weights ``path`` (a file, folder or registered name) were trained with:
    their ``pretrained_cfg`` (train/weights.py), else ImageNet's; grey inputs get the channel averages."""
    from .weights import resolve

    return resolve(path).norm(chans)


def pretrained_arch(path) -> str | None:
    """The architecture the weights at ``path`` (a timm folder's ``config.json``, or a registered name) are for."""
    from .weights import PRETRAINED, folder_config

    if str(path) in PRETRAINED:
        return PRETRAINED[str(path)]["arch"]
    return folder_config(Path(path)).get("architecture")


def load_pretrained(model: Classifier, path) -> dict:
    """Load pretrained weights (a local file/folder or a registered name, train/weights.py) into the backbone.

    Tensors map by name, or by order where a port renamed them and every shape matches; the file's classifier
    is left over (``skipped``). A first conv with 3 input channels is summed to 1 channel for grey images
    (timm's rule). Returns the counts (loaded / skipped / missing, the rule); a load that leaves most of the
    backbone random is refused in one line.
    """
    from .weights import load_into, read_source, resolve

    src = resolve(path)
    return {**load_into(model.backbone, read_source(src), str(path)), "source": src.record()}


def param_groups(params, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: biases and norm parameters (1-d tensors) get none.

    ``params``: a module or an iterable of parameters."""
    decay, no_decay = [], []
    for p in (params.parameters() if isinstance(params, nn.Module) else params):
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def use_nhwc(model: nn.Module, channels_last: bool, amp: bool, dev: torch.device) -> bool:
    """Train in channels-last (NHWC)? On GPU when ``amp`` (as before); on CPU when ``channels_last`` (opt-in: about
    1.5x faster there, bench/cpu_layout.py) and the model has no conv that oneDNN mis-handles in NHWC: a strided 1x1
    conv with fewer input channels than its 8/16-channel block computes wrong weight gradients or corrupts the heap
    (uxlfoundation/oneDNN#6035, open; measured here: CifarResNet width 4 aborts). Such a model stays NCHW."""
    if dev.type == "cuda":
        return amp
    if dev.type != "cpu" or not channels_last:
        return False
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                   and m.in_channels // m.groups < 16 for m in model.modules())
