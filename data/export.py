"""``export``: the rebalanced dataset out of a run folder, as files another trainer can read.

What is exported (``export_rows``): the rebalanced arm's training table, the real train rows plus the accepted
synthetic rows of ``filtered.parquet`` (``synthetic: candidates``: every candidate, the no-filter control), the
rows ``train.trainer.training_table`` gives the ``rebalanced`` arm, and the real val and test rows as they were
measured, so the user's trainer sees the same splits. Every sample keeps its provenance: ``source`` (``real`` or
the generator's source), ``synthetic``, ``generator``, ``seed``, ``parent_id``, ``sample_id`` (and the filter's
``score`` where there is one).

Formats (``FORMATS``):

``imagefolder``
    ``DIR/<split>/<class>/<sample_id>.<ext>`` (torchvision's ``ImageFolder``, timm, tailforge's own
    ``imagefolder``, which keeps the split folders). Files are hard links of the run's and the dataset's images
    where the file system allows, copies otherwise (``files: copy`` always copies); array images (digits,
    Fashion-MNIST, CIFAR) are written as PNG. Provenance: ``DIR/provenance.csv`` (``file`` column).
``hf``
    parquet shards ``DIR/data/<split>-00000-of-0000N.parquet`` in the Hugging Face hub layout (splits ``train``,
    ``validation``, ``test``) with an ``Image`` and a ``ClassLabel`` feature and one column per provenance field,
    written by pyarrow directly (image bytes copied, never decoded); ``DIR/README.md`` names each split's files,
    so ``datasets.load_dataset(DIR)`` reads exactly them.
``webdataset``
    tar shards ``DIR/<split>-000000.tar`` of ``shard_size`` samples each: ``<key>.<ext>`` (the image bytes),
    ``<key>.cls`` (the label) and ``<key>.json`` (class name and provenance).

Feature-space samples (``featcov``, ``featdict``, ``fdiff``) are feature vectors of a classifier's backbone, not
images: in every format they go to ``DIR/features/synthetic.npy`` (float32, N x D) with
``DIR/features/synthetic.parquet`` (label, class name, provenance, the backbone's model name), and the export
says so in one line (``summary["notes"]``).

Atomic and resumable: the export is written into ``<parent>/.<name>.partial/`` and renamed to DIR when
complete. An interrupted export resumes there: finished shards and files are kept when the same rows and
options made them (``.export-key``), anything else is started over. A DIR that holds this very export is up
to date (nothing is done); a non-empty DIR holding anything else is refused unless ``overwrite``.
``DIR/export.json`` records the run, the options, the key, the counts per split and source and the shards.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, Union

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from .atomic import atomic_path, read_json, write_json, write_text
from .errors import TailforgeError
from .images import load_npy
from .manifest import SPLITS, is_feature, read_manifest, train_rows
from .run import RunDir

FORMATS = ("imagefolder", "hf", "webdataset")
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # the hub's names
PROVENANCE = ("sample_id", "source", "synthetic", "generator", "seed", "parent_id", "prompt", "strength", "score")
MANIFEST = "export.json"
KEY_FILE = ".export-key"
ROW_GROUP = 1000  # rows per parquet row group (the hub's viewers page by row group)
READERS = 4  # threads reading image bytes (I/O bound; they release the GIL)

Progress = Callable[[int, int, dict], None]


class ExportConfig(BaseModel):
    """Where and how ``tailforge export`` writes the rebalanced dataset (and the flow's export task)."""

    model_config = ConfigDict(extra="forbid")

    to: Union[Path, None] = Field(None, description="destination folder (in a flow: null turns the export off)")
    format: Literal["imagefolder", "hf", "webdataset"] = Field(
        "imagefolder", description="imagefolder: DIR/<split>/<class>/ files (hard links where possible); hf: parquet "
        "shards with an Image and a ClassLabel feature (Hugging Face datasets); webdataset: tar shards")
    synthetic: Union[Literal["filtered", "candidates"], None] = Field(
        None, description="synthetic rows: filtered (the accepted ones) or candidates (all, the no-filter control); "
        "default: the run's recipe.synthetic (config.yaml), else filtered")
    files: Literal["link", "copy"] = Field(
        "link", description="imagefolder: link (hard links, copies across file systems) or copy (always copies)")
    shard_size: int = Field(10_000, ge=1, description="hf, webdataset: samples per shard")
    overwrite: bool = Field(False, description="replace a non-empty destination folder that holds something else")


# --------------------------------------------------------------------------- what is exported

def run_synthetic(run: RunDir) -> str:
    """The synthetic rows the run's rebalanced arm trains on: its config's ``recipe.synthetic``, else filtered."""
    if run.config.exists():
        import yaml

        try:
            cfg = yaml.safe_load(run.config.read_text()) or {}
            value = (cfg.get("recipe") or {}).get("synthetic")
        except (yaml.YAMLError, AttributeError):
            value = None
        if value in ("filtered", "candidates"):
            return value
    return "filtered"


def export_rows(run: RunDir, synthetic: str = "filtered") -> pd.DataFrame:
    """The rebalanced arm's training table (real train rows + accepted synthetic rows) and the real val and
    test rows, in a stable order (split, label, real first, sample id), with a ``synthetic`` column."""
    real = read_manifest(run.require(run.real, "measure"))
    real = real[real["source"] == "real"]
    syn = None
    if synthetic == "filtered" and run.filtered.exists():
        syn = read_manifest(run.filtered)
    elif synthetic == "filtered" and run.candidates.exists():
        raise TailforgeError(f"run folder {run.root} has candidates but no filtered.parquet",
                             f"run `tailforge filter --run {run.root}` first (or --synthetic candidates)")
    elif synthetic == "candidates" and run.candidates.exists():
        syn = read_manifest(run.candidates).assign(accepted=True)
    elif synthetic not in ("filtered", "candidates"):
        raise TailforgeError(f"unknown synthetic rows '{synthetic}'", "use filtered or candidates")
    parts = [real]
    if syn is not None and len(syn):
        syn = syn[~syn["sample_id"].isin(real["sample_id"])].copy()
        if "seed" in syn.columns:  # 63-bit seeds: a float column would round them
            syn["seed"] = pd.array([None if pd.isna(s) else int(s) for s in syn["seed"]], dtype="Int64")
        parts.append(syn)
    df = pd.concat(parts, ignore_index=True)
    train = train_rows(df)
    rest = real[real["split"] != "train"]
    out = pd.concat([train, rest], ignore_index=True)
    out["synthetic"] = (out["source"] != "real").to_numpy()
    order = out["split"].map({s: i for i, s in enumerate(SPLITS)})
    out = out.assign(_o=order).sort_values(["_o", "label", "synthetic", "sample_id"], kind="stable")
    return out.drop(columns="_o").reset_index(drop=True)


def rows_key(rows: pd.DataFrame, cfg: ExportConfig) -> str:
    """What makes the export: its rows (ids, files, labels, splits, sources) and the options that shape files."""
    h = hashlib.sha256()
    cols = [c for c in ("sample_id", "uri", "label", "split", "source") if c in rows.columns]
    h.update(pd.util.hash_pandas_object(rows[cols], index=False).to_numpy().tobytes())
    h.update(json.dumps([cfg.format, cfg.files, cfg.shard_size if cfg.format != "imagefolder" else None]).encode())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------- names

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def file_stem(sample_id: str) -> str:
    """A sample id as a file name stem / WebDataset key (no dots: WebDataset splits keys at the first one)."""
    return _UNSAFE.sub("_", str(sample_id))


def class_folders(class_names: list[str]) -> list[str]:
    """One folder name per class: its name without path separators; ``<label>_<name>`` for all when two
    names would collide (their order, by label, is then also the folders' sorted order)."""
    def clean(n: str) -> str:
        n = str(n).replace("/", "_").replace("\\", "_").replace("\0", "_").strip()
        return n if n not in ("", ".", "..") and not n.startswith(".") else f"_{n}"

    names = [clean(n) for n in class_names]
    if len(set(names)) < len(names):
        w = len(str(len(names) - 1))
        names = [f"{i:0{w}d}_{n}" for i, n in enumerate(names)]
    return names


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- image sources
# Plain strings and os calls, no pathlib, no object per row: an export of 75,000 images spends its time in
# system calls, not in Python (bench/export_speed.py).

def sources(run: RunDir, uris) -> tuple[list[str], list[int], list[str]]:
    """Per uri: the file (absolute), the array row (-1: a file, used as it is) and the exported extension (the
    file's own; ``.png`` for array rows, which are encoded)."""
    root = os.fspath(run.root)
    paths, rows, exts = [], [], []
    for uri in uris:
        path, _, row = uri.partition("#")
        paths.append(path if os.path.isabs(path) else os.path.join(root, path))
        rows.append(int(row) if row else -1)
        exts.append(".png" if row else (os.path.splitext(path)[1].lower() or ".png"))
    return paths, rows, exts


def _missing(path: str) -> TailforgeError:
    return TailforgeError(f"image {path} does not exist",
                          "the run folder or its dataset root changed; re-run the stage that wrote it")


def image_bytes(path: str, row: int) -> bytes:
    """The bytes of one exported image: the file's as they are, or an array row encoded as PNG."""
    if row >= 0:
        arr = load_npy(path)
        if row >= len(arr):
            raise TailforgeError(f"{path} has {len(arr)} rows but the manifest asks for row {row}",
                                 "the run folder is inconsistent; rebuild it with a new --run")
        return _png_bytes(arr[row])
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise _missing(path) from None


NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES)


