"""UI check (a script, not a unit test): watch a tailforge run in the Prefect UI.

1. starts ``prefect server start`` on 127.0.0.1 (a temporary PREFECT_HOME, analytics off),
2. runs the default flow against it (``tailforge run`` with PREFECT_API_URL set; ``--quick`` uses
   tiny models so the check takes a minute instead of a few),
3. takes headless-Chromium screenshots of the flow run page, and the comparison
   report, class histogram and filter-grid artifacts (``bench/results/ui_*.png``; Debian's chromium
   is installed if missing),
4. stops the server.

    python bench/ui_check.py [--quick] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--disable-dev-shm-usage"]
QUICK = ["--set", "generate.ddpm.ddpm_preset=tiny", "--set", "generate.ddpm.ddpm_train_steps=30",
         "--set", "plan.budget=120", "--set", "train.epochs=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, body: dict | None = None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"prefect server exited with code {proc.returncode}")
        try:
            api(f"{base}/api/health")
            return
        except OSError:
            time.sleep(1)
    raise SystemExit("prefect server did not become healthy")


def chromium() -> str:
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False)
        if not Path(exe).exists():
            subprocess.run(["apt-get", "update", "-q"], check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True)
    return exe


def screenshot(exe: str, url: str, out: Path, size=(1500, 1900), wait_ms: int = 20000) -> None:
    profile = tempfile.mkdtemp(prefix="ui-check-chromium-")
    try:
        subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    print(f"screenshot {out} <- {url}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models (about a minute of compute)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tailforge-ui-check-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
               PREFECT_UI_API_URL=f"{base}/api")
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        wait_healthy(base, server)
        print(f"prefect server up at {base} in {time.time() - t0:.0f} s")
        run_dir = work / "digits-lt"
        cmd = [sys.executable, "-m", "flows", "run", "--run", str(run_dir)] + (QUICK if args.quick else [])
        t0 = time.time()
        res = subprocess.run(cmd, env=dict(env, PREFECT_API_URL=f"{base}/api"), cwd=REPO, capture_output=True,
                             text=True)
        (args.out / "ui_run.log").write_text(res.stdout + res.stderr)
        print(res.stdout[-1500:])
        print(f"tailforge run: exit {res.returncode} in {time.time() - t0:.0f} s")
        runs = api(f"{base}/api/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 5})
        fr = next(r for r in runs if r["name"])
        print(f"flow run {fr['name']} ({fr['id']}): {fr['state']['name']}")
        arts = api(f"{base}/api/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}, "limit": 100})
        keys = sorted({a["key"] for a in arts if a.get("key")})
        latest = {}  # key -> the newest version's id (an artifact's own page renders its content)
        for a in sorted(arts, key=lambda a: a.get("created") or ""):
            if a.get("key"):
                latest[a["key"]] = a["id"]
        print(f"{len(arts)} artifacts: {', '.join(keys)}")
        exe = chromium()
        page = f"{base}/runs/flow-run/{fr['id']}"
        screenshot(exe, page, args.out / "ui_flow_run.png")
        shots = {"report": "ui_report_artifact.png", "histogram": "ui_histogram_artifact.png",
                 "filter-grids": "ui_filter_grids_artifact.png"}
        for suffix, name in shots.items():
            key = next((k for k in keys if k.endswith("-" + suffix)), None)
            if key:
                screenshot(exe, f"{base}/artifacts/artifact/{latest[key]}", args.out / name)
        (args.out / "ui_check.json").write_text(json.dumps(
            {"flow_run": fr["name"], "state": fr["state"]["name"], "artifacts": keys, "exit": res.returncode,
             "quick": args.quick}, indent=2) + "\n")
        return res.returncode
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        print("prefect server stopped")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
