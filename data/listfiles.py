"""The published long-tail split files: ImageNet-LT / Places-LT list files and iNaturalist's JSON.

Both formats name images by paths relative to a dataset root and give each split its own file, so the
benchmark's splits are kept exactly as published (``profile: none`` is the default of these datasets,
see ``DataConfig``). Two readers, each returning ``{split: Entries}`` for the files in ``data.lists``:

1. ``read_list(file)``: one ``relative/path label`` per line (``rsplit`` at the last blank, so paths may
   hold spaces); blank lines are skipped; the label is a non-negative integer.
2. ``read_inat(file)``: iNaturalist 2017/2018/2021 JSON (COCO-style): ``images [{id, file_name}]``,
   ``annotations [{image_id, category_id}]``, ``categories [{id, name}]``. Classes are the categories that
   have train images, as contiguous labels in sorted-id order (iNat 2018: label == category id).

Then ``check_entries`` applies the rules both share, in this order: every path stays inside the root
(lexically: ``../x.jpg`` and absolute paths elsewhere are refused, a symlink inside the root is followed
at load time), has an image extension and exists (one ``stat`` per file, no image is opened: a corrupt
image fails when a stage loads it, naming the file); no path is listed twice (in one split or across
splits); every class has train images and every label of val/test is a class of train. Each broken rule
is one ``TailforgeError`` naming the file and its line (JSON: the entry), or, with ``skip_bad``, missing
and non-image files are left out and listed in ``skipped.txt``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TailforgeError
from .images import IMAGE_EXTS

LIST_DATASETS = ("listfile", "inaturalist")
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Entries:
    """One split as its file gives it: paths (as written), labels, and where each came from."""

    file: Path
    paths: list[str]
    labels: list[int]
    where: list[int]  # line numbers (list files) or indices into `annotations` (JSON), for error messages
    json: bool = False  # where: indices into the JSON's `annotations`
    files: list[str] = field(default_factory=list)  # absolute paths, filled by check_entries

    def at(self, k: int) -> str:
        """Where entry ``k`` is written: ``FILE:LINE`` or ``FILE: annotations[i]``."""
        return f"{self.file}: annotations[{self.where[k]}]" if self.json else f"{self.file}:{self.where[k]}"


def resolve_file(root: Path, name: str | os.PathLike, what: str) -> Path:
    """A list (or names) file given relative to the root or absolute; missing -> one error."""
    p = Path(name).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise TailforgeError(f"{what} {p} does not exist",
                             "give the file relative to data.root or as an absolute path")
    return p


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str | None:
    """sha256 of a file's bytes (cached by path, size and mtime): list files are part of a run's fingerprint."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


# --------------------------------------------------------------------------- the two readers

