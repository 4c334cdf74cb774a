"""Channels-last (NHWC) training on CPU: how much faster is it, and does the model learn the same?

`train.channels_last` (`--channels-last`, default off) keeps the augmented images and the conv weights
channels-last when training on CPU (on GPU `train.amp` decides, as before). Inference needed nothing:
`train/checkpoint.py` turns uint8 N x H x W x C images into N x C x H x W by a permute, which is channels-last
already; the trainer lost that layout in its augmentation (`grid_sample` returns NCHW). This measures both layouts
side by side:

* **steps**: one training step (forward + backward + SGD, batch 64) of the product's models
  (`tailforge.train.models.create_model`: `tiny` at 28 px, `resnet32` at 32 px, `tf_efficientnet_lite0` at 64 and
  80 px), NCHW and NHWC interleaved round by round in one process, so load on a shared machine hits both alike;
* **gradients**: one float32 backward pass in each layout against the same model in float64, in eval mode and in
  train mode (oneDNN#6035 gets a strided 1x1 conv's weight gradient wrong below 8/16 input channels; the trainer
  keeps such a model NCHW, and the table shows it);
* **batch norm**: BatchNorm2d in train mode, each layout against float64 (the NHWC CPU kernel loses digits on
  off-centre activations; that is why the option is off by default);
* **the product's path**: `tailforge train` as a fresh process on a measured run (the Fashion-MNIST folder, IF 50),
  `--no-channels-last` then `--channels-last` for each seed: the small-images model (`tiny`, 28 px) and the
  pretrained recipe's fine-tune (EfficientNet-Lite0 from its ImageNet weights at 80 px, epochs cut for time); the
  wall time of the command (median over seeds) and the VAL balanced accuracy of each model.

    python bench/make_fashion_folder.py /tmp/ffold
    python bench/cpu_layout.py --threads 2                 # writes bench/results/cpu_layout.{md,json}
    python bench/cpu_layout.py --threads 2 --reuse-timings # the numerics again, the timings from the json

Ratios only: absolute times on a shared 2-core machine say little.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from room_table import tf  # noqa: E402  (the bench's runner of `tailforge` commands)

STEP_CASES = [("tiny", 1, 28), ("resnet32", 3, 32), ("tf_efficientnet_lite0", 3, 64), ("tf_efficientnet_lite0", 3, 80)]


def steps(threads: int, batch: int = 64, rounds: int = 4) -> list[dict]:
    """Training-step throughput of each model in both layouts, interleaved (round 0 is warm-up)."""
    from tailforge.train.models import create_model

    torch.set_num_threads(threads)
    out = []
    for arch, ch, size in STEP_CASES:
        nets = {}
        for nhwc in (False, True):
            torch.manual_seed(0)
            m = create_model(arch, 10, ch, size, input_size=size)
            m = m.to(memory_format=torch.channels_last) if nhwc else m
            nets[nhwc] = (m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))
        x, y = torch.randn(batch, ch, size, size), torch.randint(0, 10, (batch,))
        t = {k: 0.0 for k in nets}
        for r in range(rounds + 1):
            for nhwc, (m, opt) in nets.items():
                xx = x.contiguous(memory_format=torch.channels_last) if nhwc else x
                m.train()
                t0 = time.perf_counter()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(xx), y).backward()
                opt.step()
                if r:
                    t[nhwc] += time.perf_counter() - t0
        row = {"model": arch, "size": size, "batch": batch,
               "train_img_s": {"nchw": batch * rounds / t[False], "nhwc": batch * rounds / t[True]}}
        row["train_ratio"] = t[False] / t[True]
        print(f"{arch} {size} px: training step x{row['train_ratio']:.2f}", flush=True)
        out.append(row)
    return out


GRAD_CASES = [("tiny", 1, 28, 32), ("resnet32", 3, 32, 16), ("resnet32", 1, 8, 4),
              ("tf_efficientnet_lite0", 1, 28, None)]


def gradients(threads: int) -> list[dict]:
    """Are NHWC gradients right? Relative error of one float32 backward pass (batch 64) against the same model in
    float64 (native kernels), in eval mode (running statistics) and train mode (batch statistics), in each layout the
    trainer would use (a guarded model stays NCHW). Lite0 starts from its ImageNet weights."""
    import copy

    from tailforge.train.models import create_model, load_pretrained, use_nhwc

    torch.set_num_threads(threads)

    def grads(m, x, y):
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        return torch.cat([p.grad.flatten().double() for p in m.parameters()])

    out = []
    for arch, ch, size, width in GRAD_CASES:
        for mode in ("eval", "train"):
            torch.manual_seed(0)
            m = create_model(arch, 10, ch, size, width=width, input_size=80 if "lite" in arch else None)
            if "lite" in arch:
                load_pretrained(m, "efficientnet-lite0")
            m.train(mode == "train")
            x, y = torch.randn(64, ch, size, size), torch.randint(0, 10, (64,))
            ref = grads(copy.deepcopy(m).double(), x.double(), y)
            err = {"nchw": float((grads(copy.deepcopy(m), x, y) - ref).norm() / ref.norm())}
            if use_nhwc(m, True, True, torch.device("cpu")):
                g = grads(copy.deepcopy(m).to(memory_format=torch.channels_last),
                          x.contiguous(memory_format=torch.channels_last), y)
                err["nhwc"] = float((g - ref).norm() / ref.norm())
            out.append({"model": arch, "width": width, "channels": ch, "size": size, "mode": mode, "error": err})
            print(f"{arch} width {width} {mode}: gradient error {err}", flush=True)
    return out


def batchnorm(threads: int) -> list[dict]:
    """BatchNorm2d in train mode, float32 in each layout against float64: output and input-gradient error, for
    activations centred at 0 and off-centre (where a one-pass variance loses digits)."""
    torch.set_num_threads(threads)
    out = []
    for c, offset in ((16, 0.0), (16, 5.0), (64, 20.0)):
        torch.manual_seed(0)
        x, g = torch.randn(64, c, 16, 16) * 0.5 + offset, torch.randn(64, c, 16, 16)

        def run(dtype, nhwc):
            bn = torch.nn.BatchNorm2d(c).to(dtype).train()
            fmt = torch.channels_last if nhwc else torch.contiguous_format
            xi = x.to(dtype).contiguous(memory_format=fmt).detach().clone().requires_grad_(True)
            y = bn(xi)
            (y * g.to(dtype).contiguous(memory_format=fmt)).sum().backward()
            return y.detach().double(), xi.grad.double()

        ref = run(torch.float64, False)
        row = {"channels": c, "offset": offset}
        for lay, nhwc in (("nchw", False), ("nhwc", True)):
            y, dx = run(torch.float32, nhwc)
            row[lay] = {"out": float((y - ref[0]).norm() / ref[0].norm()),
                        "dx": float((dx - ref[1]).norm() / ref[1].norm())}
        out.append(row)
        print(f"batch norm C {c} offset {offset}: {row}", flush=True)
    return out


def timed_tf(*args, threads: int) -> float:
    """Seconds of one `tailforge` command as a fresh process (bench/room_table.py's runner, output discarded)."""
    t0 = time.perf_counter()
    tf(*args, threads=threads)
    return time.perf_counter() - t0


TRAIN_CASES = {  # the small-images model and the pretrained recipe's fine-tune (epochs cut for time; same both ways)
    "tiny 28 px, 10 epochs": ["--model", "tiny", "--epochs", "10", "--loss", "logit_adjust"],
    "lite0 80 px (ImageNet weights), 3 epochs": ["--model", "tf_efficientnet_lite0", "--pretrained",
                                                 "efficientnet-lite0", "--input-size", "80", "--epochs", "3",
                                                 "--loss", "logit_adjust", "--transfer-backbone-lr-mult", "0.1"],
}


def product(folder: str, run: Path, threads: int, seeds: list[int]) -> dict:
    """`tailforge train` in both layouts, one after the other for each seed, on a measured run of ``folder``."""
    from tailforge.data import read_json

    if not (run / "counts.json").exists():
        timed_tf("measure", "--run", str(run), "--dataset", "imagefolder", "--root", folder, "--imbalance", "50",
           threads=threads)
    res = {}
    for case, args in TRAIN_CASES.items():
        rows = {"nchw": [], "nhwc": []}
        for seed in seeds:
            for lay, flag in (("nchw", "--no-channels-last"), ("nhwc", "--channels-last")):
                name = f"{lay}-{case.split()[0]}-s{seed}"
                dt = timed_tf("train", "--run", str(run), "--name", name, *args, flag, "--overwrite", "--seed",
                              str(seed), "--no-tensorboard", threads=threads)
                val = round(100 * read_json(run / "models" / name / "best.json")["val_balanced_acc"], 2)
                rows[lay].append({"seed": seed, "seconds": dt, "val_balanced_accuracy": val})
                print(f"{case} {lay} seed {seed}: {dt:.1f} s, VAL {val}", flush=True)
        med = {k: float(np.median([x["seconds"] for x in v])) for k, v in rows.items()}
        mean = {k: float(np.mean([x["val_balanced_accuracy"] for x in v])) for k, v in rows.items()}
        res[case] = {"runs": rows, "median_s": med, "speedup": med["nchw"] / med["nhwc"], "val_mean": mean}
    return res


def report(st: list[dict], gr: list[dict], bn: list[dict], pr: dict, a) -> str:
    md = ["# Channels-last (NHWC) training on CPU (`bench/cpu_layout.py`)", "",
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a.threads} torch thread(s). Speed-up = NCHW time / NHWC time, measured side by side in one run; "
          "> 1 means channels-last is faster. The trainer's default stays NCHW (`train.channels_last: false`): NHWC "
          "is faster, but its batch norm loses digits (below), and two seeds cannot show that it reaches the same "
          "accuracy; `--channels-last` opts in.", "",
          "## One training step of the product's models (batch 64, interleaved)", "",
          "| model | input | NCHW | NHWC | speed-up |", "|---|---:|---:|---:|---:|"]
    for r in st:
        md.append(f"| {r['model']} | {r['size']} px | {r['train_img_s']['nchw']:.0f} img/s | "
                  f"{r['train_img_s']['nhwc']:.0f} img/s | ×{r['train_ratio']:.2f} |")
    md += ["", "## Are the NHWC gradients right? (float32 against the same model in float64, batch 64)", "",
           "| model | input | mode | NCHW error | NHWC error |", "|---|---|---|---:|---:|"]
    for r in gr:
        e = r["error"]
        md.append(f"| {r['model']}" + (f" width {r['width']}" if r["width"] else " (ImageNet weights)")
                  + f" | {r['channels']} x {r['size']} px | {r['mode']} | {e['nchw']:.1e} | "
                  + (f"{e['nhwc']:.1e} |" if "nhwc" in e else "stays NCHW (strided 1x1 conv on < 16 channels, "
                     "oneDNN#6035) |"))
    md += ["", "## Batch norm, train mode (float32 against float64; activations N(offset, 0.5²))", "",
           "| channels | offset | output NCHW | output NHWC | input gradient NCHW | input gradient NHWC |",
           "|---:|---:|---:|---:|---:|---:|"]
    for r in bn:
        md.append(f"| {r['channels']} | {r['offset']:g} | {r['nchw']['out']:.1e} | {r['nhwc']['out']:.1e} | "
                  f"{r['nchw']['dx']:.1e} | {r['nhwc']['dx']:.1e} |")
    if pr:
        md += ["", f"## `tailforge train` on the Fashion-MNIST folder (IF 50), seeds {', '.join(map(str, a.seeds))}",
               "", "| model | NCHW (median) | NHWC (median) | speed-up | VAL balanced accuracy NCHW / NHWC per seed "
               "| mean NCHW / NHWC |", "|---|---:|---:|---:|---|---|"]
        for case, r in pr.items():
            vals = " ; ".join(f"{x['val_balanced_accuracy']:.2f} / {y['val_balanced_accuracy']:.2f}"
                              for x, y in zip(r["runs"]["nchw"], r["runs"]["nhwc"]))
            md.append(f"| {case} | {r['median_s']['nchw']:.1f} s | {r['median_s']['nhwc']:.1f} s | "
                      f"×{r['speedup']:.2f} | {vals} | {r['val_mean']['nchw']:.2f} / {r['val_mean']['nhwc']:.2f} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", default="/tmp/ffold", help="the Fashion-MNIST folder (bench/make_fashion_folder.py)")
    ap.add_argument("--run", default="/tmp/tailforge-cpu-layout", help="run folder for the product-path part")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of each `tailforge train` pair")
    ap.add_argument("--steps-only", action="store_true", help="skip the product-path part")
    ap.add_argument("--reuse-timings", action="store_true", help="keep the timed parts (steps, product path) of "
                    "--out's json from a run on an idle machine; measure the numerics again")
    ap.add_argument("--out", default="bench/results/cpu_layout")
    a = ap.parse_args(argv)
    if not (a.steps_only or a.reuse_timings) and not Path(a.folder).is_dir():
        ap.error(f"no folder at {a.folder}: make it with `python bench/make_fashion_folder.py {a.folder}`, or "
                 "pass --steps-only")
    old = json.loads(Path(a.out + ".json").read_text()) if a.reuse_timings else {}
    st = old["steps"] if a.reuse_timings else steps(a.threads)
    gr = gradients(a.threads)
    bn = batchnorm(a.threads)
    if a.reuse_timings:  # the timed parts of an earlier run of this bench, made on an idle machine
        pr = old["product"]
    else:
        pr = {} if a.steps_only else product(a.folder, Path(a.run), a.threads, a.seeds)
    md = report(st, gr, bn, pr, a)
    Path(a.out + ".md").write_text(md)
    res = {"threads": a.threads, "steps": st, "gradients": gr, "batchnorm": bn, "product": pr}
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    print(md)


if __name__ == "__main__":
    main()
