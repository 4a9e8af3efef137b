"""Fault injection for tests: `RTO_FAULT=<point>:<step>` makes that point fail exactly as the
real fault would, so tests can prove that resuming works and that no fault corrupts the latest
checkpoint. Points: kill_after_step and kill_during_save (SIGKILL, as `kill -9`),
disk_full_during_save (the write fails with "No space left on device")."""

from __future__ import annotations

import errno
import os
import signal


def maybe_fault(point: str, step: int, path: object = None) -> None:
    if os.environ.get("RTO_FAULT") != f"{point}:{step}":
        return
    if point.startswith("disk_full"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    os.kill(os.getpid(), signal.SIGKILL)
