"""Where rows come from: hub datasets, dataset folders, JSON / JSONL / Parquet / CSV files.

JSON and JSONL are read line by line here so that an error names the exact line; the other
forms go through `datasets`. Every source gives a `Rows` table: indexable dicts plus a name
that error messages use ("file data/train.jsonl, line 7").
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rto.errors import DataError, not_utf8

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Rows:
    """A table of rows and where it came from."""

    rows: Sequence[dict[str, Any]]
    origin: str  # e.g. "file data/train.jsonl" or "hub dataset org/name (split train)"
    line_numbers: list[int] | None = None  # JSONL: the line of each row, for messages

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self.rows)):
            yield self.rows[i]

    def where(self, i: int) -> str:
        if self.line_numbers is not None:
            return f"{self.origin}, line {self.line_numbers[i]}"
        return f"{self.origin}, row {i}"

    @property
    def columns(self) -> list[str]:
        if hasattr(self.rows, "column_names"):
            return list(self.rows.column_names)  # type: ignore[union-attr]
        return sorted({k for row in self.rows[:100] for k in row})

    def select(self, indices: Sequence[int]) -> Rows:
        rows = [self.rows[i] for i in indices]
        lines = [self.line_numbers[i] for i in indices] if self.line_numbers is not None else None
        return Rows(rows, self.origin, lines)


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, with or without a byte-order mark (which is dropped). Other
    encodings are refused with the line and byte where the file stops being UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(not_utf8(path, data, exc)) from None


def _read_json_file(path: Path) -> Rows:
    text = read_text(path)
    if not text.strip():
        raise DataError(f"file {path} is empty; it needs at least one row")
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"file {path} is not valid JSON (line {exc.lineno}: {exc.msg})"
            ) from None
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(
                    f"file {path}, row {i}: expected an object with named fields, got {type(row).__name__}"
                )
        return Rows(data, f"file {path}")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"file {path}, line {number}: not valid JSON ({exc.msg}); JSONL files need one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"file {path}, line {number}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
        lines.append(number)
    if not rows:
        raise DataError(f"file {path} holds no rows")
    return Rows(rows, f"file {path}", lines)


def _load_with_datasets(builder_or_path: str, origin: str, **kwargs: Any) -> Rows:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(builder_or_path, **kwargs)
    except Exception as exc:  # datasets raises many types; say which source failed and why
        raise DataError(f"could not load {origin}: {type(exc).__name__}: {exc}") from None
    if len(ds) == 0:
        raise DataError(f"{origin} is empty; it needs at least one row")
    return Rows(ds, origin)


def load_rows(spec: str, split: str = "train") -> Rows:
    """Load a table from `spec`: file(s) (comma-separated), a dataset folder, or a hub id."""
    spec = spec.strip()
    if not spec:
        raise DataError(
            "no dataset given: pass a hub id, a dataset folder, or JSON/JSONL/Parquet/CSV files"
        )
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) > 1 or Path(parts[0]).suffix.lower() in FILE_BUILDERS:
        return _load_files([Path(p) for p in parts])
    path = Path(parts[0])
    if path.is_dir():
        return _load_folder(path, split)
    if path.exists():
        raise DataError(
            f"file {path} has an unknown format; use one of {', '.join(sorted(FILE_BUILDERS))}, a dataset folder or a hub id"
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise DataError(f"dataset {spec} does not exist (neither a local path nor a hub id)")
    return _load_with_datasets(spec, f"hub dataset {spec} (split {split})", split=split)


def _load_files(paths: list[Path]) -> Rows:
    for p in paths:
        if not p.is_file():
            raise DataError(f"file {p} does not exist")
        if p.suffix.lower() not in FILE_BUILDERS:
            raise DataError(
                f"file {p} has an unknown format; use one of {', '.join(sorted(FILE_BUILDERS))}"
            )
        if p.stat().st_size == 0:
            raise DataError(f"file {p} is empty; it needs at least one row")
    kinds = {FILE_BUILDERS[p.suffix.lower()] for p in paths}
    if len(kinds) > 1:
        raise DataError(f"files {', '.join(map(str, paths))} mix formats; give files of one format")
    if kinds == {"json"}:
        tables = [_read_json_file(p) for p in paths]
        if len(tables) == 1:
            return tables[0]
        rows = [r for t in tables for r in t.rows]
        return Rows(rows, "files " + ", ".join(map(str, paths)))
    if kinds == {"csv"}:
        for p in paths:  # datasets would fail on other encodings without saying where
            read_text(p)
    names = ", ".join(map(str, paths))
    return _load_with_datasets(
        kinds.pop(),
        f"file{'s' if len(paths) > 1 else ''} {names}",
        data_files=[str(p) for p in paths],
        split="train",
    )


def _load_folder(path: Path, split: str) -> Rows:
    import datasets

    if (
        (path / "dataset_dict.json").exists()
        or (path / "dataset_info.json").exists()
        or (path / "state.json").exists()
    ):
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"could not load dataset folder {path}: {exc}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(
                    f"dataset folder {path} has no split '{split}'; it has {', '.join(ds)}"
                )
            ds = ds[split]
        if len(ds) == 0:
            raise DataError(f"dataset folder {path} (split {split}) is empty")
        return Rows(ds, f"dataset folder {path} (split {split})")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_BUILDERS)
    split_files = [p for p in files if p.stem == split or p.stem.startswith(split + "-")]
    if split_files:
        return _load_files(split_files)
    return _load_with_datasets(str(path), f"dataset folder {path} (split {split})", split=split)


def split_rows(rows: Rows, eval_fraction: float, seed: int) -> tuple[Rows, Rows | None]:
    """Hold out a seeded random `eval_fraction` of rows (at least one, if the fraction is > 0)."""
    import random

    if eval_fraction <= 0 or len(rows) < 2:
        return rows, None
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * eval_fraction)))
    return rows.select(sorted(order[n_eval:])), rows.select(sorted(order[:n_eval]))


def subsample(rows: Rows, limit: int | None, seed: int) -> Rows:
    if limit is None or len(rows) <= limit:
        return rows
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return rows.select(sorted(order[:limit]))


def take_share(rows: Rows, fraction: float, seed: int) -> Rows:
    """A seeded `fraction` of rows (at least one). The same seed shuffles the same rows the same
    way, so the rows of a smaller share are among those of a larger one: data-size sweeps nest."""
    if fraction >= 1.0:
        return rows
    return subsample(rows, max(1, int(round(len(rows) * fraction))), seed)


def load_train_eval(data: Any, seed: int) -> tuple[Rows, Rows | None]:
    """Training rows and held-out rows for a stage's `data` section: the held-out rows come from
    `eval_path` / `eval_split` when given, else a seeded `eval_fraction` of the training rows
    (split off before `train_fraction` is taken, so every share is judged on the same rows)."""
    rows = subsample(load_rows(data.path, data.split), data.max_rows, seed)
    if data.eval_path or data.eval_split:
        eval_rows = load_rows(data.eval_path or data.path, data.eval_split or data.split)
    else:
        rows, eval_rows = split_rows(rows, data.eval_fraction, seed)
    rows = take_share(rows, data.train_fraction, seed)
    if eval_rows is not None:
        eval_rows = subsample(eval_rows, data.max_eval_rows, seed)
    return rows, eval_rows