def place(path: str, row: int, dst: str, mode: str) -> str:
    """Put one image at ``dst``: a hard link (``mode`` link; a copy where the file system cannot link), a copy, or
    an array row encoded as PNG; returns which (linked, copied, encoded). An existing ``dst`` (left by an
    interrupted export) is replaced."""
    if row >= 0:
        with open(dst, "wb") as fh:
            fh.write(image_bytes(path, row))
        return "encoded"
    if mode == "link":
        try:
            os.link(path, dst)
            return "linked"
        except FileExistsError:
            os.unlink(dst)
            return place(path, row, dst, mode)
        except FileNotFoundError:
            raise _missing(path) from None
        except OSError as exc:
            if exc.errno not in NO_LINK:
                raise
    try:
        shutil.copyfile(path, dst)
    except FileNotFoundError:
        raise _missing(path) from None
    return "copied"


# --------------------------------------------------------------------------- writers

def _provenance(rows: pd.DataFrame) -> pd.DataFrame:
    cols = ["split", "label", "class_name"] + [c for c in PROVENANCE if c in rows.columns]
    out = rows[cols].copy()
    for c in ("generator", "parent_id", "prompt"):
        if c in out.columns:
            out[c] = out[c].astype(object).where(out[c].notna(), None)
    if "generator" in out.columns:  # real rows: no generator
        out["generator"] = out["generator"].where(out["synthetic"], None)
    empty = [c for c in ("parent_id", "prompt", "strength", "score") if c in out.columns and out[c].isna().all()]
    return out.drop(columns=empty)


