"""What every stage returns: a typed result that is also a file format.

A result holds its JSON summary (`data`, saved as `result.json`, read by the report and by later
stages) and named tables (saved as parquet). `save(folder)` writes them atomically and `load(folder)`
reads them back, so a result computed in a notebook and one read from a run directory are the same
object. Subclasses add typed accessors and `to_frame()`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple

import pandas as pd

from .. import profiling
from ..artifacts import atomic_dir, read_json, write_json
from ..errors import EmoscopeError


class Estimate(NamedTuple):
    """A number with its 95% interval (and sample size, where known)."""

    value: float
    lo: float
    hi: float
    n: int | None = None

    @classmethod
    def of(cls, d: dict | None) -> "Estimate | None":
        return None if d is None else cls(d["value"], d["lo"], d["hi"], d.get("n"))

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


class StageResult:
    """A stage's result: `data` (result.json), `tables` (parquet), `timing` (timing.json, kept apart
    so that reruns give byte-identical result files)."""

    stage: ClassVar[str] = ""
    table_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, data: dict, tables: dict[str, pd.DataFrame] | None = None, timing: dict | None = None):
        self.data, self.tables, self.timing = data, dict(tables or {}), timing

    def __getitem__(self, key: str):
        return self.data[key]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.data.get('model', '')}>"

    @property
    def config_hash(self) -> str:
        return self.data["config_hash"]

    def to_dict(self) -> dict:
        return self.data

    @profiling.timed("io")
    def save(self, folder: str | Path) -> Path:
        """Write the result into `folder` (replaced atomically)."""
        with atomic_dir(folder) as tmp:
            self._write(tmp)
        return Path(folder)

    def _write(self, folder: Path) -> None:
        """Write every file into a fresh folder (subclasses add theirs)."""
        write_json(folder / "result.json", self.data)
        if self.timing is not None:
            write_json(folder / "timing.json", self.timing)
        for name in self.table_names:
            self.tables[name].to_parquet(folder / f"{name}.parquet", index=False)

    @classmethod
    @profiling.timed("io")
    def load(cls, folder: str | Path) -> "StageResult":
        folder = Path(folder)
        f = folder / "result.json"
        if not f.is_file():
            raise EmoscopeError(f"{folder} holds no {cls.stage or 'stage'} result (no result.json)")
        try:
            data = read_json(f)
            tables = {n: pd.read_parquet(folder / f"{n}.parquet") for n in cls.table_names}
        except (json.JSONDecodeError, OSError, ValueError) as e:
            raise EmoscopeError(f"{folder}: unreadable result files ({str(e).splitlines()[0]})") from None
        if cls.stage and data.get("stage") != cls.stage:
            raise EmoscopeError(f"{f} is a {data.get('stage')!r} result, not {cls.stage!r}")
        timing = folder / "timing.json"
        return cls(data, tables, read_json(timing) if timing.exists() else None)


class Stage(NamedTuple):
    """A pipeline stage, registered once (`stages.registry`): the run config, the pipeline, the CLI and the report
    iterate over these. Each stage module exports one as `STAGE`."""

    name: str
    """Its name: the run config's section, the run directory's folder, the CLI command."""
    config: type
    """Its config class (the run config's section of the same name)."""
    result: type[StageResult]
    """Its result class (saved in the run directory's folder)."""
    upstream: tuple[str, ...]
    """Stages whose config hashes enter its own (what it reads, directly or through them)."""
    needs: tuple[str, ...]
    """Stages whose results must exist before it runs (refused in one line otherwise, before any work)."""
    run: Callable
    """run(ctx, cfg, progress, workdir) -> result, on a pipeline `RunContext`."""
    printer: str
    """The `report.console` function that prints its result."""
    summary: str
    """One line for the CLI's help."""
    total: Callable | None = None
    """total(ctx, cfg) -> its progress steps, where known before it runs."""
    folder: Callable | None = None
    """folder(cfg) -> its folder in the run directory, when not its name (sensitivity: one per llama.cpp type)."""

    def path(self, cfg) -> str:
        """Its folder in the run directory, relative."""
        return self.folder(cfg) if self.folder else self.name
