"""The ``generate`` driver: ``GENERATORS`` (name -> generator class) and ``generate``, which runs a plan's
shards with one of them. It sits above the generators (it imports them) and below the package face, so
no generator module imports upward to find the registry.

A new generator is one class implementing ``gen.base.Generator`` plus one entry,
``GENERATORS["name"] = MyGenerator`` (see docs/architecture.md).
"""
from __future__ import annotations

import pandas as pd

from tailforge.data import RunDir, unknown_name
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
from .shards import (Progress, clean_partial, collect_candidates, finished_folders, parse_shard_spec, plan_units,
                     quiet_hf, run_unit, unit_done, write_candidates)

GENERATORS: dict[str, type[Generator]] = {"ddpm": DDPMGenerator, "featdict": FeatDictGenerator,
                                          "featcov": FeatCovGenerator, "fdiff": FDiffGenerator, "sd": SDGenerator,
                                          "warp": WarpGenerator, "oracle": OracleGenerator}


def generate(run: RunDir | str, cfg: GenerateConfig | None = None, progress: Progress | None = None,
             shard: str | None = None) -> pd.DataFrame:
    """Run this worker's unfinished shards of the plan, then rewrite ``candidates.parquet``.

    ``shard="i/n"`` runs work units i, i+n, i+2n, ... (``gen.shards.make_units``: consecutive shards of
    about ``shard_size`` samples in all; independent workers, any machines sharing the run folder; the
    flow's tasks use the same units). Returns the full candidates table (all generators, all finished
    shards).
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    cfg = cfg or GenerateConfig()
    if cfg.generator not in GENERATORS:
        raise unknown_name("generator", cfg.generator, GENERATORS)
    worker, workers = parse_shard_spec(shard)
    info = run.dataset_info()
    plan = Plan.load(run)
    units = plan_units(plan, cfg.generator, cfg.shard_size)[worker::workers]
    gen_dir = run.synthetic(cfg.generator)
    clean_partial(gen_dir, units)
    there = finished_folders(gen_dir)  # one listing of the folder; unit_done checks each one's files
    todo = [u for u in units if not unit_done(gen_dir, u, there)]
    left = sum(u.size for u in todo)
    warn = space_warning(run, cfg.generator, left)  # early, not hours in
    if warn:
        report(warn)
    total = sum(u.size for u in units)
    done = total - left
    if progress:
        progress(done, total, {"stage": "generate", "generator": cfg.generator, "skipped_units": len(units) - len(todo)})
    if todo:
        quiet_hf()
        gen = GENERATORS[cfg.generator](run, cfg, info)
        gen.prepare(plan, progress=progress)
        for u in todo:
            def after(s, seconds, u=u):
                nonlocal done
                done += s.size
                if progress:
                    progress(done, total, {"stage": "generate", "generator": cfg.generator, "unit": u.id,
                                           "shard": s.id, "class": s.class_name, "seconds": round(seconds, 3)})

            run_unit(gen, u, gen_dir, after, there)
    df = collect_candidates(run, plan)
    write_candidates(run, df)
    return df