DONE_GROUPS = ".done-groups"  # imagefolder: the <split>/<class> folders finished so far (resume skips them)


def _write_imagefolder(run: RunDir, rows: pd.DataFrame, out: Path, cfg: ExportConfig, names: list[str],
                       resume: bool, progress: Progress | None) -> dict:
    """One folder per split and class, finished one at a time (``.done-groups`` lists them: a resumed export skips
    those and redoes the one it was killed in). Copies and PNG encodings go through a few threads (system calls
    and zlib release the GIL); hard links are made in this thread."""
    folders = class_folders(names)
    counts = {"linked": 0, "copied": 0, "encoded": 0, "kept": 0}
    paths, arows, exts = sources(run, rows["uri"])
    stems = [file_stem(x) for x in rows["sample_id"]]
    split_col, label_col = rows["split"].to_numpy(), rows["label"].to_numpy()
    files = [f"{sp}/{folders[int(lb)]}/{st}{ex}" for sp, lb, st, ex in zip(split_col, label_col, stems, exts)]
    done_file = out / DONE_GROUPS
    finished = set(done_file.read_text().split("\n")) if resume and done_file.exists() else set()
    base = os.fspath(out)
    starts = np.flatnonzero(np.r_[True, (split_col[1:] != split_col[:-1]) | (label_col[1:] != label_col[:-1])])
    ends = np.r_[starts[1:], len(rows)]
    pool = ThreadPoolExecutor(max_workers=READERS)
    try:
        with open(done_file, "a") as log:
            for a, b in zip(starts.tolist(), ends.tolist()):
                group = f"{split_col[a]}/{folders[int(label_col[a])]}"
                if group in finished:
                    counts["kept"] += b - a
                else:
                    os.makedirs(os.path.join(base, group), exist_ok=True)
                    dsts = [os.path.join(base, files[i]) for i in range(a, b)]
                    if cfg.files == "link" and all(r < 0 for r in arows[a:b]):
                        got = [place(paths[i], -1, d, "link") for i, d in zip(range(a, b), dsts)]
                    else:
                        got = _batched(pool, place, paths[a:b], arows[a:b], dsts, [cfg.files] * (b - a))
                    for g in got:
                        counts[g] += 1
                    log.write(group + "\n")
                    log.flush()
                if progress:
                    progress(b, len(rows), {"split": str(split_col[a])})
    finally:
        pool.shutdown()
    done_file.unlink()
    prov = _provenance(rows)
    prov.insert(0, "file", files)
    with atomic_path(out / "provenance.csv") as tmp:
        prov.to_csv(tmp, index=False)
    return {**counts, "provenance": "provenance.csv", "classes": folders}


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


