"""bench/readme_numbers.py renders README's default-run block from a run folder's eval JSONs (fake ones here:
the real run takes minutes and is the script's own job)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "bench" / "readme_numbers.py")
rn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rn)

GROUPS = ["many"] + ["medium"] * 7 + ["few"] * 2


def fake_eval(run: Path, model: str, top1: float, bal: float, few: float | None, split: str = "test", **train):
    (run / "eval").mkdir(parents=True, exist_ok=True)
    doc = {"model": model, "split": split, "dataset": "digits", "n": 266, "top1": top1, "balanced_acc": bal,
           "few": few, "groups": GROUPS, "class_names": [str(i) for i in range(10)], "support": [26, 27] * 5,
           "train": {"loss": "ce", "sampler": "instance", "synthetic": "none", **train}}
    (run / "eval" / f"{model}-{split}.json").write_text(json.dumps(doc))


@pytest.fixture
def fake_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "digits", "imbalance": 10},
                                                     "generate": {"generator": "ddpm"},
                                                     "evaluate": {"split": "test"},
                                                     "baseline": "baseline", "rebalanced": "rebalanced"}))
    # written out of order, with a model of another name and a val split that must be left out
    fake_eval(run, "rebalanced", 0.9962, 0.99631, 1.0, synthetic="filtered")
    fake_eval(run, "baseline", 0.95864, 0.9594, 0.7953)
    fake_eval(run, "real-only", 0.97, 0.9712, 0.9, loss="balanced_softmax")
    fake_eval(run, "a-teacher", 0.5, 0.4, None, sampler="class_balanced", stage="crt", base="baseline")
    fake_eval(run, "baseline", 0.1, 0.1, 0.1, split="val")
    (run / "eval" / "report.json").write_text("[]")  # not a metrics file
    pd.DataFrame({"accepted": [True] * 3 + [False] * 3, "reason": ["", "", "", "over_quota", "over_quota",
                                                                  "wrong_class"],
                  "generator": ["ddpm"] * 6}).to_parquet(run / "filtered.parquet")
    return run


def test_table_rows_in_arm_order_then_by_name_with_three_decimals(fake_run):
    evals = rn.load_evals(fake_run)
    assert [e["model"] for e in evals] == ["baseline", "real-only", "rebalanced", "a-teacher"]
    assert rn.render_table(evals, "ddpm").splitlines() == [
        "| model | top-1 | balanced accuracy | few-shot accuracy (classes 8, 9) |",
        "|---|---:|---:|---:|",
        "| baseline (real only) | 0.959 | 0.959 | 0.795 |",
        "| real-only (real only, balanced_softmax) | 0.970 | 0.971 | 0.900 |",
        "| rebalanced (real + accepted ddpm) | 0.996 | 0.996 | 1.000 |",
        "| a-teacher (real only, class_balanced sampler, cRT on baseline) | 0.500 | 0.400 | – |",
    ]


def test_block_names_machine_date_and_times_and_replaces_only_the_marked_text(fake_run):
    block = rn.render_block(rn.load_evals(fake_run), fake_run, "2 cores, Some CPU, no GPU", "2030-01-02", 71.4, 9.6)
    lines = block.splitlines()
    assert lines[0] == rn.START and lines[-1] == rn.END
    text = " ".join(lines[1:lines.index("")])
    assert ("measured by `make readme-numbers` (2030-01-02; 2 cores, Some CPU, no GPU): 71 s for the flow; "
            "a re-run is served from the run folder in 10 s.") in text
    assert "Filter: 3 of 6 `ddpm` candidates kept; rejected 2 `over_quota`, 1 `wrong_class`." in text
    assert text.endswith("Test split of digits-LT (IF = 10; 266 images, balanced):")
    assert all(len(line) <= 100 for line in lines)

    readme = f"# title\n\nbefore\n{rn.START}\nold numbers\n| a | b |\n{rn.END}\n\nafter\n"
    new = rn.replace_block(readme, block)
    assert new.startswith("# title\n\nbefore\n" + block) and new.endswith(block + "\n\nafter\n")
    assert rn.replace_block(new, block) == new  # idempotent
    with pytest.raises(rn.Problem, match="exactly one"):
        rn.replace_block("no markers here", block)
    untimed = rn.render_block(rn.load_evals(fake_run), fake_run, "m", "d", None, None)
    assert "wall time not measured" in " ".join(untimed.splitlines())


def test_the_readme_has_one_marked_block_and_main_rewrites_a_copy(fake_run, tmp_path, capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(rn.START) == 1 and readme.count(rn.END) == 1
    copy = tmp_path / "README.md"
    copy.write_text(readme, encoding="utf-8")
    assert rn.main(["--run", str(fake_run), "--reuse", "--readme", str(copy)]) == 0
    out = copy.read_text(encoding="utf-8")
    assert "| real-only (real only, balanced_softmax) | 0.970 | 0.971 | 0.900 |" in out
    assert out.split(rn.START)[0] == readme.split(rn.START)[0] and out.split(rn.END)[1] == readme.split(rn.END)[1]
    capsys.readouterr()
    # bad input: one line with its fix, no traceback
    assert rn.main(["--run", str(tmp_path / "nothing"), "--reuse", "--print"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("readme-numbers: error:") and "holds no metrics" in err and "Traceback" not in err
    assert rn.main(["--run", str(fake_run), "--readme", str(copy)]) == 2  # a used run folder is not timed
    assert "is not empty" in capsys.readouterr().err
