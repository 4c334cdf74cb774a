"""CLI plumbing shared by every subcommand.

Options are generated from the pydantic config models, so ``--help`` lists every field with its
description and default, and the CLI, YAML files and Prefect parameters share one schema.
"""
from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from tailforge.data.errors import TailforgeError, did_you_mean

from .config import RunConfig, load_yaml, validation_error  # noqa: F401 - load_yaml: the commands' helper


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_args(parser: argparse.ArgumentParser, model: type[BaseModel], *, skip: Iterable[str] = (),
                   prefix: str = "", group: str | None = None) -> None:
    """Add one option per field of ``model``. Unset options are absent from the namespace."""
    skip = set(skip)
    target = parser.add_argument_group(group or model.__name__) if group is not False else parser
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        ann = field.annotation
        origin = typing.get_origin(ann)
        args = typing.get_args(ann)
        default = field.get_default(call_default_factory=True)
        shown = default not in (None, ...) and default != []
        helptext = (field.description or "") + (f" [default: {default}]" if shown else "")
        kw: dict[str, Any] = dict(dest=prefix + name, default=argparse.SUPPRESS, help=helptext.replace("%", "%%"))
        if ann is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif ann in (int, float):
            kw["type"] = ann
            kw["metavar"] = ann.__name__.upper()
        elif origin is typing.Literal:
            kw["choices"] = list(args)
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            continue  # nested models: YAML only
        elif type(None) in args and any(a in (int, float) for a in args):
            num = next(a for a in args if a in (int, float))
            words = [w for a in args if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
            kw["type"] = _optional(num, words)
            kw["metavar"] = f"{num.__name__.upper()}|{'|'.join(words + ['none'])}"
            kw["help"] += " ('none' turns it off)"
        elif ann is Path or Path in args or ann is str:
            kw["type"] = str
            kw["metavar"] = "PATH" if ann is not str else "TEXT"
        else:
            kw["type"] = _loose
            kw["metavar"] = "VALUE"
        target.add_argument(_option(prefix + name), **kw)


def _optional(kind: type, words: list[str] | None = None):
    """Parse an optional number: 'none', 'null', 'off' -> None; one of ``words`` (a Literal's) -> itself."""

    def parse(text: str):
        if text.strip().lower() in ("none", "null", "off", "~"):
            return None
        if text.strip() in (words or ()):
            return text.strip()
        try:
            return kind(text)
        except ValueError:
            also = "".join(f", '{w}'" for w in words or ())
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}{also} or 'none', got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _loose(text: str) -> Any:
    """Parse an option value that is not a plain scalar: '1,2,3' -> [1, 2, 3], YAML otherwise."""
    if "," in text and not text.strip().startswith(("[", "{")):
        text = "[" + text + "]"
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None else value


def given(args: argparse.Namespace, model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """The fields of ``model`` that were given on the command line."""
    ns = vars(args)
    return {name: ns[prefix + name] for name in model.model_fields if prefix + name in ns}


def build(model: type[BaseModel], *layers: dict[str, Any], what: str | None = None):
    """Validate ``model`` from dict layers (later ones win) with a one-line error on failure."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is not None and not isinstance(layer, dict):
            raise TailforgeError(f"{what or model.__name__} must be a mapping of keys to values, "
                                 f"got {type(layer).__name__}", "write it as indented `key: value` lines")
        merged.update({k: v for k, v in (layer or {}).items()})
    check_keys(model, merged, what or model.__name__)
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise validation_error(exc, what or model.__name__) from None


def stage_config(args: argparse.Namespace, model: type[BaseModel], *names: str, top_level: bool = False,
                 prefix: str = "", file: dict[str, Any] | None = None):
    """A stage's config: its section (the first of ``names``) of the ``--config`` file, under the options
    given on the command line. ``file``: the already loaded ``--config`` file (a command with two sections)."""
    data = load_yaml(args.config) if file is None else file
    return build(model, section(data, *names, source=args.config, top_level=top_level),
                 given(args, model, prefix=prefix), what=f"{names[0]} config")


def check_keys(model: type[BaseModel], data: dict, what: str) -> None:
    valid = list(model.model_fields)
    for key in data:
        if key not in valid:
            raise TailforgeError(f"unknown key '{key}' in {what}", did_you_mean(key, valid) + "valid keys: "
                                 + ", ".join(valid))


def section(data: dict[str, Any], *names: str, source: str | Path | None = None,
            top_level: bool = False) -> dict[str, Any]:
    """The part of a stage's ``--config`` file for that stage: the first of ``names`` present.

    The file may be a whole run config (``config.yaml`` of a run folder): the other sections are ignored,
    but a key that is no section at all (a typo such as ``dta:``) is an error, and so is a section that
    is not a mapping. ``top_level``: a file with none of ``names`` holds the stage's keys directly.
    """
    where = f"config file {source}" if source else "the config file"
    present = [n for n in names if n in data]
    if not present and top_level and not set(data) <= set(RunConfig.model_fields):
        for key, value in data.items():  # `trian:` holding a mapping is a misspelt section, not a stage key
            close = did_you_mean(key, names, cutoff=0.7)
            if close and isinstance(value, dict):
                raise TailforgeError(f"unknown section '{key}' in {where}", close.strip())
        return data
    valid = list(RunConfig.model_fields) + [n for n in names if n not in RunConfig.model_fields]
    for key in data:
        if key not in valid:
            raise TailforgeError(f"unknown section '{key}' in {where}",
                                 did_you_mean(key, valid) + "sections: " + ", ".join(valid))
    if not present:
        return {}
    value = data[present[0]]
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TailforgeError(f"section '{present[0]}' of {where} must be a mapping of keys to values, "
                             f"got {type(value).__name__}", f"write it as `{present[0]}:` followed by indented "
                             "`key: value` lines")
    return value


def add_run_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--run", required=required, type=Path, metavar="DIR",
                        help="run folder (created if missing), e.g. runs/fmnist-lt")


def console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)
