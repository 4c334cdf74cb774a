"""Configuration of ``evaluate`` and ``compare`` (the filter stage keeps its own FilterConfig)."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


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
