"""The one interface every generator implements: plan shard in, candidate rows + files out."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tailforge.data import RunDir, save_png
from tailforge.data.images import to_array

from .config import GenerateConfig
from .planner import Plan
from .shards import Progress, Shard, base_row


class Generator:
    """Base class. ``prepare`` does the heavy once-per-process work (train / load a model);
    ``run_shard`` writes the shard's files into ``out_dir`` (a temp folder renamed into place when
    the shard is complete) and returns one row per sample, ``shard.size`` rows in index order."""

    name = ""
    source = ""

    def __init__(self, run: RunDir, cfg: GenerateConfig, info: dict):
        self.run, self.cfg, self.info = run, cfg, info
        self.channels = int(info["channels"])
        self.size = tuple(int(x) for x in info["image_size"])  # (h, w)

    def prepare(self, plan: Plan, progress: Progress | None = None) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def run_shard(self, shard: Shard, out_dir: Path) -> list[dict]:  # pragma: no cover - interface
        raise NotImplementedError

    # helpers shared by the image generators
    def uri(self, shard: Shard, filename: str) -> str:
        from .shards import shard_dir

        return f"synthetic/{self.name}/{shard_dir(shard)}/{filename}"

    def fit_to_dataset(self, img: np.ndarray) -> np.ndarray:
        """uint8 HxWxC at any size/channels -> the dataset's size and channels (antialiased, grey if grey)."""
        from PIL import Image

        if img.shape[:2] == self.size and img.shape[-1] == self.channels:
            return img
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        return to_array(pil, self.channels, self.size)

    def write_images(self, shard: Shard, images: np.ndarray, out_dir: Path, source: str | None = None,
                     extra: list[dict] | None = None) -> list[dict]:
        rows = []
        for k, (index, img) in enumerate(zip(shard.indices(), images)):
            name = f"{index:06d}.png"
            save_png(self.fit_to_dataset(img), out_dir / name)
            row = base_row(shard, index, self.cfg.seed, source or self.source, self.uri(shard, name))
            if extra:
                row.update(extra[k])
            rows.append(row)
        return rows
