"""Frozen-backbone features of a run's images, computed once and cached in the run folder.

One cache for every user of a frozen image encoder: the filter's embedders (``tailforge.eval.filter``) and
the ``clip_adapter`` classifier (``train/clip.py``) keep their vectors under ``<run>/filter/cache``, named
by the encoder's ``key`` (the exact weights and input size) and by a hash of the uri list and of the
files it names. The same encoder over the same images therefore hits the same file, whichever stage
made it; new weights, new images or a regenerated file under the same name never reuse stale vectors.
Files are written atomically (``data/atomic.py``).

An encoder here is any object with ``key`` (str) and ``embed(uint8 N x H x W x C) -> float32 N x D``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

from tailforge.data.atomic import atomic_path
from tailforge.data.run import RunDir


def file_key(path: Path) -> str:
    """Identity of weights on disk: path, size and mtime of every file (cheap, no hashing)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


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


def cache_dir(run: RunDir) -> Path:
    return run.root / "filter" / "cache"


def embed_cached(embedder, uris: list[str], run: RunDir, load: Callable[[list[str]], np.ndarray],
                 *, chunk: int = 4096, use_cache: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Embeddings of ``uris`` (loaded ``chunk`` at a time by ``load``), cached under ``filter/cache``.

    The cache file is named by the embedder's key and a hash of the uri list, so new weights or
    new candidates never reuse stale vectors.
    """
    path = cache_dir(run) / f"{embedder.key}-{uri_hash(uris, run)}.npy"
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


def backbone_features(run: RunDir, base_dir: Path, encode: Callable[[np.ndarray], np.ndarray], uris: list[str],
                      chans: int, size, *, chunk: int = 4096) -> np.ndarray:
    """Features (N, D) of image ``uris`` under the frozen backbone of the model in ``base_dir`` (a model of the
    run, or a model folder elsewhere), cached in ``features/<its name>/``: the heads of a crt recipe (cRT, logit adjustment, tau-norm; every arm and candidate)
    train on these, so each costs seconds once the backbone has seen the images.

    The real train and val images are embedded once, all together (``real-<key>/``), and every list of real
    uris (an arm, a thinned headroom point, the val split) is served from them; other images (an image
    generator's candidates, the oracle's held-back images) are cached per uri list (``other-<key>-<hash>/``).
    ``key`` names the base's weights (path, size and mtime of its model folder's files), so a retrained base
    never reuses stale vectors. ``encode``: uint8 images (N x H x W x C) -> float32 features (N x D) of that base
    (``train.embed`` of its model, say). Each cache folder is written atomically and sealed (data/integrity.py), and
    checked before reuse: a damaged one is reported and recomputed.
    """
    from tailforge.data.atomic import atomic_dir
    from tailforge.data.images import load_images
    from tailforge.data.integrity import folder_ok
    from tailforge.data.manifest import read_manifest

    base = Path(base_dir).name
    root = run.root / "features" / base
    key = file_key(base_dir)

    def compute(folder: Path, want: list[str]) -> np.ndarray:
        f = folder / "features.npy"
        if f.is_file() and folder_ok(folder, f"features of '{base}'", run.root):
            arr = np.load(f)
            if len(arr) == len(want):
                return arr
        parts = [np.asarray(encode(load_images(want[s:s + chunk], run.root, chans, size)), np.float32)
                 for s in range(0, len(want), chunk)]
        arr = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        with atomic_dir(folder) as tmp:
            np.save(tmp / "features.npy", arr)
            (tmp / "uris.txt").write_text("\n".join(want) + "\n")
        return arr

    real = read_manifest(run.real)
    real = real[real["split"].isin(["train", "val"]) & (real["source"] == "real")]
    pos = {u: i for i, u in enumerate(real["uri"].tolist())}
    uris = [str(u) for u in uris]
    if uris and all(u in pos for u in uris):
        feats = compute(root / f"real-{key}", real["uri"].tolist())
        return feats[[pos[u] for u in uris]]
    return compute(root / f"other-{key}-{uri_hash(uris, run)}", uris)


def fit_input(x01, size: tuple[int, int], mean, std):
    """Float images in [0, 1] (N x 1|3 x H x W) -> 3 channels at ``size`` (h, w), normalised by ``mean``/``std``:
    the input of an ImageNet- or CLIP-pretrained encoder (grey images are repeated over the channels)."""
    import torch
    import torch.nn.functional as F

    x = x01
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


__all__ = ["file_key", "uri_hash", "cache_dir", "embed_cached", "backbone_features", "fit_input"]
