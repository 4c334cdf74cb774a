"""Drive the classify page in headless Chromium, end to end, and save screenshots.

    python bench/serve_browser.py                 # builds a digits run and trains two tiny models first
    python bench/serve_browser.py --run runs/X    # or uses the models of an existing run

Starts ``tailforge serve`` on 127.0.0.1 (a real subprocess, the real CLI), installs Debian's
``chromium`` with apt-get if it is missing, and talks to it over the DevTools protocol
(``websockets``, no Playwright download). Steps, each checked:

1. the page loads (models listed, test strip shown, no JS error or CSP violation);
2. upload a PNG through the file input (``DOM.setFileInputFiles``), model "compare all": one result
   card per model; screenshot ``serve_upload.png``;
3. click a tail-class test thumbnail with the mouse, choose one model in the select: one card whose
   top-1 equals what ``POST /api/predict`` answers for the same sample; then "compare all" again:
   screenshot ``serve_compare.png``.

It also times ``POST /api/predict`` (sample id, all models) over loopback. Everything is written to
``bench/results/serve_browser.json``; the figures are printed.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
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
sys.path.insert(0, str(REPO))

CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--disable-default-apps", "--mute-audio",
    "--hide-scrollbars", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]


# ---------------------------------------------------------------- setup: run, models, server, browser


def make_run(root: Path, epochs: int) -> Path:
    """A digits run (IF 10) with two tiny models: ``baseline`` (ce) and ``balanced`` (balanced softmax)."""
    from tailforge import train
    from tailforge.data import DataConfig, RunDir, build_manifest, measure_run

    run = RunDir(root / "digits-lt")
    build_manifest(DataConfig(dataset="digits", imbalance=10, seed=0), run)
    measure_run(run)
    for name, loss in (("baseline", "ce"), ("balanced", "balanced_softmax")):
        cfg = train.TrainConfig(model="tiny", width=16, loss=loss, epochs=epochs, batch_size=64, lr=0.05,
                                hflip=False, device="cpu", seed=0)
        train.fit(run, cfg, name)
    return run.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "flows", "serve", "--run", str(run), "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/info"
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.returncode}); see {log_path}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server did not answer on {url}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def ensure_chromium() -> str:
    """Path of Debian's chromium, installing it with apt-get if missing."""
    for cand in ("/usr/bin/chromium", shutil.which("chromium") or ""):
        if cand and os.access(cand, os.X_OK):
            return cand
    print("chromium not found: apt-get install -y chromium", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    install = sudo + ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=env).returncode != 0:  # stale package lists: update once, retry
        subprocess.run(sudo + ["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    return "/usr/bin/chromium"


def start_browser(chromium: str, profile: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    port_file = profile / "DevToolsActivePort"
    for _ in range(300):
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text().split()[0])
        if proc.poll() is not None:
            raise SystemExit(f"chromium exited early ({proc.returncode})")
        time.sleep(0.1)
    raise SystemExit("chromium did not open its DevTools port")


# ---------------------------------------------------------------- a minimal DevTools-protocol client


class CDP:
    """One page target: ``await cdp.call(method, **params)``; events are collected in ``events``."""

    def __init__(self, ws):
        self.ws, self.next_id, self.pending, self.events = ws, 0, {}, []
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open_page(cls, port: int) -> "CDP":
        from websockets.asyncio.client import connect

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        ws = await connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        return cls(ws)

    async def _read(self):
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg and msg["id"] in self.pending:
                self.pending.pop(msg["id"]).set_result(msg)
            else:
                self.events.append(msg)

    async def call(self, method: str, **params):
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        msg = await asyncio.wait_for(fut, 60)
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]

    async def js(self, expr: str):
        res = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page JS failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expr: str, timeout: float = 30.0):
        t0 = time.time()
        while time.time() - t0 < timeout:
            value = await self.js(expr)
            if value:
                return value
            await asyncio.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {expr}")

    async def screenshot(self, path: Path):
        data = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.write_bytes(base64.b64decode(data["data"]))

    def errors(self) -> list[str]:
        out = []
        for ev in self.events:
            if ev.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(ev["params"]["exceptionDetails"])[:300])
            elif ev.get("method") == "Log.entryAdded" and ev["params"]["entry"]["level"] == "error":
                entry = ev["params"]["entry"]
                out.append(f"{entry['text'][:300]} ({entry.get('url', '')})")
            elif ev.get("method") == "Runtime.consoleAPICalled" and ev["params"]["type"] == "error":
                out.append(str(ev["params"]["args"])[:300])
        return out

    async def close(self):
        self.reader.cancel()
        await self.ws.close()


