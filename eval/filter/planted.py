"""Planted candidates: real images with a known truth, to check a filter (tests, ``bench/filter_effect.py``).

Each candidate is a real image saved as a PNG under ``synthetic/planted/s0/`` with a manifest row whose
``kind`` column holds the truth: ``good`` (an image of its class), ``wrong_class`` (another class's image
under this label), ``near_copy`` (a train image of the class with pixel noise) or ``duplicate`` (a good
candidate again with faint noise). The filter never reads ``kind``; reports compare its decisions with it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tailforge.data import RunDir, save_png, write_manifest


class PlantedCandidates:
    """Collect planted candidates of one run, then ``write()`` them as the run's ``candidates.parquet``."""

    def __init__(self, run: RunDir, seed: int = 0):
        self.run, self.rng = run, np.random.default_rng(seed)
        self.class_names = run.dataset_info()["class_names"]
        self.folder = run.root / "synthetic" / "planted" / "s0"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def add(self, img: np.ndarray, label: int, kind: str, parent: str) -> None:
        sid = f"planted-{len(self.rows):06d}"
        save_png(img, self.folder / f"{sid}.png")
        self.rows.append(dict(sample_id=sid, uri=f"synthetic/planted/s0/{sid}.png", label=label,
                              class_name=self.class_names[label], split="train", source="ddpm",
                              generator="planted", seed=len(self.rows), prompt="", parent_id=parent, shard="s0",
                              kind=kind))

    def noisy(self, img: np.ndarray, amount: int) -> np.ndarray:
        """``img`` plus uniform integer noise in [-amount, amount] (seeded), clipped to uint8."""
        return np.clip(img.astype(int) + self.rng.integers(-amount, amount + 1, img.shape), 0, 255).astype(np.uint8)

    def write(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        write_manifest(df, self.run.candidates)
        return df