BATCH = 64  # files per thread-pool task: one task per file costs more than reading a small file


def _batched(pool: ThreadPoolExecutor, fn, *lists) -> list:
    """``[fn(*args) for args in zip(*lists)]``, in ``BATCH``-sized tasks on ``pool``."""
    n = len(lists[0])

    def run(a: int) -> list:
        return [fn(*args) for args in zip(*(x[a:a + BATCH] for x in lists))]

    return [y for part in pool.map(run, range(0, n, BATCH)) for y in part]


def _read_all(run: RunDir, uris: list[str], pool: ThreadPoolExecutor) -> tuple[list[bytes], list[str]]:
    paths, rows, exts = sources(run, uris)
    return _batched(pool, image_bytes, paths, rows), exts


def _sharded(rows: pd.DataFrame, cfg: ExportConfig, name: Callable[[str, int, int], str]):
    """(split, final file name, the rows of the shard) for every shard, in order."""
    for split in SPLITS:
        part = rows[rows["split"] == split]
        chunks = _chunks(len(part), cfg.shard_size)
        for i, (a, b) in enumerate(chunks):
            yield split, name(split, i, len(chunks)), part.iloc[a:b]


def _hf_features(names: list[str], prov: pd.DataFrame) -> dict:
    kinds = {"bool": "bool", "Int64": "int64", "int64": "int64", "float64": "float64"}
    feats = {"image": {"_type": "Image"}, "label": {"names": list(map(str, names)), "_type": "ClassLabel"}}
    for c in prov.columns:
        if c in ("split", "label"):
            continue
        feats[c] = {"dtype": kinds.get(str(prov[c].dtype), "string"), "_type": "Value"}
    return feats


def _arrow_provenance(prov: pd.DataFrame, feats: dict | None = None):
    """The provenance columns as one arrow table, made once per export (``feats``: the hf features, whose
    columns and types it takes; otherwise every column, types inferred)."""
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
    cols = [c for c in feats if c not in ("image", "label")] if feats else list(prov.columns)
    table = pa.Table.from_pandas(prov[cols], preserve_index=False)
    if feats:
        table = table.cast(pa.schema([pa.field(c, types[feats[c]["dtype"]]) for c in cols]))
    return table.replace_schema_metadata(None)