# ---------------------------------------------------------------- the scenario


READ_CARDS = """JSON.stringify([...document.querySelectorAll('.card')].map(c => ({
  model: c.dataset.model,
  verdict: (c.querySelector('.verdict') || {}).textContent || null,
  top: [...c.querySelectorAll('.row')].map(r => ({label: +r.dataset.label,
        name: r.querySelector('.name').textContent.trim(), pct: r.querySelector('.pct').textContent,
        is_true: r.classList.contains('true')}))})))"""


async def predict_and_read(cdp: CDP, action: str) -> dict:
    """Run ``action`` (JS) or a coroutine that triggers a prediction; wait for it; read the cards."""
    await cdp.js("document.body.dataset.state = 'waiting'")
    t0 = time.perf_counter()
    if isinstance(action, str):
        await cdp.js(action)
    else:
        await action
    state = await cdp.wait_for("['done','error'].includes(document.body.dataset.state) && document.body.dataset.state")
    ms = (time.perf_counter() - t0) * 1000
    status = await cdp.js("document.getElementById('status').textContent")
    if state != "done":
        raise RuntimeError(f"prediction failed on the page: {status}")
    return {"status": status, "truth": await cdp.js("document.getElementById('truth').textContent"),
            "cards": json.loads(await cdp.js(READ_CARDS)), "page_ms": round(ms, 1)}


async def click(cdp: CDP, selector: str) -> None:
    """A real mouse click (press + release) at the centre of the element."""
    box = await cdp.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView(); "
                       "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
        await cdp.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


async def choose_model(cdp: CDP, name: str) -> None:
    await cdp.js(f"(() => {{ const s = document.getElementById('model-select'); s.value = {json.dumps(name)}; "
                 "s.dispatchEvent(new Event('change')); })()")


async def scenario(port: int, base: str, upload: Path, out: Path, models: list[str]) -> dict:
    cdp = await CDP.open_page(port)
    for domain in ("Page", "Runtime", "Log", "DOM"):
        await cdp.call(f"{domain}.enable")
    await cdp.call("Emulation.setDeviceMetricsOverride", width=1400, height=860, deviceScaleFactor=1, mobile=False)
    t0 = time.perf_counter()
    await cdp.call("Page.navigate", url=base + "/")
    await cdp.wait_for("document.body && ['ready','error'].includes(document.body.dataset.state)")
    load_ms = (time.perf_counter() - t0) * 1000
    page = {"load_ms": round(load_ms, 1),
            "options": await cdp.js("[...document.querySelectorAll('#model-select option')].map(o => o.value)"),
            "thumbs": await cdp.js("document.querySelectorAll('.thumb').length"),
            "tail_thumbs": await cdp.js("document.querySelectorAll('.thumb.few').length"),
            "run_info": await cdp.js("document.getElementById('run-info').textContent")}
    assert page["thumbs"] > 0 and page["tail_thumbs"] > 0, page
    assert set(models) <= set(page["options"]) and ("all" in page["options"]) == (len(models) > 1), page

    # 2. upload a file, compare all models
    await choose_model(cdp, "all" if len(models) > 1 else models[0])
    doc = await cdp.call("DOM.getDocument")
    node = await cdp.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file-input")
    uploaded = await predict_and_read(cdp, cdp.call("DOM.setFileInputFiles", nodeId=node["nodeId"],
                                                    files=[str(upload)]))
    assert len(uploaded["cards"]) == len(models) and all(len(c["top"]) == min(5, 10) for c in uploaded["cards"]), uploaded
    await cdp.screenshot(out / "serve_upload.png")

    # 3. a tail test image, one model; then compare all
    sample_id = await cdp.js("document.querySelector('.thumb.few').dataset.sampleId")
    await predict_and_read(cdp, click(cdp, ".thumb.few"))
    one = await predict_and_read(cdp, choose_model(cdp, models[0]))
    assert [c["model"] for c in one["cards"]] == [models[0]], one
    compare = await predict_and_read(cdp, choose_model(cdp, "all")) if len(models) > 1 else one
    await cdp.screenshot(out / "serve_compare.png")
    errors = cdp.errors()
    await cdp.close()
    return {"page": page, "upload": uploaded, "sample_id": sample_id, "one_model": one, "compare": compare,
            "js_errors": errors}


