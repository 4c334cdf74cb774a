"""bench/gpu_suite.py: its sections on CPU at toy size, and the whole `--device cpu --small` command (slow).

On a GPU the same code runs at full size (SD-1.5 at 512 px, ResNet-50 / ConvNeXt-T at 224 px, NCCL); no GPU
is available to the test machine, so those sizes are not exercised here.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_suite  # noqa: E402


def test_trainer_vs_plain_loop_timing_on_a_tiny_model(tmp_path, one_torch_thread):
    row = gpu_suite.bench_train_one("tiny", 16, 96, 32, 3, "cpu", tmp_path, width=4)
    assert row["timed_steps_per_epoch"] == 2 and len(row["trainer_epoch_s"]) == 3
    assert len(row["plain_epoch_s"]) == 4  # plain, trainer, plain
    assert row["trainer_images_per_s"] > 0 and row["plain_images_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["trainer_images_per_s"] / row["plain_images_per_s"], rel=0.01)


def test_ddpm_section_writes_json_and_markdown(tmp_path, one_torch_thread):
    assert gpu_suite.main(["--device", "cpu", "--small", "--only", "ddpm", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_cpu.json").read_text())
    d = res["sections"]["ddpm"]
    assert d["preset"] == "tiny" and d["train_steps_per_s"] > 0 and d["sample_images_per_s"] > 0
    md = (tmp_path / "gpu_cpu.md").read_text()
    assert "In-domain diffusion" in md and "| tiny | 32 |" in md


def test_full_size_on_cpu_and_unknown_sections_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--device", "cpu"])
    with pytest.raises(SystemExit):
        gpu_suite.main(["--device", "cpu", "--small", "--only", "sdx"])
    err = capsys.readouterr().err
    assert "needs a GPU: on CPU pass --small" in err and "unknown section(s) sdx" in err


@pytest.mark.slow
def test_small_cpu_suite_prints_and_writes_every_figure(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--device", "cpu", "--small",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_cpu.json").read_text())
    s = res["sections"]
    assert set(s) == {"sd", "train", "ddpm", "ddp"} and not any("error" in v for v in s.values())
    assert [r["mode"] for r in s["sd"]["rows"]] == ["txt2img", "img2img"]
    assert all(r["ratio"] > 0 and r["architecture"] == "tiny" for r in s["sd"]["rows"])
    (row,) = s["train"]["rows"]
    assert row["model"] == "resnet32" and row["pixels"] == 32 and row["batch"] == 128 and row["ratio"] > 0
    assert s["ddp"]["ok"] and s["ddp"]["backend"] == "gloo" and s["ddp"]["world_size"] == 1
    md = (tmp_path / "gpu_cpu.md").read_text()
    for head in ("Stable Diffusion", "Training throughput", "In-domain diffusion", "DDP smoke"):
        assert head in md
    for line in ("[sd] mode txt2img", "[train] model resnet32", "[ddpm] preset tiny", "[ddp] command"):
        assert line in proc.stdout
    assert "Traceback" not in proc.stderr
    assert secs < 240  # the bound is 2 minutes on an idle machine; this one is shared
