"""``oracle``: the long tail's own held-back REAL train images, as a generator: a perfect one.

The best a generator can do is draw new images from each class's true distribution. Where tailforge
made the long tail itself (Fashion-MNIST, CIFAR, digits, mini-ImageNet, image folders with a profile
other than ``none``), those images exist: the train images of each class that the construction dropped
(``tailforge.data.heldout``). This source hands them out in a seeded order, through the same plan,
shards, filter, recipe and budget as any generator, so the benchmark's ``oracle`` arm is the product's
own rebalanced path fed with perfect data. ``room = oracle - real-only`` is what synthetic data could at
most add to the recipe at its budget, and ``captured = (rebalanced - real-only) / room`` says how much of
it a generator took.

Rows point at the real files (or ``data/<split>.npy#row``); nothing is copied or modified. A class whose
pool is smaller than its quota gets every pool image once, then repeats (``parent_id`` names the real
image): the filter's duplicate rule rejects the repeats, as it would any generator's copies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tailforge.data import TailforgeError
from tailforge.data.heldout import heldout_pool, heldout_reason

from .base import Generator
from .planner import Plan
from .shards import Progress, Shard, base_row


class OracleGenerator(Generator):
    name = "oracle"
    source = "oracle"

    def prepare(self, plan: Plan, progress: Progress | None = None) -> None:
        why = heldout_reason(self.run)
        if why:
            raise TailforgeError(f"generator 'oracle' has no images to draw: {why}",
                                 "use another generator, or a dataset whose long tail tailforge makes")
        pool = heldout_pool(self.run)
        self.pool = {int(c): g.reset_index(drop=True) for c, g in pool.groupby("label")}
        # one seeded order per class: shard (class, [start, stop)) takes positions start..stop-1 of it
        self.order = {c: np.random.default_rng([self.cfg.seed, c, 7]).permutation(len(g))
                      for c, g in self.pool.items()}

    def run_shard(self, shard: Shard, out_dir: Path) -> list[dict]:
        g = self.pool.get(shard.label)
        if g is None or g.empty:
            raise TailforgeError(f"class '{shard.class_name}' has no held-back real images for the oracle",
                                 "plan no samples for it, or turn the oracle arm off (--set compare.oracle=false)")
        order = self.order[shard.label]
        rows = []
        for index in shard.indices():
            r = g.iloc[int(order[index % len(order)])]
            row = base_row(shard, index, self.cfg.seed, self.source, r["uri"])
            row["parent_id"] = r["parent_id"]
            rows.append(row)
        return rows

    def pool_sizes(self) -> dict[int, int]:
        return {c: len(g) for c, g in self.pool.items()}
