"""``RunConfig``: every stage's config in one validated model.

It is the single parameter of the ``rebalance`` and ``benchmark`` flows (the Prefect UI shows its
fields and descriptions as a form), it loads from YAML for ``tailforge run --config``, and it is
written to the run folder as ``config.yaml``. A later run on the same folder must not contradict
the settings that produced the outputs already there (``check_run_folder``).
"""
from __future__ import annotations

import importlib
import re
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tailforge.data import DataConfig, MeasureConfig, RunDir, TailforgeError
from tailforge.data.export import ExportConfig
from tailforge.data.errors import did_you_mean
from tailforge.data.atomic import write_text

DEFAULT_YAML = Path(__file__).with_name("default.yaml")


# YAML files and pydantic errors -> one-line TailforgeError (here, below the CLI plumbing that uses them too)

def validation_error(exc: ValidationError, what: str) -> TailforgeError:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    if not loc:  # a rule across sections: its message names the keys and the fix
        return TailforgeError(f"invalid {what}: {msg}{extra}")
    return TailforgeError(f"invalid {what}: {loc}: {msg}{extra}", f"correct '{loc}' in the config or option")


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if path.is_dir():
        raise TailforgeError(f"config file {path} is a folder", "pass a YAML file to --config")
    if not path.is_file():
        raise TailforgeError(f"config file {path} does not exist", "pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise TailforgeError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})",
                             "pass a YAML text file saved as UTF-8") from None
    except OSError as exc:
        raise TailforgeError(f"cannot read config file {path} ({exc.strerror})",
                             "check its permissions, or pass another file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise TailforgeError(f"config file {path} is not valid YAML{where}: {problem}",
                             "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TailforgeError(f"config file {path} must hold a mapping of keys to values",
                             "write it as `key: value` lines")
    return data


class _Pending(BaseModel):
    """Stand-in for a stage config whose package is not installed yet (keeps RunConfig importable)."""

    model_config = ConfigDict(extra="allow")


def _stage_model(module: str, name: str) -> type[BaseModel]:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return _Pending


PlanConfig = _stage_model("tailforge.gen.config", "PlanConfig")
GenerateConfig = _stage_model("tailforge.gen.config", "GenerateConfig")
FilterConfig = _stage_model("tailforge.eval.filter", "FilterConfig")
TrainConfig = _stage_model("tailforge.train.config", "TrainConfig")
EvalConfig = _stage_model("tailforge.eval.config", "EvalConfig")
CompareConfig = _stage_model("tailforge.eval.config", "CompareConfig")


class RunnerConfig(BaseModel):
    """Where the tasks run: threads in this process, or a Dask cluster (prefect-dask)."""

    model_config = ConfigDict(extra="forbid")

    runner: Literal["thread", "dask"] = Field(
        "thread", description="task runner of the generation shards: thread (this process) or dask "
        "(prefect-dask: a local cluster, or the scheduler at `address`)")
    workers: Union[int, None] = Field(
        None, ge=1, description="parallel shard workers (default: 1 thread on CPU; dask: one worker per GPU, "
        "else 2)")
    address: Union[str, None] = Field(None, description="dask: address of an existing scheduler, e.g. "
                                      "tcp://10.0.0.5:8786 (default: start a local cluster)")
    shard_retries: int = Field(2, ge=0, description="retries of a failed generation work unit (its finished shards are kept)")


class TrackConfig(BaseModel):
    """Where training curves and results go besides the run folder and Prefect (docs/tracking.md)."""

    model_config = ConfigDict(extra="forbid")

    tensorboard: bool = Field(True, description="TensorBoard event files of every trained model in "
                              "models/<name>/tb/ (loss, lr, val metrics each epoch; the val confusion matrix)")
    mlflow: Union[str, None] = Field(
        None, description="log the benchmark to MLflow: null (off); local (a store inside the run folder, "
        "<run>/mlruns/mlflow.db); or a tracking URI (http://host:5000, sqlite:////abs/mlflow.db, databricks). "
        "One parent run per flow run, one child run per trained model. Needs `pip install 'tailforge[track]'`")
    experiment: str = Field("tailforge", min_length=1, description="MLflow experiment of the runs")

    @field_validator("mlflow", mode="before")
    @classmethod
    def _uri(cls, v):
        if v is None or v is False:
            return None
        v = str(v).strip()
        if v.lower() in ("", "null", "none", "off"):
            return None
        if v.lower() == "local" or v == "databricks" or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", v) or \
                v.startswith("databricks://"):
            return "local" if v.lower() == "local" else v
        raise ValueError(f"'{v}' is not an MLflow tracking URI: use local (a store inside the run folder), or a URI "
                         "such as http://host:5000 or sqlite:////abs/path/mlflow.db")