def _hf_table(run: RunDir, part: pd.DataFrame, prov_table, feats: dict, pool: ThreadPoolExecutor):
    import pyarrow as pa

    data, exts = _read_all(run, part["uri"].tolist(), pool)
    paths = [file_stem(s) + e for s, e in zip(part["sample_id"], exts)]
    image = pa.StructArray.from_arrays([pa.array(data, pa.binary()), pa.array(paths, pa.string())],
                                       names=["bytes", "path"])
    cols = {"image": image, "label": pa.array(part["label"].to_numpy(np.int64))}
    cols.update({c: prov_table.column(c) for c in prov_table.column_names})
    table = pa.table(cols)
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": feats}})})


def _hf_readme(names: list[str], shards: dict[str, list[str]], run: RunDir) -> str:
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, files in shards.items():
        if files:
            lines += [f"  - split: {HF_SPLITS[split]}", f"    path: data/{HF_SPLITS[split]}-*.parquet"]
    lines += ["---", "", f"# {run.root.name}: the rebalanced dataset of a tailforge run", "",
              "Written by `tailforge export --format hf`: the train split holds the real images and the accepted "
              "synthetic ones (column `synthetic`, with `source`, `generator`, `seed`, `parent_id`); validation and "
              "test are the run's real val and test splits.", "",
              "```python", "import datasets", "ds = datasets.load_dataset(\"parquet\", data_dir=\"THIS_FOLDER/data\")"
              "  # or load_dataset(\"THIS_FOLDER\")", "```", ""]
    return "\n".join(lines)


def _write_hf(run: RunDir, rows: pd.DataFrame, out: Path, cfg: ExportConfig, names: list[str],
              resume: bool, progress: Progress | None) -> dict:
    import pyarrow.parquet as pq

    prov = _provenance(rows)
    feats = _hf_features(names, prov)
    prov_table = _arrow_provenance(prov, feats)
    position = pd.Series(np.arange(len(rows)), index=rows.index)
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    (out / "data").mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=READERS)
    kept = written = 0
    total, done = len(rows), 0

    def name(split, i, n):
        return f"data/{HF_SPLITS[split]}-{i:05d}-of-{n:05d}.parquet"

    for split, fname, part in _sharded(rows, cfg, name):
        shards[split].append(fname)
        dst = out / fname
        if resume and dst.exists():
            kept += 1
        else:
            with atomic_path(dst) as tmp:
                writer = None
                try:
                    first = int(position[part.index[0]])  # a shard's rows are consecutive rows of the export
                    for a, b in _chunks(len(part), ROW_GROUP):
                        t = _hf_table(run, part.iloc[a:b], prov_table.slice(first + a, b - a), feats, pool)
                        if writer is None:
                            writer = pq.ParquetWriter(tmp, t.schema, compression="none")
                        writer.write_table(t)
                finally:
                    if writer is not None:
                        writer.close()
            written += 1
        done += len(part)
        if progress:
            progress(done, total, {"split": split, "shard": fname})
    pool.shutdown()
    write_text(out / "README.md", _hf_readme(names, shards, run))
    return {"shards": {s: f for s, f in shards.items() if f}, "written": written, "kept": kept,
            "splits": {s: HF_SPLITS[s] for s in SPLITS if shards[s]}}


def _tar_template() -> tuple[bytes, int]:
    h = bytearray(512)
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[136:148] = b"00000000000\0"
    h[148:156] = b"        "  # the checksum field counts as spaces
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    return bytes(h), sum(h)


_TAR_TEMPLATE, _TAR_SUM = _tar_template()


