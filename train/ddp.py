"""Multi-GPU training: ``launch_fit`` runs ``tailforge.train.fit`` under torchrun (DDP) when it pays, in this process otherwise.

``launch_fit(run, cfg, name, progress)`` is what the CLI and the flows call. With ``cfg.ddp == "auto"``
and more than one visible GPU (or ``cfg.nproc > 1``) it runs::

    python -m torch.distributed.run --standalone --nproc_per_node=N -m tailforge.train.ddp RUN NAME CONFIG_JSON

and waits: every process calls ``tailforge.train.fit``, which joins the process group (nccl on GPUs, gloo on
CPU), shards each epoch and lets rank 0 alone write. The worker output is streamed through; rank 0's
progress comes back as ``@@tailforge-progress {json}`` lines that feed ``progress``, a failure as one
``@@tailforge-error {json}`` line that becomes this process's ``TailforgeError``. Otherwise (one GPU,
CPU, ``ddp: off``, or already inside torchrun) it simply calls ``tailforge.train.fit``.

``cfg.batch_size`` is the global batch: N processes take ``batch_size // N`` each per step.
``nproc > 1`` with ``--device cpu`` (or no GPU) runs N CPU processes over gloo, which is how the tests
exercise this path without a GPU.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tailforge.data.errors import TailforgeError
from tailforge.data.run import RunDir

from .config import TrainConfig

PROGRESS = "@@tailforge-progress "
ERROR = "@@tailforge-error "


def in_torchrun() -> bool:
    """True in a process that torchrun started (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def ddp_nproc(cfg: TrainConfig) -> int:
    """How many processes ``launch_fit`` trains ``cfg`` in; 1 means in this process, no torchrun."""
    if cfg.ddp == "off" or in_torchrun():
        return 1
    import torch

    dev = (cfg.device or "auto").strip().lower()
    gpus = torch.cuda.device_count() if dev in ("auto", "cuda") else 0
    if cfg.nproc is None:
        return max(1, gpus)
    if cfg.nproc > 1 and dev.startswith("cuda:"):
        raise TailforgeError(f"device {cfg.device} is one GPU; it cannot be shared by {cfg.nproc} DDP processes",
                             "use --device auto or cuda (CUDA_VISIBLE_DEVICES picks the GPUs), or --nproc 1")
    if dev == "cuda" and cfg.nproc > gpus or dev == "auto" and 0 < gpus < cfg.nproc:
        raise TailforgeError(f"nproc {cfg.nproc} asks for more DDP processes than the {gpus} visible GPU(s)",
                             f"use --nproc {gpus} or less, or --device cpu for CPU processes")
    return cfg.nproc


def launch_fit(run, cfg: TrainConfig, name: str, progress=None) -> Path:
    """``tailforge.train.fit`` in ``ddp_nproc(cfg)`` processes: under torchrun when more than one, else in this process."""
    from .trainer import check_names, finished, fit

    n = ddp_nproc(cfg)
    if n <= 1:
        return fit(run, cfg, name, progress=progress)
    run = RunDir(run.root if isinstance(run, RunDir) else run)
    check_names(cfg)
    done = finished(run, cfg, name)  # a finished model needs no process group
    if done is not None:
        return done
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "tailforge.train.ddp", str(run.root), name, cfg.model_dump_json()]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for N > 1, without its warning
    print(f"tailforge: training '{name}' with DDP in {n} processes (torchrun)", file=sys.stderr, flush=True)
    errors: list[dict] = []
    tail: collections.deque[str] = collections.deque(maxlen=30)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    try:
        for line in proc.stdout:
            msg = _message(line, PROGRESS)
            if msg is not None:
                if progress is not None:
                    progress(msg["done"], msg["total"], msg["info"])
                continue
            msg = _message(line, ERROR)
            if msg is not None:
                errors.append(msg)
                continue
            tail.append(line.rstrip())
            sys.stderr.write(line)
        rc = proc.wait()
    except BaseException:  # Ctrl-C, or the progress callback raised: stop the workers (torchrun reaps them)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        proc.stdout.close()
    if rc == 0:
        return run.model_dir(name)
    if errors and errors[0].get("user"):  # the same error the user would see from one process
        raise TailforgeError(errors[0]["problem"], errors[0].get("hint"))
    why = errors[0]["problem"] if errors else _last_error(tail)
    raise TailforgeError(f"DDP training of '{name}' failed in {n} processes (exit code {rc}): {why}",
                         "see the worker output above; --ddp off trains in one process")


def _message(line: str, marker: str) -> dict | None:
    """The JSON object after ``marker`` in a worker's output line, else None."""
    if marker not in line:
        return None
    try:
        msg, _ = json.JSONDecoder().raw_decode(line.split(marker, 1)[1])
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _last_error(lines) -> str:
    """The last exception line of a worker (``[rank1]: RuntimeError: ...``), else torchrun's exit code line."""
    for t in reversed(lines):
        m = re.search(r"([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)", t)
        if m and not m.group(1).endswith("ChildFailedError"):
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}"
        m = re.search(r"\berror: (.+)", t)
        if m:
            return m.group(1).strip()
    for t in reversed(lines):
        if "exitcode" in t:
            return "worker " + " ".join(t.split())
    return "no error message"


# ----------------------------------------------------------------------------- the torchrun entry
def _say(marker: str, obj: dict) -> None:
    # one write per line: the workers share torchrun's stdout, and a short write to a pipe is atomic
    sys.stdout.write(marker + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _emit(done: int, total: int, info: dict) -> None:
    _say(PROGRESS, {"done": done, "total": total, "info": info})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tailforge.train.ddp",
                                 description="one DDP process of `train.fit` (started by torchrun, see launch_fit)")
    ap.add_argument("run", help="run folder")  # positional: torchrun would take --run for its --run-path
    ap.add_argument("name", help="model name (models/<name>/)")
    ap.add_argument("config", help="the TrainConfig as JSON")
    args = ap.parse_args(argv)
    from .trainer import fit

    try:
        cfg = TrainConfig.model_validate_json(args.config)
        fit(RunDir(args.run), cfg, args.name, progress=_emit)
    except TailforgeError as exc:
        _say(ERROR, {"problem": exc.problem, "hint": exc.hint, "user": True})
        return exc.exit_code
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        _say(ERROR, {"problem": f"{type(exc).__name__}: {first}".rstrip(": ")})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