FEATURE_GENERATORS = ("featdict", "featcov", "fdiff")  # generators whose samples are feature vectors


class RecipeConfig(BaseModel):
    """The rebalancing recipe. It is trained twice with the same settings, seed and budget: on real data
    only (the `real-only` arm, the control that matters) and on real + synthetic data (`rebalanced`).
    Empty fields take the value of `train`."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["full", "crt"] = Field(
        "crt", description="crt: classifier re-training on the frozen backbone of the baseline (Kang et al. 2020; "
        "feature generators need it); full: train the whole model again")
    loss: Union[str, None] = Field("ce", description="loss of the recipe (default: train.loss)")
    sampler: Union[str, None] = Field("class_balanced", description="sampler of the recipe (default: train.sampler)")
    epochs: Union[int, None] = Field(10, ge=1, description="epochs of the recipe (default: train.epochs)")
    lr: Union[float, None] = Field(None, gt=0, description="peak learning rate (default: train.lr)")
    prior: Literal["all", "real"] = Field("all", description="class counts of the loss's prior: all training "
                                          "samples or the real ones only (see train.prior)")
    backbone_sampler: Union[str, None] = Field(
        None, description="stage crt: train the frozen backbone of both arms like the baseline (`train`, real data) "
        "but with this sampler (e.g. class_balanced), as models/<backbone>; feature generators and the filter's "
        "classifier embedder then use it. None: the baseline's backbone. class_balanced was chosen on VAL: "
        "bench/results/balanced_backbone.md")
    backbone_aug_policy: Union[Literal["none", "loss_guided"], None] = Field(
        None, description="stage crt with backbone_sampler: the augmentation policy of the recipe's backbone training "
        "(see train.aug_policy; loss_guided: per-sample RandAugment from the moving loss, train/lossaug.py). None: "
        "train.aug_policy")
    synthetic: Literal["filtered", "candidates"] = Field(
        "filtered", description="synthetic data of the rebalanced arm: the filter's accepted samples, or every "
        "candidate (the no-filter control)")
    synthetic_weight: float = Field(1.0, ge=0, description="loss weight of a synthetic sample (real: 1)")
    epoch_samples: Literal["data", "balanced"] = Field(
        "balanced", description="samples per epoch (see train.epoch_samples): balanced gives real-only and "
        "rebalanced the same number of optimizer steps; data lets the larger synthetic set train longer (an "
        "unfair advantage that once looked like a +2-point gain: bench/results/feature_study.md)")

    tau_norm: Union[float, Literal["val"], None] = Field(
        None, description="tau-normalise the recipe's linear head after training (see train.tau_norm; the head "
        "taunorm sets val)")
    candidates: Union[list[str], None] = Field(
        None, description="stage crt: the real-only candidates, heads of train/heads.py (crt, la, taunorm), each "
        "trained on the real features at the recipe's budget as models/real-only-<head>; the best on VAL (balanced "
        "accuracy) sets loss, sampler and tau_norm of every arm (real-only, rebalanced, oracle), and the report names "
        "it (eval/candidates.json). None: the recipe as given")

    @field_validator("candidates", mode="before")
    @classmethod
    def _heads(cls, v):
        from tailforge.train.heads import HEADS

        v = [v] if isinstance(v, str) else v
        for h in v or []:
            if h not in HEADS:
                raise ValueError(f"recipe.candidates: unknown head '{h}': " + did_you_mean(h, list(HEADS), cutoff=0.5)
                                 + "heads: " + ", ".join(HEADS))
        if v is not None and not v:
            raise ValueError("recipe.candidates is empty: name at least one head (crt, la, taunorm), or null")
        return v

    def with_head(self, head: str) -> "RecipeConfig":
        """This recipe with the settings of the named head (train/heads.py ``HEADS``)."""
        from tailforge.train.heads import HEADS

        return self.model_copy(update=HEADS[head])

    def train_config(self, train: BaseModel, base: str, synthetic: str, source: str | None = None) -> BaseModel:
        upd = {"stage": self.stage, "prior": self.prior, "synthetic": synthetic, "epoch_samples": self.epoch_samples,
               "synthetic_weight": self.synthetic_weight, "base": base if self.stage == "crt" else None,
               "synthetic_source": source if synthetic != "none" else None, "tau_norm": self.tau_norm}
        for k in ("loss", "sampler", "epochs", "lr"):
            if getattr(self, k) is not None:
                upd[k] = getattr(self, k)
        if self.stage == "crt":  # a head on cached features: no teacher or distillation, no image augmentation,
            # no CLIP stage 1
            upd.update(teacher=None, kd=None, kd_patch=0.0, kd_group_weights=None, aug_policy="none",
                       clip_stage1="none")
        return _with(train, **upd)


class RunConfig(BaseModel):
    """One run of tailforge: dataset, long tail, plan, generator, filter, training and evaluation."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field("runs/digits-lt", description="run folder (created if missing)")
    data: DataConfig = Field(default_factory=DataConfig, description="dataset and long-tail construction")
    measure: MeasureConfig = Field(default_factory=MeasureConfig, description="many/medium/few group thresholds")
    plan: PlanConfig = Field(default_factory=PlanConfig, description="how many samples each class gets")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="generator and its options")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="embedding filter of the candidates")
    train: TrainConfig = Field(default_factory=TrainConfig, description="classifier training (baseline and "
                               "rebalanced use the same settings, seed and budget; only the data differs)")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="evaluation of both models (its `split` "
                                 "is the one reported; model selection always uses val)")
    compare: CompareConfig = Field(default_factory=CompareConfig, description="the comparison report (its split "
                                   "and baseline follow `evaluate.split` and `baseline`)")
    recipe: RecipeConfig = Field(default_factory=RecipeConfig, description="the rebalancing recipe, trained on "
                                 "real data only (real-only) and on real + synthetic data (rebalanced)")
    baseline: str = Field("baseline", description="model name of the baseline: real data, `train` as given "
                          "(plain CE by default); also the backbone of the crt recipe and the feature space "
                          "of feature generators")
    real_only: str = Field("real-only", description="model name of the recipe trained on real data only")
    backbone: str = Field("backbone", description="model name of the recipe's own frozen backbone (trained only "
                          "when recipe.backbone_sampler is set)")
    rebalanced: str = Field("rebalanced", description="model name of the recipe trained on real + "
                            "accepted synthetic data")
    oracle: str = Field("oracle", description="model name of the recipe trained on real + the long tail's held-back "
                        "real train images (a perfect generator: compare.oracle)")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="task runner")
    track: TrackConfig = Field(default_factory=TrackConfig, description="TensorBoard and MLflow (where the "
                               "curves and results also go; eval/tracking.json says where)")
    export: ExportConfig = Field(default_factory=ExportConfig, description="the rebalanced dataset out for other "
                                 "trainers, after the filter (tailforge export): off while `to` is null")

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.run)

    @property
    def eval_split(self) -> str:
        return getattr(self.evaluate, "split", "test")

    @property
    def crt_base(self) -> str:
        """The model whose frozen backbone the crt recipe re-trains on (the real-only arm's, and the feature
        generators' space): the recipe's own backbone when ``recipe.backbone_sampler`` is set, else the baseline."""
        if self.recipe.stage == "crt" and self.recipe.backbone_sampler:
            return self.backbone
        return self.baseline

    def own_backbone(self, synthetic: str, generator: str | None = None) -> bool:
        """Whether an arm on real + ``synthetic`` data (of ``generator``, default the run's) trains its own
        backbone: with recipe.backbone_sampler, synthetic IMAGES shape the backbone too (synthetic features can
        only reach the head)."""
        gen = generator or getattr(self.generate, "generator", None)
        return synthetic != "none" and self.crt_base != self.baseline and gen not in FEATURE_GENERATORS

    def arm_trainings(self, name: str, synthetic: str, generator: str | None = None,
                      source: str | None = None) -> list[tuple[str, BaseModel]]:
        """(model name, train config) in order for the recipe arm ``name`` on real + ``synthetic`` data
        (none: the real-only arm) of ``generator`` (default: the run's) read from ``source`` (default: the run's
        own candidates): its own backbone first when ``own_backbone``, then the recipe."""
        if not self.own_backbone(synthetic, generator):
            return [(name, self.recipe.train_config(self.train, self.crt_base, synthetic, source))]
        bb = f"{self.backbone}-{name}"
        return [(bb, self.backbone_train(synthetic, source)),
                (name, self.recipe.train_config(self.train, bb, synthetic, source))]

    def oracle_trainings(self) -> list[tuple[str, BaseModel]]:
        """The oracle arm: the recipe on real + the held-back real images (sources/oracle/), trained exactly like
        an image generator's rebalanced arm (its own backbone with recipe.backbone_sampler, then the recipe)."""
        return self.arm_trainings(self.oracle, self.recipe.synthetic, "oracle", "oracle")

    def headroom_trainings(self, fraction: float) -> list[tuple[str, BaseModel]]:
        """One point of headroom's learning curve: the real-only arm with the plan's topped-up classes thinned to
        ``fraction`` of their real train images, at the same steps. It re-trains exactly what the oracle arm
        re-trains: its own backbone and the recipe where the oracle has its own backbone (recipe.backbone_sampler),
        else the recipe alone on the real-only arm's backbone (a head-level oracle: the pretrained recipe)."""
        tag = f"headroom-f{round(100 * fraction):02d}"
        recipe = _with(self.real_only_train(), tail_fraction=fraction)
        if self.recipe.stage != "crt" or not self.own_backbone(self.recipe.synthetic, "oracle"):
            return [(tag, recipe)]
        bb = f"{tag}-backbone"
        base = self.backbone_train() if self.crt_base != self.baseline else self.baseline_train()
        return [(bb, _with(base, tail_fraction=fraction)), (tag, _with(recipe, base=bb))]

    def with_head(self, head: str) -> "RunConfig":
        """This run with the recipe's head set to ``head`` (the real-only candidate chosen on VAL)."""
        return self.model_copy(update={"recipe": self.recipe.with_head(head)})

    def candidate_name(self, head: str) -> str:
        return f"{self.real_only}-{head}"

    def rebalanced_train(self) -> BaseModel:
        """The rebalanced arm: the recipe on real + synthetic data (``recipe.synthetic``)."""
        return self.arm_trainings(self.rebalanced, self.recipe.synthetic)[-1][1]

    def real_only_train(self) -> BaseModel:
        """The real-only arm: the same recipe, settings, seed and budget on real data only."""
        return self.recipe.train_config(self.train, self.crt_base, "none")

    def baseline_train(self) -> BaseModel:
        return _with(self.train, synthetic="none")

    def backbone_train(self, synthetic: str = "none", source: str | None = None) -> BaseModel:
        """The recipe's backbone: the baseline's settings and budget (epoch_samples: real) with
        ``recipe.backbone_sampler``, on real (+ ``synthetic``, from ``source``) data."""
        upd = {} if self.recipe.backbone_aug_policy is None else {"aug_policy": self.recipe.backbone_aug_policy}
        return _with(self.train, synthetic=synthetic, sampler=self.recipe.backbone_sampler, epoch_samples="real",
                     synthetic_weight=self.recipe.synthetic_weight,
                     synthetic_source=source if synthetic != "none" else None, **upd)

    def filter_config(self) -> BaseModel:
        """The filter's settings; its classifier embedder defaults to the recipe's backbone."""
        if getattr(self.filter, "model", "x") is None and self.crt_base != self.baseline:
            return self.filter.model_copy(update={"model": self.crt_base})
        return self.filter

    @model_validator(mode="after")
    def _track(self) -> "RunConfig":
        """``track.tensorboard: false`` turns the event files off for every model the run trains."""
        if not self.track.tensorboard and getattr(self.train, "tensorboard", False):
            self.train = _with(self.train, tensorboard=False)
        return self

    @model_validator(mode="after")
    def _routable(self) -> "RunConfig":
        gen = getattr(self.generate, "generator", None)
        if gen in FEATURE_GENERATORS and self.recipe.stage != "crt":
            raise ValueError(f"generator '{gen}' makes feature vectors, which only classifier re-training can use, "
                             "but recipe.stage is 'full': set recipe.stage: crt (flows/recipes/small-images.yaml "
                             "does), or generate images (ddpm, sd)")
        if self.recipe.candidates and self.recipe.stage != "crt":
            raise ValueError("recipe.candidates are heads on the frozen features of the crt recipe, but recipe.stage is "
                             "'full': set recipe.stage: crt, or drop them (--set recipe.candidates=null)")
        bs = self.recipe.backbone_sampler
        if bs is not None:
            if self.recipe.stage != "crt":
                raise ValueError("recipe.backbone_sampler is the sampler of the crt recipe's frozen backbone, but "
                                 "recipe.stage is 'full': set recipe.stage: crt, or drop it (--set recipe.backbone_sampler=null)")
            from tailforge.train.samplers import SAMPLERS

            if bs not in SAMPLERS:
                raise ValueError(f"recipe.backbone_sampler '{bs}' is not a sampler: "
                                 + did_you_mean(bs, list(SAMPLERS), cutoff=0.5) + "samplers: " + ", ".join(SAMPLERS))
        if self.recipe.backbone_aug_policy is not None and bs is None:
            raise ValueError("recipe.backbone_aug_policy is the augmentation of the recipe's own backbone, which is "
                             "trained only with recipe.backbone_sampler: set it (e.g. class_balanced), or use "
                             "train.aug_policy (the baseline, which is then the backbone)")
        space = getattr(self.generate, "feature_model", None)
        if gen in FEATURE_GENERATORS and space not in (None, self.crt_base):
            raise ValueError(f"generator '{gen}' samples the feature space of model '{space}', but the recipe "
                             f"re-trains on the backbone of '{self.crt_base}': set generate.feature_model: "
                             f"{self.crt_base}")
        names = {self.baseline, self.real_only, self.rebalanced, self.oracle}
        names |= {self.backbone, f"{self.backbone}-{self.rebalanced}", f"{self.backbone}-{self.oracle}"} if bs else set()
        if len(names) < (7 if bs else 4):
            raise ValueError("baseline, real_only, rebalanced, oracle (and backbone) must be different model names")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


