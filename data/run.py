"""The run folder: the data contract between stages (see DESIGN.md)."""
from __future__ import annotations

import os
from pathlib import Path

from .atomic import read_json
from .errors import TailforgeError


class RunDir:
    """Paths of one run folder. Creating the object touches nothing on disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise TailforgeError(f"run folder {self.root} is a file, not a folder",
                                 "pass a folder to --run (a new name creates it)")

    def __repr__(self) -> str:  # pragma: no cover
        return f"RunDir({str(self.root)!r})"

    # files of the data contract
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset.json"

    @property
    def real(self) -> Path:
        return self.root / "real.parquet"

    @property
    def counts(self) -> Path:
        return self.root / "counts.json"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def candidates(self) -> Path:
        return self.root / "candidates.parquet"

    @property
    def filtered(self) -> Path:
        return self.root / "filtered.parquet"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def synthetic(self, generator: str) -> Path:
        return self.root / "synthetic" / generator

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def models(self) -> list[str]:
        d = self.root / "models"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    def resolve(self, uri: str) -> tuple[Path, int | None]:
        """Split ``uri`` into a file path (absolute) and an optional array row."""
        path, _, row = uri.partition("#")
        p = Path(path)
        if not p.is_absolute():
            p = self.root / p
        return p, (int(row) if row else None)

    def require(self, path: Path, stage: str) -> Path:
        if not path.exists():
            raise TailforgeError(
                f"run folder {self.root} has no {path.name}",
                f"run `tailforge {stage} --run {self.root}` first",
            )
        return path

    def dataset_info(self) -> dict:
        return read_json(self.require(self.dataset, "measure"))
