"""Image I/O: Pillow with a decompression-bomb limit, and batch loading of manifest rows.

Every image a stage sees goes through here, so a corrupt file is reported once, by name.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from .errors import TailforgeError

# A decompression bomb is an error, not a warning: 40 Mpx is far above any dataset we serve.
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def open_image(path: str | os.PathLike, mode: str | None = None) -> Image.Image:
    """Open and fully decode an image; any failure names the file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                if mode and im.mode != mode:
                    im = im.convert(mode)
                else:
                    im = im.copy()
        return im
    except FileNotFoundError:
        raise TailforgeError(f"image {path} does not exist", "check the dataset root") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TailforgeError(
            f"image {path} is larger than {MAX_PIXELS:,} pixels (decompression-bomb limit)",
            "resize it, or remove it, or pass --skip-bad",
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise TailforgeError(
            f"image {path} is corrupt or not an image ({type(exc).__name__}: {exc})",
            "remove or replace the file, or pass --skip-bad to leave it out",
        ) from None


def to_array(im: Image.Image, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """PIL image -> uint8 HxWxC with the given channels, resized (antialiased) to ``size`` (h, w)."""
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None and (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC, reducing_gap=None)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


@lru_cache(maxsize=16)
def _npy(path: str, mtime: float) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def load_npy(path: str | os.PathLike) -> np.ndarray:
    path = str(path)
    if not os.path.exists(path):
        raise TailforgeError(f"array file {path} does not exist", "re-run the stage that wrote it")
    return _npy(path, os.path.getmtime(path))


def load_images(uris, root: str | os.PathLike, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """Load manifest uris as one uint8 array N x H x W x C.

    ``path#row`` uris are gathered from memory-mapped ``.npy`` files in one fancy-index per file;
    plain paths are decoded with Pillow. ``size`` (h, w) resizes when the stored size differs.
    """
    root = Path(root)
    uris = list(uris)
    out: list[np.ndarray | None] = [None] * len(uris)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for i, uri in enumerate(uris):
        path, _, row = uri.partition("#")
        p = path if os.path.isabs(path) else str(root / path)
        if row:
            by_file.setdefault(p, []).append((i, int(row)))
        else:
            out[i] = to_array(open_image(p), channels, size)
    for p, pairs in by_file.items():
        arr = load_npy(p)
        idx = np.fromiter((r for _, r in pairs), dtype=np.int64, count=len(pairs))
        if idx.size and (idx.max() >= len(arr) or idx.min() < 0):
            raise TailforgeError(f"{p} has {len(arr)} rows but the manifest asks for row {int(idx.max())}",
                                 "the run folder is inconsistent; rebuild it with a new --run")
        block = np.asarray(arr[idx])
        if block.ndim == 3:
            block = block[..., None]
        for (i, _), img in zip(pairs, block):
            if size is not None and img.shape[:2] != tuple(size):
                img = to_array(Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img), channels, size)
            elif img.shape[-1] != channels:
                img = to_array(Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img), channels, None)
            out[i] = img
    if not out:
        h, w = size if size else (0, 0)
        return np.zeros((0, h, w, channels), dtype=np.uint8)
    return np.stack(out)  # type: ignore[arg-type]


def save_png(arr: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 HxW(xC) array as PNG (no metadata, so equal arrays give equal bytes)."""
    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    Image.fromarray(arr).save(path, format="PNG", optimize=False)
