"""Serve tailforge's flows as deployments of a running Prefect server (``flow.serve``).

    prefect server start --host 127.0.0.1            # terminal 1 (UI at http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m tailforge.flows.serve_deploy [--config my.yaml]  # terminal 2: waits for runs
    prefect deployment run 'benchmark/default'        # terminal 3, or "Run" in the UI

The deployments' default parameters are the run config (the embedded digits config unless
``--config``); the UI's "Custom run" form edits any field of it before starting a run.
"""
from __future__ import annotations

import argparse


def deployments(cfg):
    from .flows import benchmark, evaluate_flow, generate_flow, measure_flow, plan_flow, rebalance

    params = {"config": cfg.model_dump(mode="json")}
    run = cfg.run
    return [
        benchmark.to_deployment(name="default", parameters=params, tags=["tailforge"],
                                description="baseline vs rebalanced on the configured dataset; comparison report"),
        rebalance.to_deployment(name="default", parameters=params, tags=["tailforge"]),
        measure_flow.to_deployment(name="default", parameters={"run": run, "data": params["config"]["data"]},
                                   tags=["tailforge"]),
        plan_flow.to_deployment(name="default", parameters={"run": run}, tags=["tailforge"]),
        generate_flow.to_deployment(name="default", parameters={"run": run}, tags=["tailforge"]),
        evaluate_flow.to_deployment(name="default", parameters={"run": run}, tags=["tailforge"]),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tailforge.flows.serve_deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="YAML", help="run config used as the deployments' default parameters")
    p.add_argument("--limit", type=int, default=1, help="flow runs executed at the same time")
    args = p.parse_args(argv)
    from . import prefect_env

    prefect_env()
    from prefect import serve

    from .config import load_config

    serve(*deployments(load_config(args.config)), limit=args.limit)


if __name__ == "__main__":  # pragma: no cover
    main()