def api_predict(base: str, sample_id: str, model: str) -> dict:
    import httpx

    r = httpx.post(base + "/api/predict", data={"sample_id": sample_id, "model": model}, timeout=60)
    r.raise_for_status()
    return r.json()


def time_api(base: str, sample_id: str, n: int) -> dict:
    import httpx

    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            client.post(base + "/api/predict", data={"sample_id": sample_id, "model": "all"}).raise_for_status()
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"n": n, "median_ms": round(times[n // 2], 2), "p90_ms": round(times[int(n * 0.9)], 2)}


def make_upload(run: Path, path: Path) -> dict:
    """A 96x96 RGB PNG of a TEST digit (upscaled): exercises the resize + channel conversion of uploads."""
    from PIL import Image

    from tailforge.data import RunDir, load_images, read_manifest

    r = RunDir(run)
    info = r.dataset_info()
    df = read_manifest(r.real)
    row = df[df["split"] == "test"].iloc[0]
    img = load_images([row["uri"]], r.root, info["channels"], tuple(info["image_size"]))[0]
    im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB").resize((96, 96), Image.NEAREST)
    im.save(path)
    return {"file": path.name, "true_label": int(row["label"]), "true_class": str(row["class_name"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="existing run with trained models (default: build a digits run)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--epochs", type=int, default=15, help="epochs of the two tiny models (default run only)")
    ap.add_argument("--n-timing", type=int, default=50)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    with tempfile.TemporaryDirectory(prefix="tf-serve-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        run = args.run or make_run(tmp, args.epochs)
        setup_s = time.perf_counter() - t0
        from tailforge.data import RunDir
        from tailforge.flows.serve import RunState, ServeConfig

        models = RunState(RunDir(run), ServeConfig()).model_names()
        if not models:
            raise SystemExit(f"run {run} has no trained model")
        upload = make_upload(run, tmp / "upload-digit.png")
        chromium = ensure_chromium()
        version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
        port = free_port()
        server = start_server(run, port, tmp / "server.log")
        browser = None
        try:
            profile = tmp / "profile"
            profile.mkdir()
            browser, devtools_port = start_browser(chromium, profile)
            base = f"http://127.0.0.1:{port}"
            result = asyncio.run(scenario(devtools_port, base, tmp / "upload-digit.png", args.out, models))
            api_one = api_predict(base, result["sample_id"], models[0])
            page_top1 = result["one_model"]["cards"][0]["top"][0]["label"]
            assert page_top1 == api_one["results"][0]["predicted"]["label"], (page_top1, api_one)
            timing = time_api(base, result["sample_id"], args.n_timing)
        finally:
            if browser is not None:
                stop(browser)
            stop(server)
        server_log = (tmp / "server.log").read_text()
    assert "Traceback" not in server_log, server_log
    assert not result["js_errors"], result["js_errors"]

    report = {"chromium": version, "run": str(run) if args.run else "digits IF=10 (built by this script)",
              "models": models, "setup_s": round(setup_s, 1), "upload_file": upload, **result,
              "api_predict_all_models": timing,
              "screenshots": ["bench/results/serve_upload.png", "bench/results/serve_compare.png"]}
    (args.out / "serve_browser.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{version}; models {models}; page loaded in {result['page']['load_ms']} ms "
          f"({result['page']['thumbs']} thumbnails, {result['page']['tail_thumbs']} tail)")
    for what in ("upload", "one_model", "compare"):
        r = result[what]
        tops = ", ".join(f"{c['model']}: {c['top'][0]['name']} {c['top'][0]['pct']}" for c in r["cards"])
        print(f"{what:9s} [{r['status']}] {r['truth'].strip()} -> {tops} (page round trip {r['page_ms']} ms)")
    print(f"upload was a test image of class {upload['true_class']} (96x96 RGB PNG, resized by the server)")
    print(f"POST /api/predict, {len(models)} models, test sample: median {timing['median_ms']} ms, "
          f"p90 {timing['p90_ms']} ms over {timing['n']} calls (loopback, CPU)")
    print(f"wrote {args.out / 'serve_browser.json'}, serve_upload.png, serve_compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
