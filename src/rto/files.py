"""Small file helpers that never leave a half-written file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rto.errors import ConfigError


def write_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary file, flush it to disk, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def replace_marked(text: str, start: str, end: str, block: str, where: str) -> str:
    """`text` with what lies between the markers `start` and `end` replaced by `block` (a README
    block written from a results file); ConfigError naming `where` when a marker is missing."""
    if start not in text or end not in text:
        raise ConfigError(f"{where} has no {start} ... {end} block to write into")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"
