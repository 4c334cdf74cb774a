"""Dataset loaders. One registry, one loader each, all returning a ``RawDataset``.

A ``RawDataset`` holds, per official split ("train", "val", "test", or "all" when the dataset
has none), either a uint8 image array (array datasets) or a list of image files (folder
datasets), plus integer labels and the class names. ``tailforge.data.build`` turns it into a manifest.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import listfiles
from .config import DataConfig, split_folders
from .errors import TailforgeError, unknown_name
from .images import IMAGE_EXTS, is_image_name, open_image

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE = Path(os.environ.get("TAILFORGE_CACHE", Path.home() / ".cache" / "tailforge"))


@dataclass
class RawSplit:
    labels: np.ndarray
    images: np.ndarray | None = None  # N x H x W x C uint8 (array datasets)
    files: list[str] | None = None  # absolute paths (folder datasets)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RawDataset:
    name: str
    class_names: list[str]
    splits: dict[str, RawSplit]
    channels: int
    image_size: tuple[int, int] | None  # native (h, w) of array datasets; None when sizes vary
    root: str | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, Callable[[DataConfig], RawDataset]] = {}


def register(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


def load_dataset(cfg: DataConfig) -> RawDataset:
    if cfg.dataset not in DATASETS:
        raise unknown_name("dataset", cfg.dataset, DATASETS)
    return DATASETS[cfg.dataset](cfg)


def _need_root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise TailforgeError(f"dataset '{cfg.dataset}' needs a root folder", "pass --root PATH")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise TailforgeError(f"dataset root {root} does not exist or is not a folder", "pass an existing --root PATH")
    return root


# --------------------------------------------------------------------------- digits
@register("digits")
def load_digits(cfg: DataConfig) -> RawDataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes): the embedded offline default."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    return RawDataset(
        name="digits",
        class_names=[str(c) for c in d.target_names],
        splits={"all": RawSplit(labels=d.target.astype(np.int64), images=images)},
        channels=1,
        image_size=(8, 8),
    )


# --------------------------------------------------------------------------- fashion-mnist
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the MNIST container format."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        blob = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", blob[:4])
    if zero != 0 or dtype_code != 0x08:
        raise TailforgeError(f"{path} is not a uint8 IDX file", "point --root at the Fashion-MNIST files")
    dims = struct.unpack(">" + "I" * ndim, blob[4:4 + 4 * ndim])
    data = np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise TailforgeError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values)",
                             "re-install or re-download the dataset")
    return data.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_folder(cfg: DataConfig) -> Path:
    candidates: list[Path] = []
    if cfg.root is not None:
        root = Path(cfg.root).expanduser()
        candidates += [root, root / "FashionMNIST" / "raw", root / "raw"]
    else:
        candidates += [DEBIAN_FASHION_MNIST, CACHE / "FashionMNIST" / "raw"]
    for folder in candidates:
        if _find_idx(folder, "train-images-idx3-ubyte"):
            return folder
    if cfg.download:
        import torchvision

        target = Path(cfg.root).expanduser() if cfg.root else CACHE
        try:
            torchvision.datasets.FashionMNIST(str(target), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(target), train=False, download=True)
        except Exception as exc:  # network errors come in many types
            raise TailforgeError(f"downloading Fashion-MNIST failed ({exc})",
                                 "install Debian's dataset-fashion-mnist or pass --root") from None
        return target / "FashionMNIST" / "raw"
    where = str(cfg.root) if cfg.root else str(DEBIAN_FASHION_MNIST)
    raise TailforgeError(
        f"Fashion-MNIST files not found (looked in {where})",
        "`apt-get install dataset-fashion-mnist`, or --root pointing at a torchvision root or the IDX files, "
        "or --download when online",
    )


@register("fashion-mnist")
def load_fashion_mnist(cfg: DataConfig) -> RawDataset:
    """Fashion-MNIST (70,000 28x28 grey images) from IDX files: Debian's package, a torchvision root,
    or a download when allowed."""
    folder = _fashion_folder(cfg)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_p = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        lab_p = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if img_p is None or lab_p is None:
            raise TailforgeError(f"{folder} lacks the {split} IDX files", "re-install the dataset")
        images, labels = read_idx(img_p), read_idx(lab_p).astype(np.int64)
        if len(images) != len(labels):
            raise TailforgeError(f"{img_p} has {len(images)} images but {len(labels)} labels", "re-install the dataset")
        splits[split] = RawSplit(labels=labels, images=images[..., None])
    return RawDataset("fashion-mnist", FASHION_CLASSES, splits, channels=1, image_size=(28, 28), root=str(folder))


# --------------------------------------------------------------------------- cifar
def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def _cifar(cfg: DataConfig, n: int) -> RawDataset:
    folder_name = "cifar-10-batches-py" if n == 10 else "cifar-100-python"
    root = Path(cfg.root).expanduser() if cfg.root else CACHE
    folder = root / folder_name
    if not folder.is_dir() and cfg.download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if n == 10 else torchvision.datasets.CIFAR100
        try:
            cls(str(root), train=True, download=True)
        except Exception as exc:
            raise TailforgeError(f"downloading CIFAR-{n} failed ({exc})", "pass --root with the torchvision files") from None
    if not folder.is_dir():
        raise TailforgeError(
            f"CIFAR-{n} not found: {folder} does not exist",
            f"pass --root pointing at the folder that holds {folder_name}/ (torchvision format), or --download when online",
        )
    if n == 10:
        names = _unpickle(folder / "batches.meta")["label_names"]
        parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        key = "labels"
    else:
        names = _unpickle(folder / "meta")["fine_label_names"]
        parts = {"train": ["train"], "test": ["test"]}
        key = "fine_labels"
    splits = {}
    for split, files in parts.items():
        imgs, labs = [], []
        for f in files:
            d = _unpickle(folder / f)
            imgs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labs.append(np.asarray(d[key], dtype=np.int64))
        splits[split] = RawSplit(labels=np.concatenate(labs), images=np.ascontiguousarray(np.concatenate(imgs)))
    return RawDataset(f"cifar{n}", list(names), splits, channels=3, image_size=(32, 32), root=str(folder))


@register("cifar10")
def load_cifar10(cfg: DataConfig) -> RawDataset:
    """CIFAR-10 in torchvision's python format (``root/cifar-10-batches-py``)."""
    return _cifar(cfg, 10)


