"""docs/architecture.md's examples run as written: its python blocks register a loss, a generator, a filter
rule and an embedder, and the stages use them on a tiny long-tailed digits run (plan, generate, filter,
train), as a newcomer who copied them would."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def doc_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.fixture
def registries():
    """The registries as they were before the examples added to them (other tests see no extra names)."""
    from tailforge.eval.filter.embedders import EMBEDDERS
    from tailforge.eval.filter.score import RULES
    from tailforge.gen import GENERATORS
    from tailforge.train.losses import LOSSES

    saved = [(r, dict(r)) for r in (LOSSES, GENERATORS, RULES, EMBEDDERS)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


def test_the_doc_has_one_short_example_per_extension_point():
    blocks = doc_blocks()
    assert len(blocks) == 4
    for block, name in zip(blocks, ('register("poly1")', 'GENERATORS["jitter"]', 'rule("low_margin")',
                                    'EMBEDDERS["pixels"]')):
        assert name in block
        assert len(block.strip().splitlines()) <= 25, "keep the examples short"


def test_the_examples_run_through_plan_generate_filter_and_train(digits_run_copy, registries, one_torch_thread):
    import torch

    from tailforge.data import read_manifest
    from tailforge.data.measure import ClassStats
    from tailforge.eval.filter import FilterConfig, filter_candidates
    from tailforge.gen import GenerateConfig, PlanConfig, generate, plan_run
    from tailforge.train import TrainConfig, build_loss, fit

    for block in doc_blocks():
        exec(compile(block, str(DOC), "exec"), {"__name__": "architecture_example"})
    run = digits_run_copy

    # the loss: per-sample values, above plain cross-entropy
    loss = build_loss(TrainConfig(loss="poly1"), ClassStats.load(run).counts["train"])
    logits, target = torch.randn(6, 10), torch.arange(6)
    values = loss(logits, target)
    assert values.shape == (6,) and bool((values >= torch.nn.functional.cross_entropy(
        logits, target, reduction="none")).all())

    # the generator: the plan's samples, as PNGs at the dataset's size, seeded per sample
    plan = plan_run(run, PlanConfig(budget=60))
    cands = generate(run, GenerateConfig(generator="jitter", shard_size=16))
    assert len(cands) == plan.total > 0 and set(cands["source"]) == {"jitter"}
    again = generate(run, GenerateConfig(generator="jitter", shard_size=16))  # finished shards are kept
    assert again["uri"].tolist() == cands["uri"].tolist()

    # the embedder and the rule: the filter runs with them and names the rule as a reason
    out = filter_candidates(run, FilterConfig(embedder="pixels", rules=["low_margin"]))
    margin = (out["score_fidelity"] - out["fidelity_threshold"]).to_numpy()
    assert out["accepted"].any() and (margin[out["accepted"].to_numpy()] >= 0.02).all()
    from tailforge.eval.filter import REASONS

    assert set(out["reason"]) <= set(REASONS) | {"low_margin"}
    ruled = (out["reason"] == "low_margin").to_numpy()
    assert ruled.any() and (margin[ruled] < 0.02).all()
    assert list(out["space"].unique()) == ["image:pixels"]

    # and a classifier trained with the loss on real + accepted synthetic images
    model = fit(run, TrainConfig(model="tiny", width=8, epochs=1, batch_size=128, lr=0.05, hflip=False,
                                 loss="poly1", synthetic="filtered", device="cpu"), "poly1")
    assert (model / "model.safetensors").exists()
    kept = read_manifest(run.filtered)
    assert int(kept["accepted"].sum()) == int(out["accepted"].sum())
    assert np.isfinite(out["score"]).all()


def test_unknown_names_are_one_line_errors_naming_the_registered_ones():
    from tailforge.data.errors import TailforgeError
    from tailforge.eval.filter import FilterConfig
    from tailforge.flows.cliutil import build

    with pytest.raises(TailforgeError, match=r"unknown embedder 'clp': did you mean 'clip'\? valid: classifier"):
        build(FilterConfig, {"embedder": "clp"})
    with pytest.raises(TailforgeError, match=r"unknown filter rule 'margin'"):
        build(FilterConfig, {"rules": ["margin"]})
