"""``tailforge``: one subcommand per stage, each calling the same plain function the flows call."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from data.errors import TailforgeError

# Each module defines ``add_parser(subparsers)`` and sets ``func`` on its parser.
COMMANDS = [
    "flows.cmd_measure",
    "flows.cmd_plan",
    "flows.cmd_generate",
    "flows.cmd_filter",
    "flows.cmd_train",
    "flows.cmd_eval",
    "flows.cmd_run",
    "flows.cmd_serve",
]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tailforge",
        description="Rebalance long-tailed image datasets by synthesising tail-class data.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # stage not built yet
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TailforgeError as err:
        print(f"tailforge {args.command}: error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"tailforge {args.command}: interrupted; finished work is kept, re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
