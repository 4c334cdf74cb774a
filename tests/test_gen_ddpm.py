"""ddpm generator on real digits with the tiny preset: counts, labels, size/mode, determinism,
shard resume, --shard i/n workers, interrupted shards and interrupted training."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tailforge.data import read_json
from tailforge.gen import DDPMOptions, GenerateConfig, PlanConfig, generate, plan_run, write_sample_grids
from tailforge.gen.shards import ROWS


def tiny_cfg(**kw) -> GenerateConfig:
    return GenerateConfig(generator="ddpm", shard_size=4, batch_size=8, device="cpu",
                          ddpm=DDPMOptions(ddpm_preset="tiny", ddpm_train_steps=12, ddpm_sample_steps=3,
                                           ddpm_checkpoint_every=5), **kw)


@pytest.fixture
def planned(digits_run_copy):
    run = digits_run_copy
    plan_run(run, PlanConfig(classes=["8", "9"], target="fixed", count=17, overgen=1.0))  # 8: 1 (16 real), 9: 5
    return run


def shard_bytes(run) -> dict[str, bytes]:
    return {str(p.relative_to(run.root)): p.read_bytes() for p in sorted(run.synthetic("ddpm").glob("c*/**/*.png"))}


def test_ddpm_generates_the_plan_at_dataset_size_and_resumes(planned):
    run = planned
    plan = read_json(run.plan)
    quota = {c["label"]: c["generate"] for c in plan["classes"]}
    info = run.dataset_info()
    df = generate(run, tiny_cfg())

    assert len(df) == plan["total"] == sum(quota.values()) > 0
    assert df.groupby("label").size().to_dict() == {k: v for k, v in quota.items() if v}
    assert (df["source"] == "ddpm").all() and (df["split"] == "train").all() and df["sample_id"].is_unique
    assert (df["class_name"] == df["label"].map(lambda i: info["class_names"][i])).all()
    for uri in df["uri"]:
        im = Image.open(run.root / uri)
        assert im.mode == "L" and im.size == (info["image_size"][1], info["image_size"][0])
    assert pd.read_parquet(run.candidates).equals(df)
    done = read_json(run.synthetic("ddpm") / "model" / "done.json")
    assert done["steps"] == 12 and not (run.synthetic("ddpm") / "model" / "state.pt").exists()
    # the model learned something: not constant images
    imgs = np.stack([np.asarray(Image.open(run.root / u)) for u in df["uri"]])
    assert imgs.std() > 5

    # re-run: every unit skipped, nothing rewritten, no training
    first = shard_bytes(run)
    mtimes = {p: p.stat().st_mtime_ns for p in run.synthetic("ddpm").glob("c*/" + ROWS)}
    seen = []
    df2 = generate(run, tiny_cfg(), progress=lambda d, t, i: seen.append(i))
    assert df2.equals(df)
    assert seen == [{"stage": "generate", "generator": "ddpm", "skipped_units": len(mtimes)}]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # same seed -> identical bytes: delete one shard and regenerate it
    victim = sorted(run.synthetic("ddpm").glob("c*"))[-1]
    import shutil

    shutil.rmtree(victim)
    generate(run, tiny_cfg())
    assert shard_bytes(run) == first

    # sample grids for the report
    paths = write_sample_grids(run, "ddpm")
    assert len(paths) == len([v for v in quota.values() if v]) and all(p.stat().st_size > 0 for p in paths)


def test_workers_split_shards_and_interrupted_shards_leave_nothing(planned, monkeypatch):
    from tailforge.gen.ddpm import DDPMGenerator

    run = planned
    gen_dir = run.synthetic("ddpm")
    generate(run, tiny_cfg(), shard="1/2")
    odd = sorted(p.name for p in gen_dir.glob("c*"))
    generate(run, tiny_cfg(), shard="0/2")
    all_ = sorted(p.name for p in gen_dir.glob("c*"))
    assert set(odd) < set(all_) and len(all_) == 3  # class 8: 1 sample (1 shard), class 9: 5 (2 shards)
    assert len(pd.read_parquet(run.candidates)) == read_json(run.plan)["total"]

    # Ctrl-C in the middle of a shard: a file is half written, then the interrupt hits
    import shutil

    shutil.rmtree(gen_dir / all_[0])
    real_run_shard = DDPMGenerator.run_shard

    def interrupted(self, shard, out_dir):
        real_run_shard(self, shard, out_dir)
        (out_dir / "partial.png").write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(DDPMGenerator, "run_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(run, tiny_cfg())
    assert not (gen_dir / all_[0]).exists()
    assert not list(gen_dir.glob(".tmp-*")) and not list(gen_dir.rglob("partial.png"))
    monkeypatch.setattr(DDPMGenerator, "run_shard", real_run_shard)
    killed = gen_dir / f".tmp-{all_[0]}-killed"  # what a SIGKILL mid-shard leaves behind
    killed.mkdir()
    (killed / "000000.png").write_bytes(b"half")
    df = generate(run, tiny_cfg())
    assert len(df) == read_json(run.plan)["total"] and not killed.exists()
    assert sorted(p.name for p in gen_dir.glob("c*")) == all_


def test_interrupted_training_resumes_to_the_same_model(planned, tmp_path):
    import shutil

    from safetensors.numpy import load_file

    from tailforge.data import RunDir

    other = RunDir(tmp_path / "other")
    shutil.copytree(planned.root, other.root)
    generate(planned, tiny_cfg())  # uninterrupted

    def stop_at_end(done, total, info):  # training reports progress at its last step (12), after the
        if info.get("stage") == "ddpm-train" and done == total:  # checkpoint of step 10
            raise KeyboardInterrupt

    cfg = tiny_cfg()
    with pytest.raises(KeyboardInterrupt):
        generate(other, cfg, progress=stop_at_end)
    state = other.synthetic("ddpm") / "model" / "state.pt"
    assert state.exists() and not (other.synthetic("ddpm") / "model" / "done.json").exists()
    generate(other, cfg)
    a = load_file(planned.synthetic("ddpm") / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(other.synthetic("ddpm") / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_parallel_shard_workers_train_the_model_once(planned, monkeypatch):
    """`--shard 0/2` and `--shard 1/2` started together: one trains, the other waits for its model."""
    import threading

    from tailforge.gen.ddpm import DDPMGenerator

    calls = []
    real_train = DDPMGenerator.train

    def counted(self, progress=None):
        calls.append(threading.get_ident())
        return real_train(self, progress)

    monkeypatch.setattr(DDPMGenerator, "train", counted)
    errors = []

    def worker(spec):
        try:
            generate(planned, tiny_cfg(), shard=spec)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"{i}/2",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    assert len(pd.read_parquet(planned.candidates)) == read_json(planned.plan)["total"]


def test_unknown_device_is_one_clear_error_before_any_work(planned):
    from tailforge.data import TailforgeError

    with pytest.raises(TailforgeError, match=r"unknown device 'banana'.*--device auto, cpu"):
        generate(planned, tiny_cfg().model_copy(update={"device": "banana"}))
    assert not planned.candidates.exists() and not planned.synthetic("ddpm").exists()


def test_cli_shard_worker_says_the_plan_is_not_finished(planned, capsys):
    from tailforge.flows.cli import main

    args = ["generate", "--run", str(planned.root), "--device", "cpu", "--shard-size", "4", "--batch-size", "8",
            "--ddpm-preset", "tiny", "--ddpm-train-steps", "12", "--ddpm-sample-steps", "3", "--no-grids"]
    assert main(args + ["--shard", "0/2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    n = len(pd.read_parquet(planned.candidates))
    assert 0 < n < 6 and f"{n} of the plan's 6 ddpm samples are finished" in out and "before `tailforge filter`" in out
    assert main(args + ["--shard", "1/2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert len(pd.read_parquet(planned.candidates)) == 6 and "note:" not in out


def test_a_preset_refuses_images_larger_than_it_was_sized_for(digits_run_copy):
    """'fast' draws noise at 28 px: it refuses with the way out, before any training."""
    from tailforge.gen.ddpm import DDPMGenerator
    from tailforge.gen import GenerateConfig
    from tailforge.data import TailforgeError

    info = {**digits_run_copy.dataset_info(), "image_size": [28, 28]}
    g = DDPMGenerator(digits_run_copy, GenerateConfig(generator="ddpm"), info)
    with pytest.raises(TailforgeError, match="sized for images up to 16 px.*28 px") as e:
        g.prepare(None)
    assert "featcov" in e.value.hint and "--ddpm-preset full" in e.value.hint
    assert not (digits_run_copy.synthetic("ddpm") / "model" / "state.pt").exists()
    DDPMGenerator(digits_run_copy, GenerateConfig(generator="ddpm"), digits_run_copy.dataset_info()).check_size()
