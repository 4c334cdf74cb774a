"""Outputs you can trust (issue 17): records of what a stage wrote, damage detected and redone, damaged
checkpoints as one-line errors; a full disk as one line; one run per folder (held and stale locks).

Everything on tiny digits data; the end-to-end flow check (truncated checkpoint and PNG, then a rerun
with the same numbers) is marked slow.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tailforge import train
from tailforge.data import RunDir, TailforgeError, atomic_dir, atomic_path, integrity
from tailforge.data.diskspace import DiskFull, is_disk_full
from tailforge.data.lock import LOCK, RunLocked, run_lock
from tailforge.flows.cli import main
from tailforge.flows.tasks import is_done, mark_done, stamp_path  # imports Prefect, which sets up logging: here,
# not inside a test, where it would replace pytest's log capture handler
from tailforge.gen import DDPMOptions, GenerateConfig, PlanConfig, generate, plan_run
from tailforge.gen.shards import ROWS, shard_done

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(model="tiny", width=8, epochs=1, batch_size=128, lr=0.05, hflip=False, eval_batch_size=512)


def one_line(text: str) -> bool:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in text


# --------------------------------------------------------------------------- records and checks

def test_record_and_check_find_truncation_and_changed_bytes(tmp_path, monkeypatch):
    a, b = tmp_path / "a.bin", tmp_path / "sub" / "b.parquet"
    b.parent.mkdir()
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"y" * 50)
    rec = integrity.record(tmp_path, [a, b.parent])
    assert set(rec) == {"a.bin", "sub/b.parquet"} and rec["a.bin"]["size"] == 1000
    assert integrity.check(tmp_path, rec) == []

    # a copy of the folder (new mtimes, same bytes) is still trusted
    shutil.copytree(tmp_path, tmp_path.parent / "copy")
    assert integrity.check(tmp_path.parent / "copy", rec) == []

    a.write_bytes(b"x" * 400)  # truncated
    b.write_bytes(b"z" * 50)  # same size, other bytes
    damage = {d.path: d for d in integrity.check(tmp_path, rec)}
    assert damage["a.bin"].describe() == "a.bin (size 400, recorded 1000)"
    assert damage["sub/b.parquet"].reason == "content"
    b.unlink()
    assert integrity.check(tmp_path, rec)[1].describe() == "sub/b.parquet (missing, recorded size 50)"

    monkeypatch.setenv("TAILFORGE_VERIFY", "off")
    assert integrity.check(tmp_path, rec) == []


def test_sealed_folder_checks_sizes_and_hashes_its_tables(tmp_path, monkeypatch):
    with atomic_dir(tmp_path / "shard") as d:
        (d / "000000.png").write_bytes(b"p" * 300)
        (d / ROWS).write_bytes(b"r" * 80)
    folder = tmp_path / "shard"
    assert json.loads((folder / integrity.RECORD).read_text())["files"]["000000.png"]["size"] == 300
    assert integrity.check_folder(folder) == []
    # same size, same mtime, other bytes: a table is hashed in the default mode, an image only in full mode
    st = (folder / "000000.png").stat()
    (folder / "000000.png").write_bytes(b"q" * 300)
    os.utime(folder / "000000.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert integrity.check_folder(folder) == []
    monkeypatch.setenv("TAILFORGE_VERIFY", "full")
    assert [d.reason for d in integrity.check_folder(folder)] == ["content"]
    monkeypatch.delenv("TAILFORGE_VERIFY")
    st = (folder / ROWS).stat()
    (folder / ROWS).write_bytes(b"s" * 80)
    os.utime(folder / ROWS, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [d.path for d in integrity.check_folder(folder, show_root=tmp_path)] == [f"shard/{ROWS}"]
    # a folder written before records existed is trusted as it was
    (folder / integrity.RECORD).unlink()
    assert integrity.check_folder(folder) is None


def warnings_of(caplog) -> list[str]:
    """The ``tailforge`` logger's warning lines (the CLI prints them as ``warning: ...``)."""
    lines = [r.getMessage() for r in caplog.records if r.name == "tailforge" and r.levelname == "WARNING"]
    caplog.clear()
    return lines


