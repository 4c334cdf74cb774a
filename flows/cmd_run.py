"""``tailforge run``: the whole pipeline as a Prefect flow (default: the embedded digits benchmark)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run every stage as a Prefect flow (no arguments: the embedded digits benchmark, offline)",
        description="Run the `benchmark` flow (measure, plan, generate, filter, train baseline and rebalanced, "
        "evaluate, compare) or the `rebalance` flow on one run folder. Without --config the embedded default "
        "runs: sklearn digits made long-tailed, topped up by the in-domain diffusion model. Re-running a "
        "finished run does no work; an interrupted one resumes at the first unfinished task or shard.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", metavar="YAML", help="run config (sections data, measure, plan, generate, filter, "
                   "train, evaluate, runner); default: the embedded digits config (see --show-config)")
    p.add_argument("--run", metavar="DIR", help="run folder (overrides `run:` of the config)")
    p.add_argument("--flow", choices=["benchmark", "rebalance"], default="benchmark",
                   help="benchmark: baseline vs rebalanced + comparison report; rebalance: the rebalanced model only")
    p.add_argument("--runner", choices=["thread", "dask"], help="task runner of the generation shards "
                   "(dask: prefect-dask, a local cluster with one worker per GPU unless --dask-address)")
    p.add_argument("--workers", type=int, metavar="N", help="parallel generation workers")
    p.add_argument("--dask-address", metavar="ADDR", help="address of an existing Dask scheduler")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override one setting, e.g. --set train.epochs=3 --set generate.ddpm.ddpm_preset=tiny")
    p.add_argument("--show-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=run)


def resolve(args):
    from .config import load_config, parse_set

    over = parse_set(args.set)
    if args.run:
        over["run"] = str(args.run)
    rn = {k: v for k, v in (("runner", args.runner), ("workers", args.workers), ("address", args.dask_address))
          if v is not None}
    if rn:
        over.setdefault("runner", {}).update(rn)
    return load_config(args.config, over)


def run(args) -> int:
    from .config import check_run_folder

    cfg = resolve(args)
    if args.show_config:
        print(cfg.to_yaml(), end="")
        return 0
    check_run_folder(cfg)  # a contradicting config: one clear error before Prefect or any stage starts
    from tailforge.data.lock import run_lock

    # one run per folder: refused (or --wait) before Prefect starts; the flow's tasks run under this lock
    with run_lock(cfg.run, wait=args.wait, create=True, command="tailforge run"):
        from . import prefect_env

        prefect_env()
        from .flows import run_flow
        from .guard import quiet_user_errors

        quiet_user_errors()
        t0 = time.perf_counter()
        out = run_flow(cfg, args.flow)
        secs = time.perf_counter() - t0
    print(f"\n{args.flow} finished in {secs:.0f} s; run folder {Path(cfg.run).resolve()}")
    for name, m in (out.get("metrics") or {}).items():
        parts = [f"{k} {m[k]:.3f}" for k in ("top1", "balanced_acc", "few") if isinstance(m.get(k), (int, float))]
        print(f"  {name} ({cfg.eval_split} split): " + ", ".join(parts))
    if out.get("no_oracle"):
        print(f"  no oracle arm: {out['no_oracle']}")
    for line in room_lines(Path(cfg.run) / "eval" / "compare.json", out.get("headroom")):
        print(line)
    if out.get("report"):
        print(f"report: {out['report']}")
    _quiet_shutdown()
    return 0


def room_lines(compare_json: Path, headroom: dict | None = None) -> list[str]:
    """Room and capture of the report in a few lines for the terminal (empty without a compare.json)."""
    import json

    if not compare_json.exists():
        return []
    room = json.loads(compare_json.read_text()).get("room") or {}
    bal = (room.get("sets") or {}).get("balanced") or {}
    iv = lambda e: f"{e['value']:+.1f} [{e['low']:+.1f}, {e['high']:+.1f}]"  # noqa: E731
    out = []
    if bal.get("room"):
        out.append(f"  room (oracle - real-only): {iv(bal['room'])} points of balanced accuracy ({bal['room']['verdict']})")
    if bal.get("gain"):
        cap = bal.get("captured")
        out.append(f"  synthetic data (rebalanced - real-only): {iv(bal['gain'])} ({bal['gain']['verdict']})"
                   + (f", {100 * cap['value']:.0f} % of the room captured" if cap else ""))
    if headroom:
        out.append(f"  estimated room (headroom, train + val only): {headroom['room']:+.1f} "
                   f"[{headroom['low']:+.1f}, {headroom['high']:+.1f}]")
    return out


def _quiet_shutdown() -> None:
    """Let the run's events reach the API, then keep the ephemeral server's teardown quiet.

    A fast (fully cached) run can end while the temporary server's task-run recorder still holds
    events; its cancellation at exit would print asyncio tracebacks after the results.
    """
    import logging

    try:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)
    except Exception:  # noqa: BLE001 - best effort: the results are already written and printed
        pass
    time.sleep(1.0)
    for name in ("prefect.server", "prefect._internal.concurrency", "prefect.events"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
