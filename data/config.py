"""Configuration of the data stage (dataset, long-tail construction) and of ``measure``."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .listfiles import file_digest


LIST_DATASETS = ("listfile", "inaturalist")  # read published split files: already long-tailed
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}


def split_folders(root: Union[str, Path, None]) -> Union[dict[str, Path], None]:
    """``{split: folder}`` when ``root`` holds ``train/`` and ``val/`` or ``test/`` (class folders in each: the
    layout ``tailforge export`` writes and many datasets ship), else None."""
    if root is None:
        return None
    root = Path(root).expanduser()
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for n in names:
            if (root / n).is_dir():
                found[split] = root / n
                break
    return found if "train" in found and len(found) > 1 else None


class ListFiles(BaseModel):
    """The split files of a ``listfile`` / ``inaturalist`` dataset, relative to ``data.root`` or absolute."""

    model_config = ConfigDict(extra="forbid")

    train: Path = Field(description="train split file (ImageNet_LT_train.txt, train2018.json)")
    val: Union[Path, None] = Field(None, description="val split file; without it val is held out (stratified, "
                                   "val_from_test) from the test file, or from this file's val when test is missing")
    test: Union[Path, None] = Field(None, description="test split file; iNaturalist has none: its val file is then "
                                    "split into val and test")


class DataConfig(BaseModel):
    """Which dataset, and how to make it long-tailed."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("digits", description="registry name: digits, fashion-mnist, cifar10, cifar100, "
                         "mini-imagenet, imagefolder, listfile (ImageNet-LT / Places-LT list files), inaturalist (iNat JSON), "
                         "hf (a local Hugging Face dataset: save_to_disk folder or parquet shards)")
    root: Union[Path, None] = Field(None, description="dataset root folder (not needed for digits)")
    download: bool = Field(False, description="allow downloading (cifar/fashion-mnist) when online")
    lists: Union[ListFiles, None] = Field(
        None, description="listfile / inaturalist: the split files, {train: FILE, val: FILE, test: FILE}")
    names: Union[Path, None] = Field(None, description="listfile: class names, one a line (line 1 = label 0); "
                                     "default: the label ids")
    image_column: Union[str, None] = Field(None, description="hf: the image column (default: the dataset's Image "
                                           "feature)")
    label_column: Union[str, None] = Field(None, description="hf: the label column (default: the dataset's "
                                           "ClassLabel feature, else `label`)")
    profile: Literal["exp", "step", "none"] = Field(
        "exp", description="long-tail profile of the train split: exp (Cao et al. 2019), step, none (as is); "
        "listfile, inaturalist, hf and an imagefolder with train/ val/ test/ folders default to none (their "
        "splits are kept as they are)")
    imbalance: float = Field(100.0, description="imbalance factor n_max / n_min of the train split (>= 1)")
    step_fraction: float = Field(0.5, gt=0, lt=1, description="step profile: fraction of minority classes")
    class_order: Union[Literal["index", "random"], list[int]] = Field(
        "index", description="which classes become the head: index (class 0 first), random (seeded), "
        "or an explicit list of class ids, head first")
    seed: int = Field(0, description="seed of splits and long-tail sampling")
    split: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train/val/test fractions for datasets without official splits")
    val_from_test: float = Field(
        0.5, gt=0, lt=1, description="for datasets with an official balanced test set: the fraction of it "
        "held out (stratified) as the val split used for model selection")
    image_size: Union[int, None] = Field(
        None, description="resize image-folder datasets to this square size (default 64); "
        "array datasets keep their native size unless set")
    skip_bad: bool = Field(False, description="leave corrupt images out (listed in skipped.txt) instead of failing")

    @field_validator("imbalance")
    @classmethod
    def _if_ge_1(cls, v: float) -> float:
        if v < 1:
            raise ValueError(f"imbalance factor must be >= 1 (n_max / n_min), got {v}")
        return v

    @field_validator("split")
    @classmethod
    def _split_sums(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x <= 0 for x in v) or abs(sum(v) - 1) > 1e-6:
            raise ValueError(f"split fractions must be positive and sum to 1, got {v}")
        return v

    @field_validator("dataset")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()

    @model_validator(mode="after")
    def _list_datasets(self) -> "DataConfig":
        as_is = self.dataset in (*LIST_DATASETS, "hf") or (
            self.dataset == "imagefolder" and split_folders(self.root) is not None)
        if as_is and "profile" not in self.model_fields_set:
            self.profile = "none"  # keeps the published split; an explicit profile still applies
        if self.dataset not in LIST_DATASETS and (self.lists is not None or self.names is not None):
            raise ValueError(f"data.lists and data.names are read by the datasets {', '.join(LIST_DATASETS)}, "
                             f"not by '{self.dataset}'")
        if self.dataset != "hf" and (self.image_column is not None or self.label_column is not None):
            raise ValueError(f"data.image_column and data.label_column are read by the dataset hf, not by "
                             f"'{self.dataset}'")
        return self

    def fingerprint(self) -> dict:
        """The settings that determine real.parquet; a run folder keeps one fingerprint.

        Split files count by their content (sha256), so an edited list is a new dataset."""
        d = self.model_dump(mode="json")
        root = Path(self.root).expanduser() if self.root else None
        d["root"] = str(root.resolve()) if root else None
        files = {f"lists.{k}": v for k, v in (self.lists.model_dump() if self.lists else {}).items() if v}
        if self.names is not None:
            files["names"] = self.names
        for key in ("lists", "names", "image_column", "label_column"):  # absent for other datasets: their
            # fingerprints stay as they were
            if d[key] is None:
                del d[key]
        for key, f in files.items():
            p = Path(f).expanduser()
            p = p if p.is_absolute() or root is None else root / p
            d[key] = {"path": str(p.resolve()), "sha256": file_digest(p)}
        return d


class MeasureConfig(BaseModel):
    """Group thresholds (train images per class), as in the long-tail literature."""

    model_config = ConfigDict(extra="forbid")

    many: int = Field(100, ge=1, description="many-shot: more than this many train images")
    few: int = Field(20, ge=1, description="few-shot: fewer than this many train images")
    rule: Literal["auto", "absolute", "relative"] = Field(
        "auto", description="absolute: the thresholds above; relative: thirds of the log-count range "
        "(for tiny datasets); auto: absolute when the largest class has more than `many` images, else relative")

    @model_validator(mode="after")
    def _order(self) -> "MeasureConfig":
        if self.few > self.many:
            raise ValueError(f"few threshold ({self.few}) must not exceed many threshold ({self.many})")
        return self
