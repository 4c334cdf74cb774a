"""Configuration of ``evaluate`` and ``compare`` (the filter stage keeps its own FilterConfig)."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class EvalConfig(BaseModel):
    """How to evaluate a trained model on one split of its run."""

    model_config = ConfigDict(extra="forbid")

    split: Literal["val", "test", "train"] = Field("test", description="split to evaluate (test for reported "
                                                    "numbers; val is what model selection used)")
    batch_size: int = Field(512, ge=1, description="prediction batch size")
    ece_bins: int = Field(15, ge=2, description="confidence bins of ECE and the reliability diagram")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda")
    plots: bool = Field(True, description="write confusion matrix, per-class accuracy and reliability PNGs")


class CompareConfig(BaseModel):
    """How to put several evaluated models side by side."""

    model_config = ConfigDict(extra="forbid")

    split: Literal["val", "test", "train"] = Field("test", description="which evaluation split to compare")
    baseline: Union[str, None] = Field(None, description="label of the baseline method (deltas are against it); "
                                       "default: the first")
    metrics: list[str] = Field(["top1", "balanced_acc", "many", "medium", "few", "macro_f1", "ece"],
                               description="metrics shown in the table")
    oracle: bool = Field(True, description="benchmark: train the `oracle` arm (the recipe on real + the long tail's "
                         "held-back real train images: a perfect generator) where the run made its long tail; the "
                         "report then leads with room = oracle - real-only and how much of it synthetic data captured")
    headroom: bool = Field(False, description="benchmark: estimate the room from the real train and val splits alone "
                           "(`tailforge headroom`: the recipe re-run with the topped-up classes thinned, its learning "
                           "curve extrapolated to the plan's quota); eval/headroom.json and a report section")
    headroom_fractions: list[float] = Field([0.5], description="headroom: fractions of the topped-up classes' "
                                            "real train images each learning-curve point keeps (each costs one "
                                            "recipe training; [0.5] with the scale fit was chosen on VAL across "
                                            "fifteen datasets: bench/results/room_study.md)")
    headroom_fit: Literal["power-span", "power", "log", "log-span", "scale", "quad"] = Field(
        "scale", description="headroom: the learning curve's model (tailforge.eval.room; chosen on VAL across fifteen "
        "datasets, leave one dataset out: bench/results/room_study.md)")
    headroom_signed: bool = Field(False, description="headroom, fits power and log: let the fitted exponent go below "
                                  "0 (a curve whose error rose with the data predicts a loss), so noise around a flat "
                                  "curve does not lean the estimate up (bench/results/room_study.md)")
    headroom_scale: float = Field(1.0, gt=0, description="headroom: the estimate's correction factor, fitted across "
                                  "datasets on VAL (bench/results/room_study.md; Mahmood et al. 2022)")
    headroom_spread: float = Field(4.85, ge=0, description="headroom: the interval's half-width in bootstrap "
                                   "standard errors, a split-conformal quantile fitted across datasets on VAL so the "
                                   "90 % interval covers the exact room (bench/results/room_study.md)")
    bootstrap: int = Field(1000, ge=100, description="paired bootstrap replicates (test images re-drawn within each "
                           "class) behind the report's intervals")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of the report's intervals: a difference is "
                              "'helped' or 'hurt' only when its interval excludes 0, else 'within noise'")

    @field_validator("headroom_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f < 1 for f in v):
            raise ValueError(f"headroom_fractions must be fractions strictly between 0 and 1, got {v}")
        return sorted(set(v), reverse=True)
