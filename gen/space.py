"""Will the planned samples fit on the disk? A rough size estimate against the free space, checked
before generation starts, so a long generation does not stop hours in with a full disk.

The estimate is deliberately generous: an image is counted at its raw size (height x width x
channels bytes; PNG usually compresses that), plus a per-file overhead for the PNG container and
the shard's rows; a feature (``featdict``) at 4 bytes x 2048 dimensions. It only warns: a generation
that does run out of space stops with ``disk full`` and resumes after space is freed.
"""
from __future__ import annotations

from tailforge.data.diskspace import free_bytes, human

PER_FILE = 600  # bytes: PNG header/chunks, the file system's block rounding, the shard's table row
FEATURE_BYTES = 4 * 2048


def estimate_bytes(info: dict, generator: str, n: int) -> int:
    """Rough bytes ``n`` samples of ``generator`` take in a run folder of dataset ``info``."""
    if generator in ("featdict", "featcov"):
        return n * FEATURE_BYTES
    h, w = (int(x) for x in info["image_size"])
    return n * (h * w * int(info["channels"]) + PER_FILE)


def space_warning(run, generator: str, n: int) -> str | None:
    """A one-line warning when ``n`` samples of ``generator`` may not fit on ``run``'s disk, else None."""
    if n <= 0:
        return None
    need = estimate_bytes(run.dataset_info(), generator, n)
    free = free_bytes(run.root)
    if free is None or need <= free:
        return None
    return (f"low disk space: generating {n:,} {generator} samples needs about {human(need)}, but only "
            f"{human(free)} is free for {run.root}; free space (or move the run folder) before it fills up, "
            "or generation stops with 'disk full' (finished shards are kept)")
