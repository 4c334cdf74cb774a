"""``tailforge train``: train one classifier on a run (real, or real + accepted synthetic samples)."""
from __future__ import annotations

import argparse

from tailforge.train.config import ClipOptions, LossAugOptions, TrainConfig, TransferOptions

from .cliutil import add_model_args, add_run_arg, build, console, given, load_yaml, section

# nested sections of TrainConfig with options of their own: --transfer-freeze-epochs, --clip-prompts, ...
NESTED = {"transfer": (TransferOptions, "transfer (two-phase fine-tuning of a --pretrained timm/torchvision "
                       "backbone)"),
          "lossaug": (LossAugOptions, "lossaug (--aug-policy loss_guided: per-sample RandAugment from the moving "
                      "loss)"),
          "clip": (ClipOptions, "clip (model clip_adapter: frozen CLIP from --pretrained DIR, zero-shot head + "
                   "linear adapter)")}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier (long-tail losses, samplers, cRT, distillation)",
        description="Train a classifier on the run's train split (plus accepted synthetic samples with "
        "--synthetic filtered), select the epoch by balanced accuracy on the val split, and write "
        "models/<name>/ (model.safetensors, config.json, log.jsonl, best.json). An interrupted training "
        "resumes from its last finished epoch when the same command is run again. With more than one visible GPU "
        "training runs under torchrun, one DDP process per GPU (--ddp off: one process; --nproc N with "
        "--device cpu: N CPU processes); --batch-size is the global batch. Pretrained models: --model clip-adapter "
        "--pretrained CLIP_DIR (frozen CLIP, zero-shot head from the class names, class-balanced linear adapter); "
        "--model NAME --pretrained WEIGHTS --transfer-freeze-epochs N (head first, then everything).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arg(p)
    p.add_argument("--name", metavar="NAME", help="model folder name (default: <model>-<loss>-<sampler>-s<seed>)")
    p.add_argument("--config", metavar="YAML", help="YAML file with a `train:` section (or top-level keys)")
    add_model_args(p, TrainConfig, group="training")
    for key, (model, title) in NESTED.items():
        group = p.add_argument_group(title)
        add_model_args(group, model, prefix=f"{key}_", group=False, skip=("prompts",))
    group.add_argument("--clip-prompts", dest="clip_prompts", type=_templates, default=argparse.SUPPRESS,
                       metavar="TEMPLATE", help="prompt template of the zero-shot head, {name} = the class name, e.g. "
                       "'a photo of the digit {name}.'; several as a YAML list: '[\"a {name}.\", \"a photo of a "
                       "{name}.\"]' (their text embeddings are averaged) [default: 'a photo of a {name}.']")
    p.set_defaults(func=run)


def _templates(text: str) -> list[str]:
    """One prompt template (commas are part of it), or a YAML list of them."""
    import yaml

    if text.strip().startswith("["):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a YAML list of templates") from None
    return [text]


def default_name(cfg: TrainConfig) -> str:
    stem = f"{cfg.base}-crt-{cfg.loss}" if cfg.stage == "crt" else f"{cfg.model}-{cfg.loss}-{cfg.sampler}"
    if cfg.synthetic != "none":
        stem += f"-{cfg.synthetic}"
    return f"{stem}-s{cfg.seed}"


def run(args) -> int:
    from tailforge.data import RunDir
    from tailforge.train import launch_fit
    from tailforge.train.trainer import check_names

    cfg = train_config(args)
    name = args.name or default_name(cfg)
    check_names(cfg)  # before the progress bar opens
    con = console()
    with _bar(cfg) as progress:
        path = launch_fit(RunDir(args.run), cfg, name, progress=progress)  # torchrun/DDP on >1 GPU
    from tailforge.data.atomic import read_json

    best = read_json(path / "best.json")
    con.print(f"wrote {path}: best epoch {best['epoch']}, val balanced accuracy {best['val_balanced_acc']:.4f} "
              f"(val top-1 {best['val_top1']:.4f})")
    return 0


def train_config(args) -> TrainConfig:
    """The `train:` section of --config under the options given; --transfer-*/--clip-* update its nested sections."""
    sec = section(load_yaml(args.config), "train", source=args.config, top_level=True)
    nested = {}
    for key, (model, _) in NESTED.items():
        opts = given(args, model, prefix=f"{key}_")
        if opts:
            base = sec.get(key) if isinstance(sec.get(key), dict) else {}
            nested[key] = {**base, **opts}
    return build(TrainConfig, sec, given(args, TrainConfig), nested, what="train config")


class _bar:
    """A rich progress bar fed by fit's ``progress(done, total, info)``: loss, lr, val metrics per epoch."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[info]}"))
        self.p.__enter__()
        self.task = self.p.add_task("train", total=None, info="")
        self.last = ""
        return self.update

    def update(self, done: int, total: int, info: dict) -> None:
        if info.get("event") == "epoch":
            self.last = (f"epoch {info['epoch']}/{self.cfg.epochs} val bal-acc {info['val_balanced_acc']:.3f} "
                         f"{info['images_per_s']:.0f} img/s")
            self.p.console.print(f"epoch {info['epoch']}: loss {info['train_loss']:.4f}, lr {info['lr']:.4g}, "
                                 f"val balanced acc {info['val_balanced_acc']:.4f}, top-1 {info['val_top1']:.4f}, "
                                 f"{info['images_per_s']:.0f} img/s")
        text = f"ep {info.get('epoch')} loss {info.get('loss', info.get('train_loss', 0)):.4f} | {self.last}"
        self.p.update(self.task, completed=done, total=total, info=text)

    def __exit__(self, *exc):
        self.p.__exit__(*exc)
        return False