def tar_header(name: str, size: int) -> bytes:
    """A ustar header (mode 644, mtime 0: the same rows give the same bytes), built from a template: tarfile's
    TarInfo costs ten times as much, and a shard holds three members per sample. Names over 100 bytes go through
    tarfile (GNU long-name records)."""
    raw = name.encode()
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    h = bytearray(_TAR_TEMPLATE)
    h[0:len(raw)] = raw
    field = b"%011o\0" % size
    h[124:136] = field
    h[148:156] = b"%06o\0 " % (_TAR_SUM + sum(raw) + sum(field))
    return bytes(h)


def _tar_member(fh, name: str, data: bytes) -> None:
    fh.write(tar_header(name, len(data)))
    fh.write(data)
    pad = -len(data) % 512
    if pad:
        fh.write(b"\0" * pad)


def _write_webdataset(run: RunDir, rows: pd.DataFrame, out: Path, cfg: ExportConfig, names: list[str],
                      resume: bool, progress: Progress | None) -> dict:
    prov = _provenance(rows)
    records = _arrow_provenance(prov).to_pylist()  # plain Python values, None for nulls: ready for JSON
    position = pd.Series(np.arange(len(rows)), index=rows.index)
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    kept = written = 0
    total, done = len(rows), 0
    pool = ThreadPoolExecutor(max_workers=READERS)
    for split, fname, part in _sharded(rows, cfg, lambda s, i, n: f"{s}-{i:06d}.tar"):
        shards[split].append(fname)
        dst = out / fname
        if resume and dst.exists():
            kept += 1
        else:
            first = int(position[part.index[0]])
            with atomic_path(dst) as tmp, open(tmp, "wb", buffering=1 << 20) as fh:
                for a, b in _chunks(len(part), ROW_GROUP):
                    data, exts = _read_all(run, part["uri"].iloc[a:b].tolist(), pool)
                    for rec, blob, ext in zip(records[first + a:first + b], data, exts):
                        key = file_stem(rec["sample_id"])
                        _tar_member(fh, f"{key}{ext}", blob)
                        _tar_member(fh, f"{key}.cls", str(rec["label"]).encode())
                        _tar_member(fh, f"{key}.json", json.dumps(rec).encode())
                fh.write(b"\0" * 1024)  # end of archive: two zero blocks
            written += 1
        done += len(part)
        if progress:
            progress(done, total, {"split": split, "shard": fname})
    pool.shutdown()
    return {"shards": {s: f for s, f in shards.items() if f}, "written": written, "kept": kept}


WRITERS = {"imagefolder": _write_imagefolder, "hf": _write_hf, "webdataset": _write_webdataset}


def _write_features(run: RunDir, rows: pd.DataFrame, out: Path, resume: bool) -> dict:
    """Feature-space samples: ``features/synthetic.npy`` (float32 N x D) + ``features/synthetic.parquet``."""
    npy, table = out / "features" / "synthetic.npy", out / "features" / "synthetic.parquet"
    model = None
    if "feature_model" in rows.columns and rows["feature_model"].notna().any():
        model = str(rows["feature_model"].dropna().iloc[0])
    if not (resume and npy.exists() and table.exists()):
        paths = [run.resolve(u) for u in rows["uri"]]
        vecs: list[np.ndarray | None] = [None] * len(paths)
        by_file: dict[Path, list[tuple[int, int | None]]] = {}
        for i, (p, r) in enumerate(paths):
            by_file.setdefault(p, []).append((i, r))
        for p, pairs in by_file.items():
            arr = load_npy(p)
            for i, r in pairs:
                vecs[i] = np.asarray(arr[r] if r is not None else arr, dtype=np.float32).reshape(-1)
        mat = np.stack(vecs) if vecs else np.zeros((0, 0), np.float32)
        with atomic_path(npy) as tmp:
            np.save(tmp, mat)
        prov = _provenance(rows).assign(row=np.arange(len(rows)))
        if model is not None:
            prov["feature_model"] = model
        with atomic_path(table) as tmp:
            prov.to_parquet(tmp, index=False)
    dim = int(np.load(npy, mmap_mode="r").shape[1]) if len(rows) else 0
    return {"file": "features/synthetic.npy", "table": "features/synthetic.parquet", "rows": len(rows), "dim": dim,
            "model": model, "sources": sorted(rows["source"].unique().tolist())}


