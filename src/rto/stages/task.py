"""`rto task NAME`: write a built-in task's datasets and base model folder."""

from __future__ import annotations

import importlib
import time
from typing import Any

from rto.engine.logger import write_summary
from rto.engine.run import RunFolder
from rto.tasks import TASKS


def run(cfg: Any, folder: RunFolder, name: str = "sentiment") -> dict[str, Any]:
    out = folder.begin()  # a task has no inputs to check first
    began = time.time()
    info = importlib.import_module(TASKS[name]).build(cfg)
    summary = {"stage": "task", **info, "seconds": round(time.time() - began, 1)}
    write_summary(out, summary)
    return summary
