"""What TensorBoard event files cost a training: the default digits run's baseline, tensorboard on vs off.

The embedded default config (flows/default.yaml: sklearn digits, imbalance 10, the tiny CNN, 20 epochs,
batch 64) builds a run folder; its baseline trains ``--repeats`` times with ``train.tensorboard`` on and off,
interleaved, one torch thread, each in a fresh model folder. Two numbers per training:

* the time inside the TensorBoard calls (``train/tb.py``: opening the event file, one event per epoch, the
  confusion image at the end, closing, and copying the event files into the model folder), measured
  directly;
* the wall time of the whole ``fit`` (epochs, validation, the model folder), on vs off: the same overhead
  seen from outside, noisy on a shared machine.

    python bench/tracking_overhead.py            # writes bench/results/tracking_overhead.md
    python bench/tracking_overhead.py --repeats 5
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "tracking_overhead.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="trainings per setting (interleaved)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from tailforge.data import RunDir, build_manifest, measure_run
    from tailforge.flows.config import load_config
    from tailforge.train import fit, tb, trainer

    spent = {"s": 0.0}

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent["s"] += time.perf_counter() - t0
        return wrapper

    # the TensorBoard work: the writer, each epoch's row, the confusion image, closing, the copy into the folder
    tb.open_writer = timed(tb.open_writer)
    tb.write_epoch = timed(tb.write_epoch)
    tb.write_confusion = timed(tb.write_confusion)
    tb.Curves.close = timed(tb.Curves.close)
    copytree = shutil.copytree
    trainer.shutil.copytree = timed(copytree)  # only the trainer's copy of the tb folder uses it

    cfg = load_config()
    base = cfg.baseline_train().model_copy(update={"device": "cpu"})
    epochs = base.epochs
    with tempfile.TemporaryDirectory(prefix="tf-track-") as tmp:
        run = RunDir(Path(tmp) / "digits-lt")
        build_manifest(cfg.data, run)
        measure_run(run, cfg.measure)
        fit(run, base.model_copy(update={"epochs": 1, "tensorboard": True}), "warmup")  # imports, caches
        rows = {True: [], False: []}
        for i in range(args.repeats):
            for on in (True, False):
                spent["s"] = 0.0
                t0 = time.perf_counter()
                fit(run, base.model_copy(update={"tensorboard": on}), f"{'on' if on else 'off'}-{i}")
                wall = time.perf_counter() - t0
                rows[on].append({"wall": wall, "tb": spent["s"]})
                print(f"repeat {i} tensorboard {'on ' if on else 'off'}: fit {wall:.2f} s, in TensorBoard calls "
                      f"{spent['s'] * 1000:.0f} ms", flush=True)
        size = sum(p.stat().st_size for p in (run.model_dir("on-0") / "tb").rglob("*") if p.is_file())

    def ms(v):
        return f"{statistics.mean(v) * 1000:.1f} ± {statistics.stdev(v) * 1000:.1f}" if len(v) > 1 else \
            f"{v[0] * 1000:.1f}"

    on_wall = [r["wall"] for r in rows[True]]
    off_wall = [r["wall"] for r in rows[False]]
    tb_s = [r["tb"] for r in rows[True]]
    per_epoch_on = [w / epochs for w in on_wall]
    ratio_direct = [t / w for t, w in zip(tb_s, on_wall)]
    ratio_wall = [a / b for a, b in zip(on_wall, off_wall)]
    lines = [
        "# TensorBoard overhead per epoch (bench/tracking_overhead.py)",
        "",
        f"The default digits run's baseline (flows/default.yaml: tiny CNN, {epochs} epochs, batch "
        f"{base.batch_size}; CPU, 1 torch thread), trained {args.repeats} times with `train.tensorboard` on and "
        f"off, interleaved. Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared "
        f"with other jobs (load average {os.getloadavg()[0]:.1f} at the end). "
        "Times are mean ± std over the repeats. No split is involved: these are times, not accuracies.",
        "",
        "| | per training | per epoch |",
        "|---|---:|---:|",
        f"| `fit`, tensorboard on (wall) | {ms(on_wall)} ms | {ms(per_epoch_on)} ms |",
        f"| `fit`, tensorboard off (wall) | {ms(off_wall)} ms | {ms([w / epochs for w in off_wall])} ms |",
        f"| inside the TensorBoard calls (measured directly) | {ms(tb_s)} ms | {ms([t / epochs for t in tb_s])} ms |",
        "",
        f"- Direct overhead: the TensorBoard calls take **{100 * statistics.mean(ratio_direct):.2f} %** of the "
        f"training's wall time (per epoch {statistics.mean(tb_s) / epochs * 1000:.1f} ms of "
        f"{statistics.mean(per_epoch_on) * 1000:.0f} ms); this includes the one-off confusion image and the copy "
        "into the model folder.",
        f"- Wall time on / off: **{statistics.mean(ratio_wall):.3f}**"
        + (f" ± {statistics.stdev(ratio_wall):.3f}" if len(ratio_wall) > 1 else "")
        + " (the machine's noise is of the same size; the direct measure is the one to read).",
        f"- Event files of one training: {size / 1024:.0f} KiB (models/<name>/tb/).",
        "",
        "Hence TensorBoard is on by default (`track.tensorboard: true`, `train.tensorboard: true`).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
