"""Filter throughput: candidates scored per second, faiss vs a NumPy brute-force baseline, side by side.

The same scoring core (``tailforge.eval.filter.score.score_arrays``: calibration, kNN class consistency,
fidelity, near-copy, duplicates, quota) runs twice on the same data, once with the faiss backend and
once with blocked NumPy matrix products + ``argpartition``; decisions are checked to agree and the
ratio of candidates scored per second is printed and written to bench/results/filter_throughput.json.

Data: synthetic clustered unit vectors (default 100k real x 50k candidates x 512-d, 100 classes),
since throughput does not depend on what the vectors show.

    nice python bench/filter_throughput.py [--real 100000 --cand 50000 --dim 512]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# Threads are fixed before numpy/faiss load, the same for both backends (``--threads``, default 1):
# a shared machine's oversubscribed OpenMP spin-waits otherwise decide the result, not the method.
_threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tailforge.eval.filter import FilterConfig  # noqa: E402
from tailforge.eval.filter.index import FaissSearch, NumpySearch, faiss_gpus, l2_normalize  # noqa: E402
from tailforge.eval.filter.score import score_arrays  # noqa: E402


def make_data(n_real: int, n_cand: int, dim: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(classes, dim)))
    y = rng.integers(0, classes, n_real)
    real = l2_normalize(centres[y] + 0.8 * rng.normal(size=(n_real, dim)).astype(np.float32) / np.sqrt(dim))
    yc = rng.integers(0, classes, n_cand)
    cand = l2_normalize(centres[yc] + 0.8 * rng.normal(size=(n_cand, dim)).astype(np.float32) / np.sqrt(dim))
    return real, y, cand, yc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", type=int, default=100_000)
    ap.add_argument("--cand", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of faiss and of NumPy's BLAS")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "filter_throughput.json"))
    args = ap.parse_args()
    real, y, cand, yc = make_data(args.real, args.cand, args.dim, args.classes)
    quotas = {c: args.cand // args.classes // 2 for c in range(args.classes)}
    cfg = FilterConfig(calibration_samples=5000)
    rows = {}
    for name, search in (("faiss", FaissSearch(ivf_threshold=10**9, threads=args.threads)), ("numpy", NumpySearch())):
        t = time.perf_counter()
        frame, _ = score_arrays(real, y, cand, yc, quotas, cfg, search=search)
        dt = time.perf_counter() - t
        rows[name] = dict(seconds=round(dt, 2), candidates_per_s=round(args.cand / dt, 1), backend=search.name,
                          accepted=int(frame["accepted"].sum()))
        rows[name]["_reasons"] = frame["reason"].to_numpy()
        print(f"{name:6s} {dt:8.2f} s  {args.cand / dt:10.1f} candidates/s  accepted {rows[name]['accepted']}",
              flush=True)
    agree = float((rows["faiss"].pop("_reasons") == rows["numpy"].pop("_reasons")).mean())
    ratio = rows["numpy"]["seconds"] / rows["faiss"]["seconds"]
    print(f"speed-up faiss / numpy brute force: {ratio:.2f}x; decisions agree on {100 * agree:.2f}% of candidates")
    result = dict(real=args.real, candidates=args.cand, dim=args.dim, classes=args.classes, results=rows,
                  ratio=round(ratio, 3), agreement=agree, faiss_gpus=faiss_gpus(), cpu_count=os.cpu_count(),
                  threads=args.threads, machine=platform.processor() or platform.machine(),
                  note="exact IndexFlatIP on CPU vs NumPy blocked matmul+argpartition; same scoring core")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
