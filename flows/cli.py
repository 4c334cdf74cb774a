"""``tailforge``: one subcommand per stage, each calling the same plain function the flows call."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from tailforge.data.errors import TailforgeError
from tailforge.data.log import cli_logging

from .guard import add_wait_options, command_lock, user_error

# Each module defines ``add_parser(subparsers)`` and sets ``func`` on its parser.
COMMANDS = [
    "tailforge.flows.cmd_measure",
    "tailforge.flows.cmd_plan",
    "tailforge.flows.cmd_generate",
    "tailforge.flows.cmd_filter",
    "tailforge.flows.cmd_train",
    "tailforge.flows.cmd_eval",
    "tailforge.flows.cmd_export",
    "tailforge.flows.cmd_run",
    "tailforge.flows.cmd_headroom",
    "tailforge.flows.cmd_serve",
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
    add_wait_options(sub)
    return parser


@cli_logging()  # tailforge's log records (warnings too): one plain line each on stderr, while main runs
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        with command_lock(args):  # commands that write into --run hold its lock (see guard.py)
            return int(args.func(args) or 0)
    except TailforgeError as err:
        print(f"tailforge {args.command}: error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except Exception as exc:  # a full disk reported by a library (torch, pyarrow) outside an atomic write
        err = user_error(exc)
        if err is None:
            raise
        print(f"tailforge {args.command}: error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"tailforge {args.command}: interrupted; finished work is kept, re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
