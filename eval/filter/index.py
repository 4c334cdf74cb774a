"""Similarity search for the filter: faiss inner-product indexes over L2-normalised vectors.

Two operations are all the filter needs, so both backends (faiss, and the NumPy brute force used
as the benchmark baseline) provide exactly these:

- ``knn(base, queries, k) -> (sims, ids)``: the k most similar base rows per query, best first.
- ``pairs_above(x, threshold) -> (i, j)``: all pairs i != j of rows of ``x`` with cosine > threshold.

Exact search (``IndexFlatIP``) by default; an IVF index (``IndexIVFFlat``, inner product) once the
base has more than ``ivf_threshold`` rows; the index moves to the GPU when faiss was built with GPU
support and sees one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32, C-contiguous."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@dataclass
class FaissSearch:
    """faiss backend. ``ivf_threshold``: base size from which IVF replaces exact search."""

    ivf_threshold: int = 200_000
    nprobe: int = 16
    use_gpu: bool = True
    seed: int = 0
    threads: int | None = None  # faiss OpenMP threads (None: faiss's default, all cores)

    def __post_init__(self):
        if self.threads:
            import faiss

            faiss.omp_set_num_threads(self.threads)

    @property
    def name(self) -> str:
        return "faiss-gpu" if self._gpu() else "faiss-cpu"

    def _gpu(self) -> bool:
        return self.use_gpu and faiss_gpus() > 0

    def index(self, base: np.ndarray):
        """An inner-product index holding ``base`` (flat, or IVF past the threshold)."""
        import faiss

        n, d = base.shape
        if n > self.ivf_threshold:
            nlist = int(min(4 * np.sqrt(n), n // 39))  # faiss wants >= 39 training points per list
            quant = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quant, d, max(nlist, 1), faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(self.seed)
            train = base[rng.choice(n, size=min(n, 256 * nlist), replace=False)]
            index.train(train)
            index.nprobe = self.nprobe
        else:
            index = faiss.IndexFlatIP(d)
        if self._gpu():  # pragma: no cover - needs faiss-gpu
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(base)
        return index

    def knn(self, base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(base))
        sims, ids = self.index(base).search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims, ids

    def pairs_above(self, x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Exact range search on the CPU (faiss GPU indexes have no range search)."""
        import faiss

        if len(x) < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        lims, _, ids = index.range_search(x, float(threshold))
        rows = np.repeat(np.arange(len(x)), np.diff(lims.astype(np.int64)))
        keep = rows != ids
        return rows[keep], ids[keep].astype(np.int64)


@dataclass
class NumpySearch:
    """Brute force with NumPy: blocked matrix products and ``argpartition`` (the baseline)."""

    block: int = 2048
    name: str = "numpy"

    def knn(self, base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(base))
        sims = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        for s in range(0, len(queries), self.block):
            sim = queries[s:s + self.block] @ base.T
            part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(sim, part, axis=1)
            order = np.argsort(-top, axis=1, kind="stable")
            ids[s:s + self.block] = np.take_along_axis(part, order, axis=1)
            sims[s:s + self.block] = np.take_along_axis(top, order, axis=1)
        return sims, ids

    def pairs_above(self, x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = [], []
        for s in range(0, len(x), self.block):
            sim = x[s:s + self.block] @ x.T
            r, c = np.nonzero(sim > threshold)
            r = r + s
            keep = r != c
            rows.append(r[keep])
            cols.append(c[keep])
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)
