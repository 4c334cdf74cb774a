"""The ``generate`` driver: ``GENERATORS`` (name -> generator class) and ``generate``, which runs a plan's
shards with one of them. It sits above the generators (it imports them) and below the package face, so
no generator module imports upward to find the registry.

A new generator is one class implementing ``gen.base.Generator`` plus one entry,
``GENERATORS["name"] = MyGenerator`` (see docs/architecture.md).
"""
from __future__ import annotations

import time

import pandas as pd

from tailforge.data import RunDir, atomic_dir, unknown_name
from tailforge.data.integrity import report

from .base import Generator
from .config import GenerateConfig
from .ddpm import DDPMGenerator
from .featcov import FeatCovGenerator
from .featdict import FeatDictGenerator
from .fdiff import FDiffGenerator
from .oracle import OracleGenerator
from .planner import Plan
from .sd import SDGenerator
from .space import space_warning
from .warp import WarpGenerator
from .shards import (ROWS, Progress, clean_partial, collect_candidates, make_shards, parse_shard_spec, quiet_hf,
                     rows_frame, shard_done, write_candidates)

GENERATORS: dict[str, type[Generator]] = {"ddpm": DDPMGenerator, "featdict": FeatDictGenerator,
                                          "featcov": FeatCovGenerator, "fdiff": FDiffGenerator, "sd": SDGenerator,
                                          "warp": WarpGenerator, "oracle": OracleGenerator}


def generate(run: RunDir | str, cfg: GenerateConfig | None = None, progress: Progress | None = None,
             shard: str | None = None) -> pd.DataFrame:
    """Run this worker's unfinished shards of the plan, then rewrite ``candidates.parquet``.

    ``shard="i/n"`` runs shards i, i+n, i+2n, ... (independent workers, any machines sharing the
    run folder). Returns the full candidates table (all generators, all finished shards).
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    cfg = cfg or GenerateConfig()
    if cfg.generator not in GENERATORS:
        raise unknown_name("generator", cfg.generator, GENERATORS)
    worker, workers = parse_shard_spec(shard)
    info = run.dataset_info()
    plan = Plan.load(run)
    shards = make_shards(plan, cfg.generator, cfg.shard_size)[worker::workers]
    gen_dir = run.synthetic(cfg.generator)
    clean_partial(gen_dir, shards)
    todo = [s for s in shards if not shard_done(gen_dir / s.id)]
    warn = space_warning(run, cfg.generator, sum(s.size for s in todo))  # early, not hours in
    if warn:
        report(warn)
    total = sum(s.size for s in shards)
    done = total - sum(s.size for s in todo)
    if progress:
        progress(done, total, {"stage": "generate", "generator": cfg.generator, "skipped_shards": len(shards) - len(todo)})
    if todo:
        quiet_hf()
        gen = GENERATORS[cfg.generator](run, cfg, info)
        gen.prepare(plan, progress=progress)
        for s in todo:
            t0 = time.perf_counter()
            with atomic_dir(gen_dir / s.id) as tmp:
                rows = rows_frame(gen.run_shard(s, tmp))
                if len(rows) != s.size:  # a generator bug, not a user error
                    raise RuntimeError(f"{cfg.generator} produced {len(rows)} rows for shard {s.id} of size {s.size}")
                rows.to_parquet(tmp / ROWS, index=False)
            done += s.size
            if progress:
                progress(done, total, {"stage": "generate", "generator": cfg.generator, "shard": s.id,
                                       "class": s.class_name, "seconds": round(time.perf_counter() - t0, 3)})
    df = collect_candidates(run, plan)
    write_candidates(run, df)
    return df
