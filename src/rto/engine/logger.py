"""Metrics: `metrics.jsonl` (one JSON object per logged step; the source of truth), `summary.json`
(final), mirrors in experiment trackers (engine/trackers.py), and a progress bar with the key
numbers."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from rto.engine import trackers
from rto.engine.card import write_card
from rto.engine.environment import environment
from rto.files import write_atomic, write_json


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf: keep them readable
    return value


class MetricsLogger:
    def __init__(
        self,
        out_dir: Path,
        log_cfg: Any,
        *,
        enabled: bool,
        total_steps: int,
        run_config: dict[str, Any],
        progress_keys: tuple[str, ...] = (),
    ):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.progress_keys = progress_keys
        self._trackers: trackers.Trackers | None = None
        self._bar = None
        if not enabled:
            return
        names = log_cfg.trackers()
        if names:
            name = log_cfg.run_name or Path(out_dir).resolve().name
            self._trackers = trackers.Trackers(
                names, Path(out_dir), log_cfg.project, name, run_config
            )
        if log_cfg.progress:
            from tqdm.auto import tqdm

            # on a terminal the bar redraws often; in a log file it writes a line every 30 s
            interval = 0.5 if sys.stderr.isatty() else 30.0
            self._bar = tqdm(
                total=total_steps,
                dynamic_ncols=True,
                file=sys.stderr,
                leave=True,
                mininterval=interval,
            )

    def start_at(self, step: int) -> None:
        """Drop lines logged after `step` (work lost by an interruption, about to be redone)."""
        if not self.enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if row.get("step", 0) <= step:
                    kept.append(line + "\n")
            write_atomic(self.path, "".join(kept))
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}
        row = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._trackers is not None:  # mirrors, after the row is on disk (NaN kept as NaN)
            self._trackers.log(values, step)
        if self._bar is not None:
            shown = {
                k.split("/")[-1]: f"{row[k]:.4g}"
                for k in self.progress_keys
                if isinstance(row.get(k), (int, float))
            }
            if shown:
                self._bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._trackers is not None:
            self._trackers.close()


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    """Write summary.json: the stage's final numbers, how many processes made them (world_size,
    distributed_type), then where they were made (`environment`); then the folder's card
    (README.md)."""
    from rto.engine.distributed import describe

    summary = {k: _clean(v) for k, v in summary.items()}
    for k, v in describe().items():
        summary.setdefault(k, v)
    summary.setdefault("environment", environment())
    write_json(Path(out_dir) / "summary.json", summary)
    write_card(out_dir)