def _with(model: BaseModel, **changes) -> BaseModel:
    fields = getattr(type(model), "model_fields", {})
    ok = {k: v for k, v in changes.items() if k in fields or isinstance(model, _Pending)}
    return model.model_copy(update=ok)


# --------------------------------------------------------------------------- loading and validation

def check_tree(model: type[BaseModel], data: Any, where: str, source: str) -> None:
    """Unknown keys anywhere in a nested config -> one error naming the key and its nearest valid one."""
    if not isinstance(data, dict) or model is _Pending:
        return
    fields = model.model_fields
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            valid = list(fields)
            hint = did_you_mean(key, valid, cutoff=0.5) + f"valid keys{' of ' + where if where else ''}: " \
                + ", ".join(valid)
            raise TailforgeError(f"unknown key '{path}' in {source}", hint)
        sub = _nested_model(fields[key].annotation)
        if sub is not None:
            check_tree(sub, value, path, source)


def _nested_model(ann) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(items: list[str] | None) -> dict:
    """``["train.epochs=3", "data.dataset=digits"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise TailforgeError(f"--set '{item}' is not of the form key.path=value", "write e.g. --set train.epochs=3")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise TailforgeError(f"--set '{item}': the value is not valid YAML",
                                 "quote it, e.g. --set 'generate.sd.sd_prompt=\"a photo: a {class}\"'") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """The run config: ``path`` (default: the embedded digits config) with ``overrides`` on top.

    A user YAML is read on top of the model defaults; every key is checked before anything runs.
    """
    source = str(path) if path else "the embedded default config"
    data = load_yaml(path if path else DEFAULT_YAML)
    check_tree(RunConfig, data, "", source)
    data = _merge(data, overrides or {})
    check_tree(RunConfig, data, "", "the command-line options")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, f"config ({source})") from None


# --------------------------------------------------------------------------- the run folder

# section of the config -> (files whose presence means the section already shaped the run folder)
OUTPUTS = {
    "data": ("real.parquet",),
    "measure": ("counts.json",),
    "plan": ("plan.json",),
    "generate": ("candidates.parquet",),
    "filter": ("filtered.parquet",),
    "train": ("models",),
}
# settings that never change results: they may differ between runs on one folder
NEUTRAL = {"device", "resume", "overwrite", "eval_batch_size", "batch_size_eval", "workers", "num_workers", "ddp",
           "nproc", "tensorboard"}


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if k in NEUTRAL or k not in old:  # absent: the folder predates that option (stamps still decide)
                continue
            out += _diff(old.get(k), new.get(k), f"{path}.{k}")
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def check_run_folder(cfg: RunConfig) -> None:
    """Refuse a config that contradicts outputs already in the run folder (before any work starts)."""
    run = cfg.run_dir
    from tailforge.data.export import check_destination

    check_destination(run, cfg.export)  # export.to: refused now, not after the filter
    if not run.config.exists():
        return
    try:
        old = yaml.safe_load(run.config.read_text()) or {}
    except yaml.YAMLError:
        raise TailforgeError(f"{run.config} is not valid YAML", "delete it, or choose a new run folder") from None
    new = cfg.model_dump(mode="json")
    for section, files in OUTPUTS.items():
        if not any((run.root / f).exists() for f in files):
            continue
        if section == "train" and getattr(cfg.train, "overwrite", False):
            continue
        diffs = _diff(old.get(section), new.get(section), section)
        if diffs:
            more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
            raise TailforgeError(
                f"config contradicts run folder {run.root}, whose {section} outputs were made with other "
                f"settings: {diffs[0]}{more}",
                f"use the settings in {run.config}, or choose a new run folder (--run)")


def write_config(cfg: RunConfig) -> Path:
    """Write the resolved config to ``config.yaml`` atomically."""
    cfg.run_dir.root.mkdir(parents=True, exist_ok=True)
    return write_text(cfg.run_dir.config, cfg.to_yaml())
