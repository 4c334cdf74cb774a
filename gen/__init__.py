"""Generate: plan how much synthetic data each class gets, and make it three ways.

* ``plan(stats, PlanConfig) -> Plan`` / ``plan_run(run, cfg)`` (writes ``plan.json``)
* ``generate(run, GenerateConfig, progress=None, shard=None) -> DataFrame`` runs the plan's shards with
  ``GENERATORS[cfg.generator]`` and rewrites ``candidates.parquet``; work is handed out in units of about
  ``shard_size`` samples (``make_units``: many small class quotas per unit, a large quota split)
* generators: ``ddpm`` (in-domain class-conditional diffusion), ``featdict`` (feature-dictionary
  oversampling in a classifier's feature space), ``featcov`` (real tail anchors + borrowed head-class
  covariance, in feature space), ``fdiff`` (a class-conditional diffusion model over features),
  ``sd`` (Stable Diffusion), ``warp`` (smooth random deformation of real tail exemplars)
* ``FeatureDictOversampler``: the featdict algorithm on plain arrays (imbalanced-learn style)
* ``write_sample_grids(run, generator)``: one PNG per class, real exemplars above synthetic samples
"""
from __future__ import annotations

from .config import DDPMOptions, FDiffOptions, FeatCovOptions, FeatDictOptions, GenerateConfig, PlanConfig, SDOptions, WarpOptions
from .ddpm import DDPMGenerator
from .driver import GENERATORS, generate
from .featcov import FeatCovGenerator, FeatureCovOversampler
from .featdict import FeatDictGenerator, FeatureDictOversampler
from .fdiff import FDiffGenerator, FeatureDiffusion
from .grid import write_sample_grids
from .planner import ClassQuota, Plan, plan, plan_run
from .sd import SDGenerator
from .warp import WarpGenerator, warp_images
from .shards import Shard, Unit, collect_candidates, make_shards, make_units, parse_shard_spec, plan_units, sample_seed

__all__ = [
    "DDPMOptions", "FeatDictOptions", "GenerateConfig", "PlanConfig", "SDOptions", "ClassQuota", "Plan", "plan",
    "plan_run", "generate", "GENERATORS", "Shard", "Unit", "make_shards", "make_units", "plan_units", "parse_shard_spec", "sample_seed",
    "collect_candidates", "FeatureDictOversampler", "write_sample_grids", "DDPMGenerator", "FeatDictGenerator",
    "SDGenerator", "FeatCovOptions", "FeatCovGenerator", "FeatureCovOversampler", "FDiffOptions",
    "FDiffGenerator", "FeatureDiffusion", "WarpOptions", "WarpGenerator", "warp_images",
]