def test_stage_stamp_records_outputs_and_redoes_a_damaged_stage(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    out = run.root / "candidates.parquet"
    pd.DataFrame({"x": range(100)}).to_parquet(out)
    assert not is_done(run, "candidates", "k1", [out])
    mark_done(run, "candidates", "k1", rows=100)
    stamp = json.loads(stamp_path(run, "candidates").read_text())
    assert stamp["rows"] == 100 and stamp["files"]["candidates.parquet"]["size"] == out.stat().st_size
    assert is_done(run, "candidates", "k1", [out])
    assert not is_done(run, "candidates", "k2", [out])  # other settings: redone, not "damaged"
    assert warnings_of(caplog) == []

    size = out.stat().st_size
    with open(out, "r+b") as fh:  # a truncated parquet table
        fh.truncate(size // 2)
    assert not is_done(run, "candidates", "k1", [out])
    assert warnings_of(caplog) == [f"damaged: candidates.parquet (size {size // 2}, recorded {size}); "
                                   "redoing candidates"]
    assert not out.exists()  # removed: the stage rewrites it (and cannot skip work because it exists)


def test_downstream_keys_follow_upstream_files(tmp_path):
    """A redone stage rewrites its files; the keys of the stages after it hold those files' size and
    mtime, so they are redone too (evaluate after train, train after filter, compare after evaluate)."""
    import inspect

    from tailforge.flows import tasks

    assert "_file_key(weights)" in inspect.getsource(tasks.evaluate_task)
    assert "_file_key(r.filtered)" in inspect.getsource(tasks.train_task)
    assert "_file_key(r.candidates)" in inspect.getsource(tasks.filter_task)
    assert "_file_key(r.eval_dir" in inspect.getsource(tasks.compare_task)
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"1" * 10)
    before = tasks._file_key(p)
    time.sleep(0.01)
    p.write_bytes(b"1" * 10)  # rewritten, same bytes
    assert tasks._file_key(p) != before


# --------------------------------------------------------------------------- damaged shards and checkpoints

def tiny_ddpm() -> GenerateConfig:
    return GenerateConfig(generator="ddpm", shard_size=4, batch_size=8, device="cpu",
                          ddpm=DDPMOptions(ddpm_preset="tiny", ddpm_train_steps=6, ddpm_sample_steps=2))


def test_a_truncated_png_redoes_its_shard_only(digits_run_copy, caplog):
    run = digits_run_copy
    plan_run(run, PlanConfig(classes=["8", "9"], target="fixed", count=17, overgen=1.0))
    df = generate(run, tiny_ddpm())
    shards = sorted(run.synthetic("ddpm").glob("c*/" + ROWS))
    assert len(shards) >= 2
    victim = run.root / df["uri"].iloc[-1]
    good = victim.read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    with open(victim, "r+b") as fh:
        fh.truncate(20)
    caplog.clear()
    assert not shard_done(victim.parent)
    rel = victim.relative_to(run.root).as_posix()
    assert warnings_of(caplog) == [f"damaged: {rel} (size 20, recorded {len(good)}); redoing shard {victim.parent.name}"]

    df2 = generate(run, tiny_ddpm())
    assert victim.read_bytes() == good  # the same seeds make the same image
    assert df2.equals(df)
    changed = [p.parent.name for p in shards if p.stat().st_mtime_ns != mtimes[p]]
    assert changed == [victim.parent.name]


@pytest.fixture
def trained(digits_run_copy):
    train.fit(digits_run_copy, train.TrainConfig(**FAST), "m")
    return digits_run_copy


def test_truncated_checkpoint_is_one_line_in_eval_and_train_redoes_it(trained, capsys, caplog):
    run = trained
    weights = run.model_dir("m") / "model.safetensors"
    size = weights.stat().st_size
    record = (run.model_dir("m") / integrity.RECORD).read_text()
    good = train.load_model(run.model_dir("m"))[0].state_dict()
    with open(weights, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(TailforgeError, match=f"size 1000, recorded {size}"):
        train.load_model(run.model_dir("m"))

    assert main(["eval", "--run", str(run.root), "--model-name", "m", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and f"damaged checkpoint: {weights} (size 1000, recorded {size})" in err
    assert f"tailforge train --run {run.root} --name m" in err

    # a folder without a record (older tailforge) still gives one line, from the safetensors error
    (run.model_dir("m") / integrity.RECORD).unlink()
    with pytest.raises(TailforgeError, match="damaged checkpoint: .*model.safetensors \\(Error while deserializing"):
        train.load_model(run.model_dir("m"))

    # the same train command notices the damage and trains it again (same settings, same weights)
    (run.model_dir("m") / integrity.RECORD).write_text(record)
    caplog.clear()
    train.fit(run, train.TrainConfig(**FAST), "m")
    assert warnings_of(caplog) == [f"damaged: models/m/model.safetensors (size 1000, recorded {size}); "
                                   "redoing training m"]
    again = train.load_model(run.model_dir("m"))[0].state_dict()
    assert all(np.array_equal(good[k].numpy(), again[k].numpy()) for k in good)


# --------------------------------------------------------------------------- full disk

def test_enospc_in_a_write_is_one_line_and_leaves_no_half_file(tmp_path, monkeypatch, capsys):
    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    run = tmp_path / "r"
    assert main(["measure", "--run", str(run), "--imbalance", "5"]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and f"disk full writing {run / 'real.parquet'}" in err and " free on " in err
    assert not list(run.glob(".tmp-*")) and not (run / "real.parquet").exists()
    monkeypatch.undo()
    assert main(["measure", "--run", str(run), "--imbalance", "5"]) == 0  # space freed: it resumes


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 464064 vs 463952"),  # torch.save
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
    OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"),  # pyarrow
])
def test_library_errors_caused_by_a_full_disk_become_diskfull(tmp_path, monkeypatch, exc):
    import tailforge.data.atomic as atomic
    import tailforge.data.diskspace as ds

    monkeypatch.setattr(ds, "free_bytes", lambda p: 4096)
    monkeypatch.setattr(atomic, "free_bytes", lambda p: 4096)
    with pytest.raises(DiskFull, match=r"disk full writing .*state\.pt: 4\.0 KB free on .*; it needed more than 4\.0 KB"):
        with atomic_path(tmp_path / "state.pt") as tmp:
            tmp.write_bytes(b"0" * 2048)
            raise exc
    assert list(tmp_path.iterdir()) == []
    # torch's error says nothing about space: with plenty free it stays a bug, with its traceback
    monkeypatch.setattr(ds, "free_bytes", lambda p: 10 * 2**30)
    assert is_disk_full(exc, tmp_path) == ("unexpected pos" not in str(exc))


def test_an_enospc_outside_atomic_writes_is_one_line_in_the_cli(tmp_path, monkeypatch, capsys):
    import tailforge.flows.cmd_plan as cmd_plan

    def boom(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin"))

    monkeypatch.setattr(cmd_plan, "run", boom)
    (tmp_path / "r").mkdir()
    assert main(["plan", "--run", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "disk full writing" in err and "x.bin" in err


def test_low_space_warns_before_generation(digits_run_copy, monkeypatch):
    import tailforge.gen.space as space

    monkeypatch.setattr(space, "free_bytes", lambda p: 10_000)
    msg = space.space_warning(digits_run_copy, "ddpm", 1000)
    assert msg and "1,000 ddpm samples needs about" in msg and "9.8 KB is free" in msg
    assert space.space_warning(digits_run_copy, "ddpm", 1) is None


def test_space_estimate_counts_whole_blocks_and_a_full_disk_is_not_retried():
    from prefect.states import Failed

    from tailforge.flows.tasks import _retry_unless_user_error
    from tailforge.gen.space import estimate_bytes

    digits = {"image_size": [8, 8], "channels": 1}
    assert estimate_bytes(digits, "ddpm", 10, block=4096) == 10 * 4096  # a 120-byte PNG takes a block
    assert estimate_bytes({"image_size": [64, 64], "channels": 3}, "sd", 1, block=4096) == 4 * 4096
    assert not _retry_unless_user_error(None, None, Failed(data=DiskFull("disk full writing x", "free space")))
    assert _retry_unless_user_error(None, None, Failed(data=RuntimeError("transient")))


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_a_tiny_tmpfs_stops_measure_with_one_line_then_resumes(tmp_path, capsys, digits_run):
    small = tmp_path / "small"
    if not _tmpfs(small, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert main(["measure", "--run", str(small / "r"), "--imbalance", "10"]) == 2
        err = capsys.readouterr().err
        assert one_line(err) and "disk full writing" in err and str(small) in err
        subprocess.run(["mount", "-o", "remount,size=4m", str(small)], check=True)
        assert main(["measure", "--run", str(small / "r"), "--imbalance", "10"]) == 0
        assert pd.read_parquet(small / "r" / "real.parquet").equals(pd.read_parquet(digits_run.real))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# --------------------------------------------------------------------------- one run per folder

HOLDER = textwrap.dedent("""
    import sys, time
    from tailforge.data.lock import run_lock
    with run_lock(sys.argv[1], command="tailforge run", shared=sys.argv[2] == "shared"):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
""")


def hold(root: Path, seconds: float = 60, shared: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), "shared" if shared else "x", str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_held_folder_is_refused_with_the_holders_pid(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    holder = hold(run)
    try:
        assert main(["plan", "--run", str(run)]) == 2
        err = capsys.readouterr().err
        assert one_line(err) and f"in use by pid {holder.pid}" in err and "--wait" in err
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on .* \\(started .*`tailforge run`"):
            with run_lock(run):
                pass
        # read-only commands do not lock: --help, --show-config
        with pytest.raises(SystemExit) as ex:
            main(["plan", "--help"])
        assert ex.value.code == 0
        assert main(["run", "--run", str(run), "--show-config"]) == 0
    finally:
        holder.kill()
        holder.wait()


def test_wait_queues_behind_the_holder(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    holder = hold(run, seconds=1.5)
    said = []
    t0 = time.perf_counter()
    with run_lock(run, wait=True, say=said.append, poll=0.1):
        waited = time.perf_counter() - t0
    holder.wait()
    assert waited > 0.5 and len(said) == 1 and f"pid {holder.pid}" in said[0] and "waiting" in said[0]


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    holder = hold(run)
    holder.kill()  # SIGKILL: its record stays in the lock file, the kernel drops the flock
    holder.wait()
    assert json.loads((run / LOCK).read_text())["pid"] == holder.pid
    said = []
    with run_lock(run, say=said.append):
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"stale lock of pid {holder.pid}" in said[0] and "no longer runs" in said[0]
    assert (run / LOCK).read_text() == ""  # released cleanly: nothing stale left


def test_lock_is_reentrant_in_a_process_and_shared_for_shard_workers(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with run_lock(run):
        with run_lock(run):  # the CLI holds it, then the flow body takes it again
            pass
    workers = [hold(run, shared=True), hold(run, shared=True)]  # two `generate --shard i/n` workers
    try:
        with pytest.raises(RunLocked, match="in use by another process"):
            with run_lock(run):
                pass
    finally:
        for w in workers:
            w.kill()
            w.wait()
    with run_lock(tmp_path / "missing") as held:  # a folder that does not exist is not created
        assert held is False
    assert not (tmp_path / "missing").exists()


# --------------------------------------------------------------------------- end to end (slow)

@pytest.mark.slow
def test_flow_rerun_redoes_a_truncated_checkpoint_and_png_with_the_same_numbers(tmp_path):
    """`tailforge run` on tiny digits; truncate the rebalanced checkpoint and one accepted PNG; the rerun
    names both, redoes train rebalanced (+ evaluate, compare) and the PNG's shard, same metrics."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path / "prefect"))
    import yaml

    cfg = {"run": str(tmp_path / "run"), "data": {"dataset": "digits", "imbalance": 10, "seed": 0},
           "plan": {"target": "balance", "overgen": 1.2, "budget": 40},
           "generate": {"generator": "ddpm", "shard_size": 8,
                        "ddpm": {"ddpm_preset": "tiny", "ddpm_train_steps": 10, "ddpm_sample_steps": 2}},
           "train": {"model": "tiny", "width": 8, "epochs": 2, "batch_size": 128, "lr": 0.05, "hflip": False},
           "evaluate": {"plots": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "tailforge.flows.cli", "run", "--config", str(tmp_path / "c.yaml")]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    run = tmp_path / "run"
    metrics = {n: (run / "eval" / f"{n}-test.json").read_text() for n in ("baseline", "rebalanced")}
    weights = run / "models" / "rebalanced" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(1000)
    filt = pd.read_parquet(run / "filtered.parquet")
    png = run / filt.loc[filt["accepted"].astype(bool), "uri"].iloc[0]
    good = png.read_bytes()
    with open(png, "r+b") as fh:
        fh.truncate(30)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = again.stdout + again.stderr
    assert again.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert f"damaged: models/rebalanced/model.safetensors (size 1000, recorded {size}); redoing train rebalanced" in out
    assert f"damaged: {png.relative_to(run).as_posix()} (size 30" in out
    assert png.read_bytes() == good
    assert {n: (run / "eval" / f"{n}-test.json").read_text() for n in metrics} == metrics


KILL_HOOK = textwrap.dedent('''
    # sitecustomize for the Dask kill test: in every process of the run (workers are spawned), the shard
    # named by TF_TEST_KILL_SHARD kills its own worker mid-shard (once), and each shard takes a moment
    import os, signal, time
    if os.environ.get("TF_TEST_KILL_SHARD"):
        import tailforge.gen.ddpm as _ddpm
        _real = _ddpm.DDPMGenerator.run_shard

        def _run_shard(self, shard, out_dir):
            flag = os.path.join(os.environ["TF_TEST_FLAGS"], "killed-" + shard.id)
            if shard.id == os.environ["TF_TEST_KILL_SHARD"] and not os.path.exists(flag):
                open(flag, "w").close()
                (out_dir / "000000.png").write_bytes(b"half a png")
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(float(os.environ.get("TF_TEST_SHARD_SLEEP", "0")))
            return _real(self, shard, out_dir)

        _ddpm.DDPMGenerator.run_shard = _run_shard
''')


def _digest(run: Path) -> dict[str, str]:
    import hashlib

    df = pd.read_parquet(run / "candidates.parquet")
    return {sid: hashlib.sha256((run / uri).read_bytes()).hexdigest() for sid, uri in zip(df["sample_id"], df["uri"])}


@pytest.mark.slow
def test_dask_worker_killed_mid_shard_then_the_run_killed_resumes_to_the_same_candidates(tmp_path):
    """`runner: dask`, 2 local workers: one worker is SIGKILLed inside a shard, then the whole run (its
    process group) once some shards are done. The rerun generates only the unfinished shards, and the
    candidates (sample ids and image bytes) equal those of an uninterrupted thread-runner run."""
    import signal

    import yaml

    def config(run: Path, runner: str) -> Path:
        cfg = {"run": str(run), "data": {"dataset": "digits", "imbalance": 10, "seed": 0},
               "plan": {"target": "balance", "overgen": 1.2, "budget": 40},
               "generate": {"generator": "ddpm", "shard_size": 4, "device": "cpu",
                            "ddpm": {"ddpm_preset": "tiny", "ddpm_train_steps": 10, "ddpm_sample_steps": 2}},
               "train": {"model": "tiny", "width": 8, "epochs": 1, "batch_size": 128, "lr": 0.05, "hflip": False},
               "evaluate": {"plots": False}, "runner": {"runner": runner, "workers": 2}}
        path = run.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(cfg))
        return path

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILL_HOOK)
    flags = tmp_path / "flags"
    flags.mkdir()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))

    def tailforge_run(cfg: Path, **extra) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tailforge.flows.cli", "run", "--config", str(cfg),
                                 "--flow", "rebalance"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**env, **extra}, start_new_session=True)

    ref = tmp_path / "ref"
    p = tailforge_run(config(ref, "thread"))
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out[-3000:]
    # one folder per work unit (a unit of several small shards: "<first shard id>+<n>")
    shard_ids = sorted(d.name for d in (ref / "synthetic" / "ddpm").iterdir() if d.name.startswith("c"))
    assert len(shard_ids) >= 6
    victim = shard_ids[len(shard_ids) // 2].split("+")[0]  # the first shard of a unit in the middle

    run = tmp_path / "run"
    cfg = config(run, "dask")
    p = tailforge_run(cfg, TF_TEST_KILL_SHARD=victim, TF_TEST_FLAGS=str(flags), TF_TEST_SHARD_SLEEP="1.5")
    gen_dir = run / "synthetic" / "ddpm"
    deadline = time.time() + 900
    while time.time() < deadline and p.poll() is None:
        done = list(gen_dir.glob(f"c*/{ROWS}")) if gen_dir.is_dir() else []
        if (flags / f"killed-{victim}").exists() and 2 <= len(done) <= len(shard_ids) - 3:
            break
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be killed: " + p.communicate()[0][-3000:]
    os.killpg(p.pid, signal.SIGKILL)  # the whole run: orchestrator, Dask nannies and workers
    p.communicate(timeout=60)
    time.sleep(1.0)
    finished = {d.parent.name: d.stat().st_mtime_ns for d in gen_dir.glob(f"c*/{ROWS}")}
    assert 2 <= len(finished) < len(shard_ids) and not (run / "candidates.parquet").exists()

    p = tailforge_run(cfg)  # no hook: a plain rerun
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert "taking over the stale lock" in out
    again = {d.parent.name: d.stat().st_mtime_ns for d in gen_dir.glob(f"c*/{ROWS}")}
    assert sorted(again) == shard_ids
    assert {k: again[k] for k in finished} == finished  # finished shards were not generated again
    assert not list(gen_dir.glob(".tmp-*"))  # the killed attempts' partial folders are gone
    assert _digest(run) == _digest(ref)