def read_list(path: Path) -> Entries:
    """``relative/path label`` lines (ImageNet-LT, Places-LT)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TailforgeError(f"list file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                             "give a text file of `relative/path label` lines") from None
    paths, labels, where = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise TailforgeError(f"{path}:{n}: expected `relative/path label` with an integer label >= 0, "
                                 f"got {line.strip()[:80]!r}",
                                 "write one image per line: its path relative to data.root, a blank, its label")
        paths.append(parts[0].strip())
        labels.append(int(parts[1]))
        where.append(n)
    if not paths:
        raise TailforgeError(f"list file {path} lists no images", "give a file of `relative/path label` lines")
    return Entries(path, paths, labels, where)


def read_names(path: Path) -> list[str]:
    """Class names, one a line: line 1 names label 0."""
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    seen: dict[str, int] = {}
    for n, name in enumerate(names, 1):
        if not name:
            raise TailforgeError(f"{path}:{n}: empty class name", "give one class name per line, line 1 = label 0")
        if name in seen:
            raise TailforgeError(f"{path}:{n}: class name {name!r} repeats line {seen[name]}",
                                 "class names must be unique")
        seen[name] = n
    if not names:
        raise TailforgeError(f"names file {path} holds no names", "give one class name per line, line 1 = label 0")
    return names


def _load_json(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TailforgeError(f"{path} is not valid JSON ({exc})",
                             "give iNaturalist's train/val JSON (images, annotations, categories)") from None
    if not isinstance(data, dict):
        raise TailforgeError(f"{path} holds a JSON {type(data).__name__}, not an object",
                             "give iNaturalist's train/val JSON (images, annotations, categories)")
    return data


def _key(path: Path, data: dict, key: str) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        hint = ("iNaturalist's test JSON has no labels: give train and val (val is then split into val and test)"
                if key == "annotations" else "give iNaturalist's train/val JSON (images, annotations, categories)")
        raise TailforgeError(f"{path} has no `{key}` list", hint)
    return value


def read_inat(path: Path) -> tuple[Entries, dict[int, str]]:
    """One iNaturalist JSON: entries labelled by *category id* (mapped to labels later) and ``{id: name}``."""
    data = _load_json(path)
    images, anns, cats = (_key(path, data, k) for k in ("images", "annotations", "categories"))
    fix = "give iNaturalist's train/val JSON (images [{id, file_name}], annotations [{image_id, category_id}])"
    names: dict[int, str] = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise TailforgeError(f"{path}: categories[{i}] has no integer `id`", fix)
        names[c["id"]] = str(c.get("name", c["id"]))
    file_of: dict[int, str] = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise TailforgeError(f"{path}: images[{i}] lacks an integer `id` or a `file_name`", fix)
        file_of[im["id"]] = im["file_name"]
    paths, labels, where, seen = [], [], [], set()
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), int) or not isinstance(a.get("category_id"), int):
            raise TailforgeError(f"{path}: annotations[{i}] lacks an integer `image_id` or `category_id`", fix)
        img, cat = a["image_id"], a["category_id"]
        if img not in file_of:
            raise TailforgeError(f"{path}: annotations[{i}] names image_id {img}, which is not in `images`", fix)
        if cat not in names:
            raise TailforgeError(f"{path}: annotations[{i}] names category_id {cat}, which is not in `categories`",
                                 "give the JSON file as published (its categories list every category)")
        if img in seen:
            raise TailforgeError(f"{path}: annotations[{i}] labels image_id {img} a second time",
                                 "give one annotation per image (classification, not detection)")
        seen.add(img)
        paths.append(file_of[img])
        labels.append(cat)
        where.append(i)
    if not paths:
        raise TailforgeError(f"{path} has no annotations", "iNaturalist's test JSON has no labels: give train and "
                             "val (val is then split into val and test)")
    return Entries(path, paths, labels, where, json=True), names


# --------------------------------------------------------------------------- the shared rules

def check_entries(root: Path, splits: dict[str, Entries], names: list[str], skip_bad: bool,
                  skipped: list[str]) -> None:
    """Apply the module's rules (docstring) to ``splits``, whose labels index ``names``. Fills
    ``Entries.files`` with absolute paths (and, with ``skip_bad``, drops missing and non-image files)."""
    base = os.path.normpath(str(root.resolve()))
    prefix = base.rstrip(os.sep) + os.sep
    first: dict[str, tuple[str, int]] = {}  # absolute path -> (split, entry) where it was first listed
    for split, e in splits.items():
        keep: list[int] = []
        files: list[str] = []
        for k, (p, lab) in enumerate(zip(e.paths, e.labels)):
            if not 0 <= lab < len(names):
                raise TailforgeError(f"{e.at(k)}: label {lab} is out of range (the names file has {len(names)} "
                                     f"classes, 0..{len(names) - 1})", "fix the label, or add the class to the names file")
            full = os.path.normpath(p if os.path.isabs(p) else prefix + p)
            if not full.startswith(prefix):
                raise TailforgeError(f"{e.at(k)}: path {p!r} lies outside the dataset root {base}",
                                     "list images by their path relative to data.root, inside it")
            if full in first:
                s0, k0 = first[full]
                raise TailforgeError(f"{e.at(k)}: {p!r} is listed a second time (first at {splits[s0].at(k0)})",
                                     "list each image once, in one split")
            first[full] = (split, k)
            if os.path.splitext(full)[1].lower() not in IMAGE_EXTS:
                if skip_bad:
                    skipped.append(f"{full}\tnot an image file ({e.at(k)})")
                    continue
                raise TailforgeError(f"{e.at(k)}: {p!r} is not an image file (extensions: "
                                     f"{', '.join(sorted(IMAGE_EXTS))})", "fix the list, or pass --skip-bad to leave it out")
            if not os.path.isfile(full):
                if skip_bad:
                    skipped.append(f"{full}\tdoes not exist ({e.at(k)})")
                    continue
                raise TailforgeError(f"{e.at(k)}: image {full} does not exist",
                                     "check data.root (list paths are relative to it), or pass --skip-bad")
            keep.append(k)
            files.append(full)
        listed = len(e.paths)
        if len(keep) < listed:
            e.paths, e.labels, e.where = ([x[k] for k in keep] for x in (e.paths, e.labels, e.where))
        e.files = files
        if not files:
            raise TailforgeError(f"{e.file}: none of its {listed} images is usable (see skipped.txt)",
                                 "check data.root")
    train = np.bincount(label_array(splits["train"]), minlength=len(names))
    for split in ("val", "test"):
        e = splits.get(split)
        for k, lab in enumerate(e.labels if e is not None else []):
            if train[lab] == 0:
                raise TailforgeError(f"{e.at(k)}: label {lab} ({names[lab]!r}) has no images in the train split "
                                     f"{splits['train'].file}", "every class of val/test needs train images")
    empty = np.flatnonzero(train == 0)
    if len(empty):
        shown = ", ".join(f"{int(c)} ({names[c]!r})" for c in empty[:5])
        raise TailforgeError(f"{len(empty)} class(es) have no images in the train split {splits['train'].file}: "
                             f"{shown}", "give a names file with only the classes that have train images, or add "
                             "their images to the train list")


def label_array(e: Entries) -> np.ndarray:
    return np.asarray(e.labels, dtype=np.int64)
