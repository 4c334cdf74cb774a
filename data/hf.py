"""``data.dataset: hf``: a local Hugging Face dataset, read with pyarrow (the ``datasets`` library only for other
layouts). Nothing is downloaded: a hub id without a local copy is a one-line error saying how to make one.

Layouts read without ``datasets``:

1. a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``, one folder per split with ``state.json``,
   ``dataset_info.json`` and ``data-*.arrow``); a single ``Dataset.save_to_disk`` folder is one unsplit set;
2. a folder of parquet (or arrow) shards, the hub's layout (``data/train-00000-of-00002.parquet``) or any other:
   a file's split is the first folder or file-name word that names one (``train``; ``val``, ``valid``,
   ``validation``, ``dev``; ``test``); files that name none are one unsplit set.

The columns: ``data.image_column`` and ``data.label_column``, by default the ``Image`` and the ``ClassLabel``
feature of the features the files record (a column named ``label`` / ``labels`` otherwise; class names from the
ClassLabel, else the label ids, or the sorted label strings). Images (bytes, or a path for files that store
one) are decoded into one uint8 array per split, at their own size when all share one, else resized to
``data.image_size`` (default 64); one channel when every image is grey. The dataset's own splits are kept as
they are (``profile: none`` unless asked); without val or test they are held out as for other datasets.
"""
from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .config import DataConfig
from .errors import TailforgeError
from .images import MAX_PIXELS, to_array

if TYPE_CHECKING:
    import pyarrow as pa

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
INSTALL = "pip install 'tailforge[hf]'"
DEFAULT_SIZE = 64


def hf_root(cfg: DataConfig) -> Path:
    """The local folder of the dataset; a hub id (``user/name``) that is not a local folder is refused."""
    if cfg.root is None:
        raise TailforgeError("dataset 'hf' needs data.root: a local Hugging Face dataset folder (save_to_disk or "
                             "parquet shards)", "--set data.root=DIR")
    text = str(cfg.root)
    root = Path(text).expanduser()
    if root.is_dir():
        return root
    if HUB_ID.fullmatch(text) and not root.exists():
        raise TailforgeError(
            f"'{text}' is not a local folder; tailforge downloads nothing (a Hugging Face hub id needs a local copy)",
            f"on a connected machine run python -c \"import datasets; datasets.load_dataset('{text}')"
            ".save_to_disk('DIR')\", copy DIR here and --set data.root=DIR")
    raise TailforgeError(f"dataset root {root} does not exist or is not a folder",
                         "pass a save_to_disk folder or a folder of parquet shards as data.root")


# --------------------------------------------------------------------------- finding the tables

class Part:
    """One file of a split: how to read it as an arrow table, and its recorded features (or None)."""

    def __init__(self, path: Path, read: Callable[[], "pa.Table"], features: dict | None, base: Path):
        self.path, self.read, self.features, self.base = path, read, features, base

    @classmethod
    def file(cls, path: Path, features: dict | None, base: Path) -> "Part":
        reader = _read_parquet if path.suffix == ".parquet" else _read_arrow
        return cls(path, lambda: reader(path), features, base)


def _features_of(schema) -> dict | None:
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return None
    try:
        return json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None


def _read_arrow(path: Path):
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_file(src).read_all()


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _saved(folder: Path, split: str) -> list[Part]:
    """The arrow files of one ``Dataset.save_to_disk`` folder."""
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        files = sorted(folder.glob("*.arrow"))
    feats = None
    if (folder / "dataset_info.json").is_file():
        try:
            feats = json.loads((folder / "dataset_info.json").read_text()).get("features")
        except ValueError:
            feats = None
    if not files:
        raise TailforgeError(f"save_to_disk folder {folder} holds no .arrow files", "save the dataset again")
    return [Part.file(f, feats, folder) for f in files]


def split_of(rel: Path) -> str | None:
    """The split a file names: the first folder or file-name word that is a split name."""
    for part in rel.parts[:-1]:
        if part.lower() in SPLIT_WORDS:
            return SPLIT_WORDS[part.lower()]
    for word in re.split(r"[-._ 0-9]+", rel.stem.lower()):
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    return None


