"""Shared fixtures: small real datasets built into temporary run folders."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """scikit-learn digits, exponential long tail IF=10, measured: a ready run folder (read-only use)."""
    from tailforge.data import DataConfig, RunDir, build_manifest, measure_run

    run = RunDir(tmp_path_factory.mktemp("runs") / "digits-lt")
    build_manifest(DataConfig(dataset="digits", imbalance=10, seed=0), run)
    measure_run(run)
    return run


@pytest.fixture
def digits_run_copy(digits_run, tmp_path):
    """A private copy of ``digits_run`` that a test may write into."""
    import shutil

    dst = tmp_path / "digits-lt"
    shutil.copytree(digits_run.root, dst)
    from tailforge.data import RunDir

    return RunDir(dst)


@pytest.fixture(scope="session")
def fashion_available():
    if not (FASHION_DEBIAN / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    return FASHION_DEBIAN


def make_image_tree(root: Path, counts: dict[str, int], size=(24, 20), seed=0) -> Path:
    """Write a generated ROOT/<class>/<i>.png tree; each class has its own colour pattern."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(counts.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        base = np.array([(k * 67) % 256, (k * 131) % 256, (k * 29) % 256], dtype=np.int16)
        for i in range(n):
            noise = rng.integers(-30, 30, size=(*size, 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on the shared 2-core machine two threads run ~20x slower (they fight other jobs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
