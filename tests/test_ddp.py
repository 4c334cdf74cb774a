"""DDP: index sharding, when torchrun is used, and two gloo processes on CPU training the digits run.

The end-to-end tests start real torchrun jobs (2 CPU processes, gloo). A ``sitecustomize`` put on the
workers' PYTHONPATH records, per rank, the shards ``tailforge.train.samplers.shard_indices`` hands out and every
atomic write, so the tests see what each rank did without any hook in the trainer.
NCCL on several real GPUs is not exercised here (no GPU on the test machine).
"""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from tailforge import train
from tailforge.data import RunDir, TailforgeError, load_images, read_manifest
from tailforge.train.ddp import ddp_nproc, launch_fit
from tailforge.train.samplers import SAMPLERS, epoch_indices, shard_indices

FAST = dict(model="tiny", width=8, epochs=8, batch_size=64, lr=0.05, hflip=False, device="cpu", nproc=2)

SITECUSTOMIZE = '''
import json, os
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("TF_TEST_TRACE"):
    import contextlib
    import tailforge.data.atomic as atomic
    import tailforge.train.samplers as samplers

    _trace = os.path.join(os.environ["TF_TEST_TRACE"], "rank%s.jsonl" % os.environ["RANK"])

    def _log(**rec):
        with open(_trace, "a") as fh:
            fh.write(json.dumps(dict(rank=int(os.environ["RANK"]), **rec)) + "\\n")

    _shard = samplers.shard_indices

    _calls = []

    def shard_indices(order, rank, world_size):
        _calls.append(1)
        if os.environ.get("TF_TEST_FAIL_RANK") == str(rank) and len(_calls) >= int(os.environ.get("TF_TEST_FAIL_CALL", 1)):
            raise RuntimeError("injected failure on rank %d" % rank)
        out = _shard(order, rank, world_size)
        _log(kind="shard", world=world_size, order=order.tolist(), shard=out.tolist())
        return out

    samplers.shard_indices = shard_indices

    def _wrap(cm):
        @contextlib.contextmanager
        def wrapped(path, *a, **kw):
            _log(kind="write", path=str(path))
            with cm(path, *a, **kw) as tmp:
                yield tmp
        return wrapped

    atomic.atomic_path = _wrap(atomic.atomic_path)
    atomic.atomic_dir = _wrap(atomic.atomic_dir)
'''


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def traced(tmp_path, monkeypatch):
    """Workers started from this test record their shards and writes under the returned folder."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("TF_TEST_TRACE", str(trace))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two workers on a shared 2-core machine

    def records(rank: int) -> list[dict]:
        p = trace / f"rank{rank}.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    return records


# ----------------------------------------------------------------------------- unit: sharding and the decision
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_shards_are_disjoint_equal_and_cover_the_global_order(sampler, world):
    labels = np.repeat(np.arange(4), [400, 100, 25, 9])
    order = epoch_indices(sampler, labels, seed=3, epoch=2)  # what every rank computes
    shards = [shard_indices(order, r, world) for r in range(world)]
    n = len(order) // world
    assert all(len(s) == n for s in shards)
    positions = [np.arange(r, n * world, world) for r in range(world)]  # disjoint positions of the order
    for s, pos in zip(shards, positions):
        np.testing.assert_array_equal(s, order[pos])
    assert sorted(np.concatenate(positions).tolist()) == list(range(n * world))
    if sampler == "instance":  # without replacement the shards hold disjoint samples
        assert len(set(np.concatenate(shards).tolist())) == n * world
    # batch s of b per rank, taken together, is the batch s of one process with batch size b * world
    b = 7
    together = np.stack([s[b:2 * b] for s in shards], axis=1).reshape(-1)
    assert sorted(together.tolist()) == sorted(order[b * world:2 * b * world].tolist())
    with pytest.raises(ValueError):
        shard_indices(order, world, world)


def test_nproc_decision(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = train.TrainConfig
    assert ddp_nproc(cfg()) == 1  # CPU only: in process
    assert ddp_nproc(cfg(device="cpu", nproc=3)) == 3  # forced gloo processes
    assert ddp_nproc(cfg(device="cpu", nproc=3, ddp="off")) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert ddp_nproc(cfg()) == 4  # auto: one process per visible GPU
    assert ddp_nproc(cfg(device="cuda:1")) == 1  # a pinned GPU trains in process
    assert ddp_nproc(cfg(device="cpu")) == 1
    assert ddp_nproc(cfg(nproc=2)) == 2
    with pytest.raises(TailforgeError, match="more DDP processes than the 4 visible"):
        ddp_nproc(cfg(nproc=5))
    with pytest.raises(TailforgeError, match="cannot be shared"):
        ddp_nproc(cfg(device="cuda:0", nproc=2))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert ddp_nproc(cfg()) == 1  # already inside torchrun: never nest
    # the DDP knobs are runtime settings: the same model whichever way it was trained
    assert cfg(nproc=2).identity() == cfg(ddp="off").identity()


# ----------------------------------------------------------------------------- end to end: 2 gloo processes
def test_two_cpu_processes_train_a_good_model_written_by_rank0_only(digits_run_copy, traced):
    run = digits_run_copy
    cfg = train.TrainConfig(**FAST, ema=0.5, sampler="class_balanced")
    events = []
    path = launch_fit(run, cfg, "ddp", progress=lambda d, t, i: events.append((d, t, i)))
    assert path == run.model_dir("ddp")

    # outputs: one complete model folder, nothing half-written or left over
    assert sorted(p.name for p in (run.root / "models").iterdir()) == ["ddp"]
    assert sorted(p.name for p in path.iterdir()) == [".integrity.json", "best.json", "config.json", "log.jsonl",
                                                      "model.safetensors", "tb"]
    assert len(list((path / "tb").iterdir())) == 1  # one event file: rank 0's
    log = [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, cfg.epochs + 1))
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    meta = json.loads((path / "config.json").read_text())["meta"]
    assert meta["ddp_world_size"] == 2 and meta["device"] == "cpu"
    # progress relayed from rank 0: one epoch event per epoch, steps counted globally
    epochs = [i for _, _, i in events if i.get("event") == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, cfg.epochs + 1))
    steps = sum(meta["train_counts"]) // 64  # global batch 64: 32 per process
    assert events[-1][:2] == (cfg.epochs * steps, cfg.epochs * steps)

    # rank 0 alone wrote (state every epoch, then the model folder); rank 1 wrote nothing
    r0, r1 = traced(0), traced(1)
    assert [w for w in r1 if w["kind"] == "write"] == []
    writes0 = [w["path"] for w in r0 if w["kind"] == "write"]
    assert sum(p.endswith("state.pt") for p in writes0) == cfg.epochs
    assert writes0.count(str(path)) == 1 and all(p.startswith(str(run.root / "models")) for p in writes0)

    # each epoch: the same global order on both ranks, disjoint equal halves of it
    s0 = [w for w in r0 if w["kind"] == "shard"]
    s1 = [w for w in r1 if w["kind"] == "shard"]
    assert len(s0) == len(s1) == cfg.epochs
    for a, b in zip(s0, s1):
        assert a["world"] == b["world"] == 2 and a["order"] == b["order"]
        assert len(a["shard"]) == len(b["shard"]) == len(a["order"]) // 2
        assert a["shard"] == a["order"][0::2][:len(a["shard"])] and b["shard"] == a["order"][1::2][:len(b["shard"])]
    assert s0[0]["order"] != s0[1]["order"]  # reseeded per epoch

    # the checkpoint loads and classifies the val split well above chance (0.1)
    model, meta = train.load_model(path)
    df = read_manifest(run.real)
    val = df[df["split"] == "val"]
    pred = train.predict_proba(model, meta, load_images(val["uri"], run.root, 1, (8, 8))).argmax(1)
    y = val["label"].to_numpy()
    bacc = np.mean([(pred[y == c] == c).mean() for c in np.unique(y)])
    best = json.loads((path / "best.json").read_text())
    assert bacc == pytest.approx(best["val_balanced_acc"], abs=1e-5)
    assert bacc > 0.4, bacc
    # finished: returned as is, without starting torchrun again
    n_before = len(traced(0))
    assert launch_fit(run, cfg, "ddp") == path and len(traced(0)) == n_before


def test_a_failing_worker_gives_one_clear_error(digits_run_copy, traced, monkeypatch):
    """Rank 1 dies with a bug: torchrun stops rank 0 (no hang), the caller gets one line naming the error."""
    monkeypatch.setenv("TF_TEST_FAIL_RANK", "1")
    run = digits_run_copy
    with pytest.raises(TailforgeError) as err:
        launch_fit(run, train.TrainConfig(**{**FAST, "epochs": 2}), "broken")
    msg = str(err.value)
    assert "\n" not in msg
    assert "DDP training of 'broken' failed in 2 processes" in msg
    assert "RuntimeError: injected failure on rank 1" in msg and "--ddp off" in msg
    assert not run.model_dir("broken").exists()


@pytest.mark.slow
def test_ddp_resume_equals_uninterrupted(digits_run_copy, traced, monkeypatch):
    """A job that died in epoch 3 (rank 1 failed) and then one stopped by the caller's Ctrl-C are resumed by
    the same call from rank 0's saved state and end with the weights and log of an uninterrupted DDP run."""
    run = digits_run_copy
    cfg = train.TrainConfig(**{**FAST, "epochs": 5, "ema": 0.9, "mixup": 0.2, "augment": "strong"})
    full = launch_fit(run, cfg, "full")

    monkeypatch.setenv("TF_TEST_FAIL_RANK", "1")
    monkeypatch.setenv("TF_TEST_FAIL_CALL", "3")  # rank 1 dies drawing epoch 3's shard: epochs 1-2 are saved
    with pytest.raises(TailforgeError, match="injected failure"):
        launch_fit(run, cfg, "cut")
    assert not run.model_dir("cut").exists()
    assert torch.load(run.root / "models" / ".work-cut" / "state.pt", weights_only=False)["state"]["epoch"] == 2
    monkeypatch.delenv("TF_TEST_FAIL_RANK")

    def ctrl_c(done, total, info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # torchrun and its workers are stopped, not left running
        launch_fit(run, cfg, "cut", progress=ctrl_c)
    epochs_run = []
    cut = launch_fit(run, cfg, "cut", progress=lambda d, t, i: epochs_run.append(i["epoch"]))
    assert all(e >= 3 for e in epochs_run)  # the saved epochs were not redone
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    drop = ("images_per_s", "time_s")
    la, lb = ([{k: v for k, v in json.loads(x).items() if k not in drop} for x in (p / "log.jsonl").read_text().splitlines()]
              for p in (full, cut))
    assert la == lb
