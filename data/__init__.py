"""Datasets, long-tail construction, manifests, image I/O and class statistics."""
from .atomic import atomic_dir, atomic_path, read_json, write_json, write_text
from .build import build_manifest
from .config import DataConfig, MeasureConfig
from .datasets import DATASETS, RawDataset, RawSplit, load_dataset
from .errors import TailforgeError, unknown_name
from .images import load_images, open_image, save_png
from .longtail import lt_counts, make_long_tailed, stratified_split
from .manifest import SOURCES, SPLITS, read_manifest, train_rows, write_manifest
from .measure import GROUPS, ClassStats, measure, measure_run
from .run import RunDir

__all__ = [
    "atomic_dir", "atomic_path", "read_json", "write_json", "write_text", "build_manifest", "DataConfig",
    "MeasureConfig", "DATASETS", "RawDataset", "RawSplit", "load_dataset", "TailforgeError", "unknown_name",
    "load_images", "open_image", "save_png", "lt_counts", "make_long_tailed", "stratified_split", "SOURCES",
    "SPLITS", "read_manifest", "train_rows", "write_manifest", "GROUPS", "ClassStats", "measure", "measure_run",
    "RunDir",
]