def find_parts(root: Path) -> dict[str, list[Part]] | None:
    """``{split: [Part]}`` of the layouts read without ``datasets``; None when the folder is none of them."""
    if (root / "dataset_dict.json").is_file():
        try:
            names = json.loads((root / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError):
            raise TailforgeError(f"{root / 'dataset_dict.json'} is not a save_to_disk record",
                                 "save the dataset again with save_to_disk") from None
        out: dict[str, list[Part]] = {}
        for name in names:
            split = SPLIT_WORDS.get(str(name).lower())
            if split is None:
                continue  # e.g. an "unsupervised" split: no labels to train on
            out.setdefault(split, []).extend(_saved(root / name, split))
        return out
    if (root / "state.json").is_file():
        return {"all": _saved(root, "all")}
    files = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".arrow") and p.is_file()
                   and not any(s.startswith(".") for s in p.relative_to(root).parts))
    if not files:
        return None
    out = {}
    unnamed = []
    for f in files:
        split = split_of(f.relative_to(root))
        part = Part.file(f, None, f.parent)
        if split is None:
            unnamed.append(part)
        else:
            out.setdefault(split, []).append(part)
    if unnamed and out:
        raise TailforgeError(f"{unnamed[0].path} names no split, but other files do ({', '.join(sorted(out))})",
                             "name every file (or its folder) train, validation or test, or move it out")
    return out or {"all": unnamed}