# --------------------------------------------------------------------------- the export

def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or inside it."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def _check_dest(run: RunDir, dest: Path) -> None:
    """Refuse a destination that ``overwrite`` would turn against the inputs: the run folder or a folder holding it,
    or the dataset root, a folder holding it or one inside it (real data is only ever read)."""
    dest = dest.resolve()
    if dest == Path(dest.anchor):
        raise TailforgeError(f"export folder {dest} is the file system's root", "pass a folder of its own to --to")
    if _inside(run.root.resolve(), dest):
        raise TailforgeError(f"export folder {dest} is or holds the run folder {run.root.resolve()}",
                             "choose another --to folder, outside the run and the dataset")
    root = read_json(run.dataset).get("root") if run.dataset.exists() else None
    if root and (_inside(Path(root).resolve(), dest) or _inside(dest, Path(root).resolve())):
        raise TailforgeError(f"export folder {dest} is, holds or lies inside the dataset root {Path(root).resolve()}",
                             "choose another --to folder, outside the run and the dataset")


def check_destination(run: RunDir, cfg: ExportConfig) -> None:
    """Before a flow starts any work: the destination is acceptable (see ``_check_dest``), and a non-empty one holds
    an export of this run (brought up to date at the end) or ``overwrite`` is set."""
    if cfg.to is None:
        return
    dest = Path(cfg.to).expanduser()
    if dest.exists() and not dest.is_dir():
        raise TailforgeError(f"export folder {dest} is a file", "pass a folder (a new name creates it) to export.to")
    _check_dest(run, dest)
    if dest.is_dir() and not _is_empty_dir(dest) and not cfg.overwrite:
        try:
            mine = read_json(dest / MANIFEST).get("run") == str(run.root.resolve())
        except (OSError, ValueError):
            mine = False
        if not mine:
            raise TailforgeError(f"export folder {dest} exists and is not empty (export.to)",
                                 "--set export.overwrite=true to replace it, or choose another export.to folder")


def _up_to_date(dest: Path, key: str) -> dict | None:
    m = dest / MANIFEST
    if not m.is_file():
        return None
    try:
        info = read_json(m)
    except (OSError, ValueError):
        return None
    if info.get("key") != key:
        return None
    need = [f for fs in (info.get("shards") or {}).values() for f in fs] + [info.get("provenance") or MANIFEST]
    if info.get("features"):
        need += [info["features"]["file"], info["features"]["table"]]
    return info if all((dest / f).exists() for f in need) else None


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and next(os.scandir(p), None) is None


def _summary_counts(rows: pd.DataFrame, feat: np.ndarray) -> dict:
    out = {}
    for split in SPLITS:
        m = (rows["split"] == split).to_numpy()
        if not m.any():
            continue
        part = rows[m]
        syn = part[part["synthetic"]]
        out[split] = {"samples": int(m.sum()), "real": int((~part["synthetic"]).sum()),
                      "synthetic": {str(k): int(v) for k, v in syn["source"].value_counts().sort_index().items()},
                      "images": int((m & ~feat).sum()), "features": int((m & feat).sum())}
    return out


