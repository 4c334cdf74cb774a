"""sd generator with a tiny pipeline built from configs, saved with save_pretrained and loaded through
the user code path (--sd-model PATH): txt2img, img2img, determinism, and clear errors."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
from PIL import Image

from tailforge.data import TailforgeError, read_json, read_manifest
from tailforge.gen import GenerateConfig, PlanConfig, SDOptions, generate, plan_run


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from tailforge.gen.sd_build import save_pipeline

    return save_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def sd_cfg(folder, **kw) -> GenerateConfig:
    opts = dict(sd_model=str(folder), sd_steps=2, sd_size=32, sd_scheduler="ddim")
    opts.update(kw)
    return GenerateConfig(generator="sd", shard_size=4, batch_size=4, device="cpu", sd=SDOptions(**opts))


@pytest.fixture
def planned(digits_run_copy):
    plan_run(digits_run_copy, PlanConfig(classes=["8", "9"], target="fixed", count=17, overgen=1.0))
    return digits_run_copy


def test_txt2img_from_saved_folder_is_planned_sized_and_deterministic(planned, sd_folder):
    run = planned
    plan = read_json(run.plan)
    info = run.dataset_info()
    df = generate(run, sd_cfg(sd_folder))
    assert len(df) == plan["total"] == 6
    assert df.groupby("label").size().to_dict() == {c["label"]: c["generate"] for c in plan["classes"] if c["generate"]}
    assert (df["source"] == "sd").all() and (df["generator"] == "sd").all()
    assert all(name in prompt for name, prompt in zip(df["class_name"], df["prompt"]))
    for uri in df["uri"]:
        im = Image.open(run.root / uri)
        assert im.mode == "L" and im.size == (info["image_size"][1], info["image_size"][0])  # grey 8x8 digits
    before = {u: (run.root / u).read_bytes() for u in df["uri"]}
    shutil.rmtree(run.root / df["uri"].iloc[0].rsplit("/", 1)[0])
    again = generate(run, sd_cfg(sd_folder))
    assert {u: (run.root / u).read_bytes() for u in again["uri"]} == before


def test_img2img_records_parents_of_the_same_class(planned, sd_folder):
    run = planned
    df = generate(run, sd_cfg(sd_folder, sd_mode="img2img", sd_strength=0.5, sd_steps=4))
    assert len(df) == 6 and (df["source"] == "sd-img2img").all() and (df["strength"] == 0.5).all()
    real = read_manifest(run.real).set_index("sample_id")
    parents = real.loc[df["parent_id"]]
    assert (parents["label"].to_numpy() == df["label"].to_numpy()).all() and (parents["split"] == "train").all()
    assert pd.read_parquet(run.candidates)["parent_id"].notna().all()


def test_sd_errors_are_clear(planned, sd_folder, tmp_path, capsys):
    from tailforge.flows.cli import main

    run = planned
    with pytest.raises(TailforgeError, match=r"--sd-model PATH"):
        generate(run, GenerateConfig(generator="sd", device="cpu"))
    broken = tmp_path / "broken-sd"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(TailforgeError, match="lacks the 'vae' component"):
        generate(run, sd_cfg(broken))
    assert main(["generate", "--run", str(run.root), "--generator", "sd", "--sd-model", str(tmp_path / "nope")]) == 2
    assert main(["generate", "--run", str(run.root), "--generator", "sdx"]) == 2
    assert main(["generate", "--run", str(run.root), "--shard", "3/2"]) == 2
    err = capsys.readouterr().err
    assert "--sd-model PATH" in err and "unknown generator 'sdx'" in err and "shard spec '3/2'" in err
    assert "Traceback" not in err
    assert not run.candidates.exists() and not list((run.root / "synthetic").rglob("*.png"))
