"""Generation throughput.

``sd`` (default): images/s of tailforge's SD sampler (prompt encoded once per batch, batched UNet
calls, one seeded generator per image, bf16/fp16 + channels-last + SDPA on GPU) vs a plain
``StableDiffusionPipeline`` per-prompt call loop (``pipe(prompt).images[0]``, fp32, as written by
hand), on the same prompts, sizes, steps and pipeline folder, measured side by side in one run.
On CPU: the tiny pipeline (the ratio is what counts). ``--full``: the SD-1.5 architecture built from
its config (random weights cost what real ones cost), which needs a GPU.

``ddpm``: training time and samples/s of the in-domain diffusion on a run (digits by default,
``--dataset fashion-mnist`` on a GPU), and a sample-grid PNG per class under bench/results/.

    python bench/gen_throughput.py                 # CPU, tiny SD, ratio
    python bench/gen_throughput.py --full          # GPU, SD-1.5 architecture, bf16
    python bench/gen_throughput.py ddpm --preset fast
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = ["airplane", "cat", "ship", "truck"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_sd(args) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from tailforge.gen.config import SDOptions
    from tailforge.gen.sd import SDSampler, load_pipeline, prompt_for
    from tailforge.gen.sd_build import save_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.full and device == "cpu":
        raise SystemExit("--full needs a GPU (the SD-1.5 architecture at 512 px)")
    size = "sd15" if args.full else "tiny"
    px = args.size or (512 if args.full else 32)
    n = args.n or (32 if args.full else 16)
    batch = args.batch or (16 if args.full else 8)
    tmp = Path(tempfile.mkdtemp(prefix="tf-sd-"))
    try:
        folder = save_pipeline(tmp / size, size=size)
        prompts = [prompt_for(None, "cifar10", CLASSES[i % len(CLASSES)]) for i in range(n)]
        opts = SDOptions(sd_model=str(folder), sd_steps=args.steps, sd_size=px, sd_scheduler="dpm")
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        # ours: one class per shard-like group, batched
        ours = SDSampler(load_pipeline(str(folder), device, "auto", "dpm"), opts, batch)
        by_class = {c: [i for i, p in enumerate(prompts) if c in p] for c in CLASSES}
        ours.txt2img(prompts[0], [0])  # warm-up
        sync()

        def run_ours():
            for c, idx in by_class.items():
                if idx:
                    ours.txt2img(prompts[idx[0]], idx)
            sync()

        t_ours = timed(run_ours)
        del ours
        # plain: the loop people write by hand
        plain = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                        feature_extractor=None).to(device)
        from tailforge.gen.sd import make_scheduler

        plain.scheduler = make_scheduler("dpm", plain.scheduler.config)
        plain.set_progress_bar_config(disable=True)
        plain(prompts[0], num_inference_steps=args.steps, height=px, width=px)  # warm-up
        sync()

        def run_plain():
            for i, p in enumerate(prompts):
                plain(p, num_inference_steps=args.steps, guidance_scale=opts.sd_guidance, height=px, width=px,
                      negative_prompt=opts.sd_negative_prompt,
                      generator=torch.Generator(device).manual_seed(i)).images[0]
            sync()

        t_plain = timed(run_plain)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"bench": "sd", "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "architecture": size, "pixels": px, "images": n, "steps": args.steps, "batch": batch,
           "ours_images_per_s": round(n / t_ours, 3), "plain_images_per_s": round(n / t_plain, 3),
           "ratio": round(t_plain / t_ours, 2), "torch_threads": torch.get_num_threads()}
    return res


def bench_ddpm(args) -> dict:
    from tailforge.data import DataConfig, RunDir, build_manifest, measure_run, read_json
    from tailforge.gen import DDPMOptions, GenerateConfig, PlanConfig, generate, plan_run, write_sample_grids

    tmp = Path(tempfile.mkdtemp(prefix="tf-ddpm-"))
    try:
        run = RunDir(tmp / "run")
        kw = {"root": "/usr/share/datasets/fashion-mnist"} if args.dataset == "fashion-mnist" else {}
        build_manifest(DataConfig(dataset=args.dataset, imbalance=args.imbalance, seed=0, **kw), run)
        measure_run(run)
        plan = plan_run(run, PlanConfig(budget=args.budget))
        cfg = GenerateConfig(generator="ddpm", ddpm=DDPMOptions(ddpm_preset=args.preset), batch_size=args.batch or 256)
        marks = {}

        def progress(done, total, info):
            if info.get("stage") == "ddpm-train" and done == total:
                marks["trained"] = time.perf_counter()

        t0 = time.perf_counter()
        df = generate(run, cfg, progress=progress)
        t1 = time.perf_counter()
        done = read_json(run.synthetic("ddpm") / "model" / "done.json")
        out = RESULTS / f"gen_ddpm_grids_{args.dataset}"
        out.mkdir(parents=True, exist_ok=True)
        for p in write_sample_grids(run, "ddpm"):
            shutil.copy(p, out / p.name)
        sample_s = t1 - marks.get("trained", t0)
        return {"bench": "ddpm", "dataset": args.dataset, "preset": args.preset, "train_steps": done["steps"],
                "train_seconds": done["train_seconds"], "final_loss": done["final_loss"], "samples": len(df),
                "samples_per_s": round(len(df) / sample_s, 2), "total_seconds": round(t1 - t0, 1),
                "plan_total": plan.total, "grids": str(out)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="sd", choices=["sd", "ddpm"])
    ap.add_argument("--full", action="store_true", help="sd: SD-1.5 architecture on a GPU, bf16")
    ap.add_argument("--n", type=int, help="sd: images per side")
    ap.add_argument("--batch", type=int, help="batch size")
    ap.add_argument("--steps", type=int, default=10, help="sd: denoising steps")
    ap.add_argument("--size", type=int, help="sd: pixels (default 32 tiny, 512 full)")
    ap.add_argument("--dataset", default="digits", help="ddpm: digits or fashion-mnist")
    ap.add_argument("--imbalance", type=float, default=10)
    ap.add_argument("--preset", default="fast", help="ddpm: tiny, fast, full")
    ap.add_argument("--budget", type=int, default=None, help="ddpm: cap on samples")
    args = ap.parse_args()
    res = bench_sd(args) if args.what == "sd" else bench_ddpm(args)
    for k, v in res.items():
        print(f"{k:>20}: {v}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"gen_{res['bench']}_{'full' if args.full else res.get('dataset', 'cpu')}.json"
    (RESULTS / name).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