def export_run(run: RunDir, cfg: ExportConfig, progress: Progress | None = None) -> dict:
    """Write the rebalanced dataset of ``run`` to ``cfg.to`` in ``cfg.format``; returns the summary that
    ``DIR/export.json`` holds (``up_to_date``: the folder already held this export; ``notes``: lines to show)."""
    if cfg.to is None:
        raise TailforgeError("export needs a destination folder", "pass --to DIR (or set export.to)")
    t0 = time.perf_counter()
    dest = Path(cfg.to).expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise TailforgeError(f"export folder {dest} is a file", "pass a folder (a new name creates it) to --to")
    info = run.dataset_info()
    _check_dest(run, dest)
    synthetic = cfg.synthetic or run_synthetic(run)
    rows = export_rows(run, synthetic)
    key = rows_key(rows, cfg)
    if dest.exists():
        done = _up_to_date(dest, key)
        if done is not None:
            return {**done, "up_to_date": True, "notes": done.get("notes", [])}
        if not _is_empty_dir(dest) and not cfg.overwrite:
            raise TailforgeError(f"export folder {dest} exists and is not empty",
                                 "pass --overwrite to replace it, or choose another --to folder")

    from .lock import LOCK, run_lock

    partial = dest.parent / f".{dest.name}.partial"
    with run_lock(partial, create=True, command="tailforge export"):
        kf = partial / KEY_FILE
        resume = kf.is_file() and kf.read_text().strip() == key
        if not resume:  # another export's leftovers (other rows or options): start over
            for p in partial.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            write_text(kf, key + "\n")
        feat = is_feature(rows)
        images, features = rows[~feat], rows[feat]
        names = list(info["class_names"])
        out = WRITERS[cfg.format](run, images, partial, cfg, names, resume, progress)
        notes = []
        feat_info = None
        if len(features):
            feat_info = _write_features(run, features, partial, resume)
            model = f" of model '{feat_info['model']}'" if feat_info["model"] else ""
            notes.append(f"{len(features)} synthetic samples ({', '.join(feat_info['sources'])}) are feature vectors"
                         f"{model}, not images: written to {dest / feat_info['file']} (labels and provenance in "
                         f"{feat_info['table']}), not into the {cfg.format} files")
        summary = {
            "format": cfg.format, "run": str(run.root.resolve()), "synthetic": synthetic, "key": key,
            "files": cfg.files if cfg.format == "imagefolder" else None,
            "shard_size": cfg.shard_size if cfg.format != "imagefolder" else None,
            "dataset": info.get("name"), "class_names": names, "channels": info.get("channels"),
            "counts": _summary_counts(rows, feat),
            "per_class_train": _per_class(rows, len(names)),
            **{k: v for k, v in out.items() if k != "classes"},
            "class_folders": out.get("classes"), "features": feat_info, "notes": notes,
            "seconds": round(time.perf_counter() - t0, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_json(partial / MANIFEST, summary)
        with contextlib.suppress(FileNotFoundError):
            (partial / KEY_FILE).unlink()
        with contextlib.suppress(FileNotFoundError):
            (partial / LOCK).unlink()  # the lock's descriptor stays held until the rename is done
        _replace(partial, dest)
    return {**summary, "up_to_date": False}


def _per_class(rows: pd.DataFrame, n: int) -> dict:
    tr = rows[rows["split"] == "train"]
    real = np.bincount(tr.loc[~tr["synthetic"], "label"].to_numpy(np.int64), minlength=n)
    syn = np.bincount(tr.loc[tr["synthetic"], "label"].to_numpy(np.int64), minlength=n)
    return {"real": real.tolist(), "synthetic": syn.tolist()}


def _replace(partial: Path, dest: Path) -> None:
    """Rename the finished ``partial`` to ``dest``; an existing ``dest`` (empty, or replaced by ``overwrite``) is
    moved aside first and removed after the rename."""
    if not dest.exists():
        os.replace(partial, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    os.replace(dest, old)
    os.replace(partial, dest)
    shutil.rmtree(old, ignore_errors=True)


def describe(summary: dict, dest: Path | str) -> str:
    """One line: what was exported where."""
    c = summary["counts"]
    parts = []
    for split, s in c.items():
        syn = ", ".join(f"{k} {v}" for k, v in s["synthetic"].items())
        parts.append(f"{split} {s['samples']}" + (f" ({s['real']} real + {syn})" if syn else ""))
    shards = summary.get("shards")
    how = f"{sum(len(v) for v in shards.values())} shards" if shards else \
        f"{summary.get('linked', 0)} linked, {summary.get('copied', 0)} copied, {summary.get('encoded', 0)} encoded" \
        + (f", {summary['kept']} kept" if summary.get("kept") else "")
    return f"exported {', '.join(parts)} samples to {dest} (format {summary['format']}: {how})"
