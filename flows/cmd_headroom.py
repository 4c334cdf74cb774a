"""``tailforge headroom``: how much could a perfect generator add to the recipe? Estimated from train and val."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "headroom",
        help="estimate the room a perfect generator would give the recipe, from the real train and val splits",
        description="Re-run the run's real-only recipe with the classes the plan tops up thinned to fractions of "
        "their real train images (compare.headroom_fractions, the same optimizer steps), predict the VAL split "
        "with each, and extrapolate the learning curve to the plan's quota. Writes eval/headroom.json (room, "
        "low, high in points of balanced accuracy, per group). Never uses held-back or test images, so it works "
        "on a folder that is long-tailed as it is (profile none). Costs about one more real-only arm with its "
        "backbone; finished models are reused.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", metavar="DIR", required=True, help="run folder (its config.yaml is used when it has one)")
    p.add_argument("--config", metavar="YAML", help="run config (default: RUN/config.yaml, else the embedded one)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override one setting, e.g. --set compare.headroom_fractions=[0.5]")
    p.set_defaults(func=run)


def run(args) -> int:
    from tailforge.data import TailforgeError
    from tailforge.data.lock import run_lock

    from .config import check_run_folder, load_config, parse_set

    over = parse_set(args.set)
    over["run"] = str(args.run)
    path = args.config or Path(args.run) / "config.yaml"
    if not Path(path).is_file():
        raise TailforgeError(f"run folder {args.run} has no config.yaml",
                             f"run `tailforge run --run {args.run} ...` first, or pass the run's --config YAML")
    cfg = load_config(path, over)
    check_run_folder(cfg)
    with run_lock(cfg.run, create=True, command="tailforge headroom"):
        from . import prefect_env

        prefect_env()
        from .flows import run_flow
        from .guard import quiet_user_errors

        quiet_user_errors()
        t0 = time.perf_counter()
        res = run_flow(cfg, "headroom")
        secs = time.perf_counter() - t0
    print(f"\nheadroom finished in {secs:.0f} s: estimated room {res['room']:+.1f} points of balanced accuracy "
          f"[{res['low']:+.1f}, {res['high']:+.1f}] ({100 * res['confidence']:.0f} % interval, {res['fit']} fit of "
          f"the val learning curve at fractions {', '.join(str(f) for f in res['fractions'])})")
    for g, v in res["groups"].items():
        print(f"  {g}: {v['room']:+.1f} [{v['low']:+.1f}, {v['high']:+.1f}]")
    topped = sorted((c for c in res.get("classes", []) if c["need"] > 0), key=lambda c: -c["gain"])
    if topped:
        fmt = lambda c: f"{c['name']} {c['gain']:+.1f}"  # noqa: E731
        print(f"  per class (points of the class's accuracy): most room in {', '.join(fmt(c) for c in topped[:3])}; "
              f"least in {', '.join(fmt(c) for c in topped[::-1][:3])}")
    print(f"wrote {Path(cfg.run).resolve() / 'eval' / 'headroom.json'}")
    from .cmd_run import _quiet_shutdown

    _quiet_shutdown()
    return 0