def _with_datasets(root: Path) -> dict[str, list[Part]]:
    """Other layouts (an image folder with metadata.csv, csv or json files): ``datasets.load_dataset``, offline."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise TailforgeError(f"{root} holds no parquet or arrow shards and no save_to_disk folder; reading other "
                             "layouts needs the datasets library",
                             f"{INSTALL}, or save the dataset with save_to_disk or as parquet shards") from None
    try:
        dd = datasets.load_dataset(str(root))
    except Exception as exc:  # the builders raise many types
        raise TailforgeError(f"the datasets library could not read {root} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})",
                             "save the dataset with save_to_disk or as parquet shards and pass that folder") from None
    out: dict[str, list[Part]] = {}
    for name, ds in dd.items():
        split = SPLIT_WORDS.get(str(name).lower())
        if split is not None:
            table, feats = ds.data.table, ds.features.to_dict()
            out.setdefault(split, []).append(Part(root / str(name), lambda t=table: t, feats, root))
    return out


# --------------------------------------------------------------------------- columns

def _is_image_type(t) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
        pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)


def pick_columns(cfg: DataConfig, schema, feats: dict | None, where: Path) -> tuple[str, str]:
    """(image column, label column): the configured ones, else the Image and ClassLabel features."""
    cols = list(schema.names)
    feats = feats or {}

    def check(name: str, key: str) -> str:
        if name not in cols:
            from .errors import did_you_mean

            raise TailforgeError(f"{where} has no column '{name}' (data.{key})",
                                 did_you_mean(name, cols) + "columns: " + ", ".join(cols))
        return name

    if cfg.image_column:
        image = check(cfg.image_column, "image_column")
    else:
        found = [c for c in cols if (feats.get(c) or {}).get("_type") == "Image"]
        found = found or [c for c in cols if _is_image_type(schema.field(c).type)]
        if len(found) != 1:
            what = "no Image column" if not found else f"several image columns ({', '.join(found)})"
            raise TailforgeError(f"{where} has {what}", "name it with --set data.image_column=COLUMN (columns: "
                                 + ", ".join(cols) + ")")
        image = found[0]
    if cfg.label_column:
        label = check(cfg.label_column, "label_column")
    else:
        found = [c for c in cols if (feats.get(c) or {}).get("_type") == "ClassLabel"]
        if len(found) > 1:
            found = [c for c in found if c in ("label", "labels")] or found
        found = found or [c for c in cols if c in ("label", "labels")]
        if len(found) != 1:
            what = "no ClassLabel column" if not found else f"several ClassLabel columns ({', '.join(found)})"
            raise TailforgeError(f"{where} has {what}", "name it with --set data.label_column=COLUMN (columns: "
                                 + ", ".join(cols) + ")")
        label = found[0]
    return image, label


# --------------------------------------------------------------------------- images

def _blob(cell, base: Path, root: Path) -> bytes:
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        path = cell.get("path")
        if path:
            for p in (Path(path), base / path, root / path):
                if p.is_file():
                    return p.read_bytes()
            raise TailforgeError(f"image file {path} (named by the dataset) does not exist",
                                 "save the dataset with its image bytes (save_to_disk embeds them)")
    raise TailforgeError("an image cell holds neither bytes nor a path", "check data.image_column")


def _open(blob: bytes):
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(blob))


class _Bad(Exception):
    pass


def _header(blob: bytes) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    try:
        im = _open(blob)
        return im.mode, (im.height, im.width)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Bad(f"larger than {MAX_PIXELS:,} pixels (decompression-bomb limit)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _Bad(f"not an image ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- the loader

def read_hf(cfg: DataConfig) -> dict:
    """What ``DATASETS["hf"]`` makes a ``RawDataset`` of: ``names``, ``splits`` ({split: (labels, uint8 images)}),
    ``channels``, ``image_size``, ``root`` and ``skipped``."""
    root = hf_root(cfg)
    parts = find_parts(root)
    if parts is None:
        parts = _with_datasets(root)
    if not parts:
        raise TailforgeError(f"{root} holds no train, validation or test split", "save the dataset with its splits")
    if "all" not in parts and "train" not in parts:
        raise TailforgeError(f"{root} has the splits {', '.join(sorted(parts))} but no train split",
                             "name the training files (or folder) train")
    if "all" not in parts and len(parts) == 1:
        parts = {"all": parts["train"]}  # train alone: split 70/15/15 like a dataset without splits

    import pyarrow as pa

    first = parts.get("train", parts.get("all"))[0]
    feats = first.features
    tables: dict[str, "pa.Table"] = {}
    for split, ps in parts.items():
        ts = []
        for p in ps:
            try:
                t = p.read()
            except (pa.ArrowException, OSError) as exc:
                raise TailforgeError(f"{p.path} is not a readable {p.path.suffix[1:] or 'arrow'} file ({exc})",
                                     "replace the file, or save the dataset again") from None
            feats = feats or _features_of(t.schema)  # the features the files record (parquet / arrow metadata)
            ts.append(t.replace_schema_metadata(None))
        tables[split] = pa.concat_tables(ts, promote_options="default")
    image_col, label_col = pick_columns(cfg, tables[next(iter(tables))].schema, feats, first.path)

    # labels and class names
    lab_feat = (feats or {}).get(label_col) or {}
    names = [str(n) for n in lab_feat.get("names", [])] if lab_feat.get("_type") == "ClassLabel" else None
    raw_labels = {s: t.column(label_col).to_pylist() for s, t in tables.items()}
    if names is None:
        values = [v for vs in raw_labels.values() for v in vs if v is not None]
        if values and all(isinstance(v, str) for v in values):
            names = sorted(set(values))
            index = {n: i for i, n in enumerate(names)}
            raw_labels = {s: [index.get(v, -1) if v is not None else -1 for v in vs] for s, vs in raw_labels.items()}
        else:
            top = max((int(v) for v in values), default=-1)
            names = [str(i) for i in range(top + 1)]
    labels = {}
    for s, vs in raw_labels.items():
        arr = np.asarray([-1 if v is None else int(v) for v in vs], dtype=np.int64)
        bad = np.flatnonzero((arr < 0) | (arr >= len(names)))
        if bad.size:
            raise TailforgeError(f"split {s} of {root} has {bad.size} rows whose label is missing or outside the "
                                 f"{len(names)} classes (row {int(bad[0])}: {vs[int(bad[0])]!r})",
                                 "keep labelled splits only (a test split without labels cannot be measured)")
        labels[s] = arr

    # images: headers first (mode and size), then one decode each into the split's array
    skipped: list[str] = []
    blobs, modes, sizes = {}, set(), set()
    base = {s: parts[s][0].base for s in parts}
    for s, t in tables.items():
        keep, bl = [], []
        for i, cell in enumerate(t.column(image_col).to_pylist()):
            try:
                b = _blob(cell, base[s], root)
                mode, size = _header(b)
            except (_Bad, TailforgeError) as exc:
                msg = exc.problem if isinstance(exc, TailforgeError) else str(exc)
                if not cfg.skip_bad:
                    raise TailforgeError(f"image of row {i} of split {s} in {root} is {msg}" if isinstance(exc, _Bad)
                                         else f"row {i} of split {s} in {root}: {msg}",
                                         "remove or replace it, or pass --skip-bad to leave it out") from None
                skipped.append(f"{s}[{i}]\t{msg}")
                continue
            keep.append(i)
            bl.append(b)
            modes.add(mode)
            sizes.add(size)
        blobs[s] = bl
        labels[s] = labels[s][keep]
    channels = 1 if modes and modes <= GREY_MODES else 3
    native = next(iter(sizes)) if len(sizes) == 1 else None
    size = native or (cfg.image_size or DEFAULT_SIZE,) * 2
    splits = {}
    for s, bl in blobs.items():
        out = np.empty((len(bl), size[0], size[1], channels), dtype=np.uint8)
        for i, b in enumerate(bl):
            im = _open(b)
            im.load()
            out[i] = to_array(im, channels, None if native else size)
        splits[s] = (labels[s], out)
        if not len(bl):
            raise TailforgeError(f"split {s} of {root} holds no usable images", "check data.image_column")
    return {"names": names, "splits": splits, "channels": channels, "image_size": tuple(size),
            "root": str(root.resolve()), "skipped": skipped}
