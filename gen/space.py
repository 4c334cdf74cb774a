"""Will the planned samples fit on the disk? A rough size estimate against the free space, checked
before generation starts, so a long generation does not stop hours in with a full disk.

The estimate is deliberately generous: an image is counted at its raw size (height x width x
channels bytes; PNG usually compresses that) plus a per-file overhead for the PNG container and the
shard's rows, rounded up to the file system's block (a small PNG still takes a whole block); a
feature (``featdict``, ``featcov``) at 4 bytes x 2048 dimensions. It only warns: a generation
that does run out of space stops with ``disk full`` and resumes after space is freed.
"""
from __future__ import annotations

from tailforge.data.diskspace import block_size, free_bytes, human

PER_FILE = 600  # bytes: PNG header/chunks and the shard's table row
FEATURE_BYTES = 4 * 2048


def estimate_bytes(info: dict, generator: str, n: int, block: int = 4096) -> int:
    """Rough disk space ``n`` samples of ``generator`` take in a run folder of dataset ``info``; an image
    file takes at least one allocation ``block`` of the file system (a 100-byte PNG takes 4 KB)."""
    if generator in ("featdict", "featcov", "fdiff"):  # one features.npy per shard
        return n * FEATURE_BYTES
    h, w = (int(x) for x in info["image_size"])
    per_file = h * w * int(info["channels"]) + PER_FILE
    return n * (-(-per_file // block) * block)


def space_warning(run, generator: str, n: int) -> str | None:
    """A one-line warning when ``n`` samples of ``generator`` may not fit on ``run``'s disk, else None."""
    if n <= 0:
        return None
    need = estimate_bytes(run.dataset_info(), generator, n, block_size(run.root))
    free = free_bytes(run.root)
    if free is None or need <= free:
        return None
    return (f"low disk space: generating {n:,} {generator} samples needs about {human(need)}, but only "
            f"{human(free)} is free for {run.root}; free space (or move the run folder) before it fills up, "
            "or generation stops with 'disk full' (finished shards are kept)")