@register("cifar100")
def load_cifar100(cfg: DataConfig) -> RawDataset:
    """CIFAR-100 in torchvision's python format (``root/cifar-100-python``)."""
    return _cifar(cfg, 100)


# --------------------------------------------------------------------------- folders
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _scan_classes(folder: Path, skip_bad: bool, skipped: list[str], verify: bool = True,
                  modes: set[str] | None = None) -> dict[str, list[str]]:
    """``{class: [files]}`` of ``folder/<class>/``; with ``verify`` every image is decoded (and its PIL mode
    added to ``modes``)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TailforgeError(f"{folder} has no class sub-folders", "lay images out as ROOT/<class>/<image>")
    out: dict[str, list[str]] = {}
    for c in classes:
        files = []
        for p in sorted((folder / c).rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if not is_image_name(p):
                if skip_bad:
                    skipped.append(f"{p}\tnot an image file")
                    continue
                raise TailforgeError(
                    f"{p} is not an image file (extensions: {', '.join(sorted(IMAGE_EXTS))})",
                    "move it out of the dataset folder, or pass --skip-bad",
                )
            if verify:
                try:
                    im = open_image(p)
                    if modes is not None:
                        modes.add(im.mode)
                except TailforgeError as err:
                    if not skip_bad:
                        raise
                    skipped.append(f"{p}\t{err.problem}")
                    continue
            files.append(str(p.resolve()))
        if not files:
            raise TailforgeError(f"class folder {folder / c} holds no usable images",
                                 "add images or remove the empty folder")
        out[c] = files
    return out


def _files_split(per_class: dict[str, list[str]], names: list[str]) -> RawSplit:
    files, labels = [], []
    for i, c in enumerate(names):
        files += per_class.get(c, [])
        labels += [i] * len(per_class.get(c, []))
    return RawSplit(labels=np.asarray(labels, dtype=np.int64), files=files)


@register("imagefolder")
def load_imagefolder(cfg: DataConfig) -> RawDataset:
    """Any ``root/<class>/<image>`` tree (Caltech-101/256, Stanford Cars style), split 70/15/15; or a root with
    ``train/``, ``val/`` (or ``validation/``) and ``test/`` class folders (the layout ``tailforge export`` writes),
    whose splits are kept as they are (``profile: none`` unless asked).

    One channel when every image is grey (MNIST-like folders), else RGB (grey images among colour ones
    are converted)."""
    root = _need_root(cfg)
    skipped: list[str] = []
    modes: set[str] = set()
    folders = split_folders(root)
    if folders is None:
        per_class = _scan_classes(root, cfg.skip_bad, skipped, modes=modes)
        names = sorted(per_class)
        splits = {"all": _files_split(per_class, names)}
    else:
        parts = {s: _scan_classes(f, cfg.skip_bad, skipped, modes=modes) for s, f in folders.items()}
        names = sorted(parts["train"])
        for s, pc in parts.items():
            extra = sorted(set(pc) - set(names))
            if extra:
                raise TailforgeError(f"{folders[s]} has classes without a folder in {folders['train']}: "
                                     f"{', '.join(extra[:5])}", "give every class train images, or remove those folders")
        splits = {s: _files_split(pc, names) for s, pc in parts.items()}
    channels = 1 if modes and modes <= GREY_MODES else 3
    return RawDataset("imagefolder", names, splits, channels=channels,
                      image_size=None, root=str(root.resolve()), skipped=skipped)


@register("mini-imagenet")
def load_mini_imagenet(cfg: DataConfig) -> RawDataset:
    """mini-ImageNet(-LT) in the layout ``root/{train,val,test}/<class>/*.jpg`` (same classes in each)."""
    root = _need_root(cfg)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise TailforgeError(f"{root} lacks train/ and test/ sub-folders",
                             "lay mini-ImageNet out as ROOT/{train,val,test}/<class>/*.jpg")
    skipped: list[str] = []
    parts = {s: _scan_classes(root / s, cfg.skip_bad, skipped) for s in ("train", "val", "test") if (root / s).is_dir()}
    names = sorted(parts["train"])
    for s, pc in parts.items():
        extra = sorted(set(pc) - set(names))
        if extra:
            raise TailforgeError(f"{root / s} has classes not in train/: {', '.join(extra[:5])}",
                                 "use the same class folders in every split (the few-shot class-disjoint "
                                 "mini-ImageNet split is not a classification benchmark)")
    splits = {s: _files_split(pc, names) for s, pc in parts.items()}
    return RawDataset("mini-imagenet", names, splits, channels=3, image_size=None,
                      root=str(root.resolve()), skipped=skipped)


# --------------------------------------------------------------------------- published split files
def _list_files(cfg: DataConfig) -> tuple[Path, dict[str, Path]]:
    root = _need_root(cfg)
    if cfg.lists is None:
        example = "train2018.json, val2018.json" if cfg.dataset == "inaturalist" else "ImageNet_LT_train.txt, ..."
        raise TailforgeError(f"dataset '{cfg.dataset}' needs data.lists, one file per split ({example})",
                             "--set data.lists.train=FILE --set data.lists.val=FILE --set data.lists.test=FILE")
    files = {s: listfiles.resolve_file(root, f, f"{s} list") for s, f in cfg.lists.model_dump().items() if f}
    if len(files) == 1:
        raise TailforgeError(f"dataset '{cfg.dataset}' needs a val or test file besides train in data.lists",
                             "--set data.lists.test=FILE (val is then held out of it) or data.lists.val=FILE")
    return root, files


def _list_dataset(name: str, root: Path, entries: dict[str, listfiles.Entries], names: list[str],
                  cfg: DataConfig) -> RawDataset:
    skipped: list[str] = []
    listfiles.check_entries(root, entries, names, cfg.skip_bad, skipped)
    splits = {s: RawSplit(labels=listfiles.label_array(e), files=e.files) for s, e in entries.items()}
    return RawDataset(name, names, splits, channels=3, image_size=None, root=str(root.resolve()), skipped=skipped)


@register("listfile")
def load_listfile(cfg: DataConfig) -> RawDataset:
    """ImageNet-LT / Places-LT split files: ``data.lists`` {train, val, test} of ``relative/path label`` lines
    under ``data.root``; class names from ``data.names`` (one a line) or the label ids. Splits as published."""
    root, files = _list_files(cfg)
    entries = {s: listfiles.read_list(p) for s, p in files.items()}
    if cfg.names is not None:
        names = listfiles.read_names(listfiles.resolve_file(root, cfg.names, "names file"))
    else:
        names = [str(i) for i in range(1 + max(max(e.labels) for e in entries.values()))]
    return _list_dataset("listfile", root, entries, names, cfg)


@register("inaturalist")
def load_inaturalist(cfg: DataConfig) -> RawDataset:
    """iNaturalist 2017/2018/2021 train/val JSON under ``data.root`` (the folder their ``file_name`` paths start
    in). Classes: the categories with train images, in sorted-id order; names from ``categories``."""
    root, files = _list_files(cfg)
    if cfg.names is not None:
        raise TailforgeError("data.names is for listfile; iNaturalist's names come from its JSON `categories`",
                             "leave data.names out")
    read = {s: listfiles.read_inat(p) for s, p in files.items()}
    train, cat_names = read["train"]
    ids = sorted(set(train.labels))
    label_of = {c: i for i, c in enumerate(ids)}
    for s, (e, _) in read.items():
        for k, cat in enumerate(e.labels):
            if cat not in label_of:
                raise TailforgeError(f"{e.at(k)}: category_id {cat} has no images in the train split {train.file}",
                                     "every class of val/test needs train images")
        e.labels = [label_of[c] for c in e.labels]
    return _list_dataset("inaturalist", root, {s: e for s, (e, _) in read.items()}, [cat_names[c] for c in ids], cfg)


# --------------------------------------------------------------------------- Hugging Face datasets
@register("hf")
def load_hf(cfg: DataConfig) -> RawDataset:
    """A local Hugging Face dataset (``save_to_disk`` folder or parquet shards; ``data/hf.py``): its Image and
    ClassLabel columns (``data.image_column`` / ``data.label_column``), its splits as they are. Nothing is
    downloaded."""
    from .hf import read_hf

    d = read_hf(cfg)
    splits = {s: RawSplit(labels=labels, images=images) for s, (labels, images) in d["splits"].items()}
    return RawDataset("hf", d["names"], splits, channels=d["channels"], image_size=d["image_size"], root=d["root"],
                      skipped=d["skipped"])
