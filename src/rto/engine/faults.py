"""Fault injection for tests: `RTO_FAULT=<point>:<step>` kills the process with SIGKILL at that
point, exactly as `kill -9` would, so tests can prove that resuming works and that a kill during
a checkpoint save never corrupts the latest checkpoint. Points: kill_after_step, kill_during_save."""

from __future__ import annotations

import os
import signal


def maybe_fault(point: str, step: int) -> None:
    if os.environ.get("RTO_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
