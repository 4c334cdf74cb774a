"""The run folder: the data contract between stages (see DESIGN.md)."""
from __future__ import annotations

import os
from pathlib import Path

from .atomic import read_json
from .errors import TailforgeError


SOURCES_DIR = "sources"


class RunDir:
    """Paths of one run folder. Creating the object touches nothing on disk.

    ``source``: a view of the run for a second synthetic source next to the run's generator (the
    benchmark's ``oracle`` arm): its candidates, filtered table and filter report live in
    ``sources/<source>/`` instead of the run folder's top; everything else is shared."""

    def __init__(self, root: str | os.PathLike, source: str | None = None):
        self.root = Path(root)
        self.source = source
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
    def side(self) -> Path:
        """Where this view's candidates, filtered table and filter report live."""
        return self.root if self.source is None else self.root / SOURCES_DIR / self.source

    def view(self, source: str | None) -> "RunDir":
        """The same run folder seen through ``source`` (None: the run's own generator)."""
        return RunDir(self.root, source)

    def sources(self) -> list[str]:
        """Names of the second sources that have a view in this run folder."""
        d = self.root / SOURCES_DIR
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    @property
    def candidates(self) -> Path:
        return self.side / "candidates.parquet"

    @property
    def filtered(self) -> Path:
        return self.side / "filtered.parquet"

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
