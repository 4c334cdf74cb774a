"""``tailforge serve``: the classify page over one run's models (see ``flows/serve.py``)."""
from __future__ import annotations

import argparse
import ipaddress
import socket

from .cliutil import add_model_args, add_run_arg, console, stage_config


def add_parser(sub) -> None:
    from .serve import ServeConfig

    p = sub.add_parser(
        "serve",
        help="web page to try the run's models on an image (127.0.0.1 by default)",
        description="Serve a page where you pick a model of the run (or compare all), upload an image or pick a "
        "test image, and see the top-5 classes per model with their head/medium/tail group. "
        "The JSON API is described at /openapi.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arg(p)
    p.add_argument("--config", metavar="YAML", help="YAML file with a `serve:` section")
    add_model_args(p, ServeConfig, group="server")
    p.set_defaults(func=run)


def run(args) -> int:
    from tailforge.data.errors import TailforgeError

    from .serve import ServeConfig, create_app

    cfg = stage_config(args, ServeConfig, "serve")
    if not args.run.is_dir():
        raise TailforgeError(f"run folder {args.run} does not exist", "pass the --run folder of a measured run")
    from tailforge.train.checkpoint import resolve_device

    resolve_device(cfg.device)  # a bad --device: one line now, not a traceback at the first prediction
    app = create_app(args.run, cfg)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    con = console()
    models = app.state.run.model_names()
    con.print(f"classify page for run {args.run}: {len(models)} model(s) ({', '.join(models) or 'none yet'}), "
              f"{len(app.state.run.test)} test images")
    warm(app.state.run, models, con)
    shown = f"[{host}]" if ":" in host else host
    con.print(f"open http://{shown}:{port}/  (API schema: /openapi.json; Ctrl-C stops)")
    if not is_loopback(cfg.host):
        con.print(f"[yellow]warning: listening on {cfg.host}: other machines can reach this page[/yellow]")
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=False)).run(sockets=[sock])
    return 0


def warm(state, models: list[str], con) -> None:
    """Load every checkpoint before the first request, so the first click does not wait for torch."""
    from .serve import ServeError

    for name in models:
        try:
            state.load(name)
        except ServeError as exc:  # the page still serves the others; predicting with this one says why
            con.print(f"[yellow]warning: {exc.problem}[/yellow]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket first, so a busy port is a one-line error, not a uvicorn traceback."""
    from tailforge.data.errors import TailforgeError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TailforgeError(f"cannot resolve host '{host}' ({exc.strerror})", "pass an IP address to --host") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise TailforgeError(f"cannot listen on {host}:{port} ({exc.strerror})",
                             "pass another --port (or 0 for any free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
