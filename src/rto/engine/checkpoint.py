"""Resumable checkpoints that a kill can never corrupt.

A checkpoint is written into `checkpoints/.partial-step-N`, flushed, and only then renamed to
`checkpoints/step-N` (a rename is atomic). A folder named `step-N` is therefore always complete;
a kill during a save leaves only a `.partial-*` folder, which the next run deletes.
With several processes every one writes its part (its random state; its shards under ZeRO-3 /
FSDP) into the same `.partial-` folder, and the main process renames it once all have finished.
Inside: accelerate's state (models, optimisers, every random generator) and `trainer_state.json`
(step and whatever the stage adds).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any

from rto.engine.faults import maybe_fault
from rto.errors import TrainingError
from rto.files import read_json, write_json

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# How writers that do not raise OSError report a full disk: torch's zip writer (torch.save, a
# RuntimeError "[enforce fail at inline_container.cc] . unexpected pos N vs M" after a short
# write) and safetensors (SafetensorError "I/O error: No space left on device (os error 28)").
_DISK_FULL_TEXT = (
    "No space left on device",
    "Disk quota exceeded",
    "os error 28",
    "os error 122",
    "StorageFull",
    "unexpected pos",
)
_NEARLY_FULL = 1 << 20  # bytes; a write that failed with less free than this ran out of space


class Checkpoints:
    def __init__(self, out_dir: Path, accelerator: Any, keep: int):
        self.root = Path(out_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep

    def complete(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, as the main process sees it (the same on every one)."""
        done = self.complete() if self.accelerator.is_main_process else []
        found = [str(done[-1][1]) if done else None]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(found, from_process=0)
        return Path(found[0]) if found[0] else None

    def clean_partial(self) -> None:
        if self.accelerator.is_main_process and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".partial-"):
                    shutil.rmtree(p, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, step: int, state: dict[str, Any]) -> Path:
        acc = self.accelerator
        final = self.root / f"step-{step}"
        partial = self.root / f".partial-step-{step}"
        try:
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(
                str(partial), safe_serialization=True
            )  # collective: each process its part
            maybe_fault("disk_full_during_save", step, partial / "model.safetensors")
            acc.wait_for_everyone()  # every part is on disk before the one rename makes it a checkpoint
            if acc.is_main_process:
                write_json(partial / STATE_FILE, {"step": step, **state})
                _fsync_tree(partial)
                maybe_fault("kill_during_save", step)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(partial, final)
                _fsync_dir(self.root)
                for _, old in self.complete()[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except Exception as exc:  # torch and safetensors report a full disk without OSError
            full = disk_full(exc, partial)  # before the partial checkpoint frees its space
            if not full and not isinstance(exc, OSError):
                raise
            raise self._write_failed(exc, step, partial, full) from None
        acc.wait_for_everyone()
        return final

    def _write_failed(self, exc: Exception, step: int, partial: Path, full: bool) -> TrainingError:
        """A checkpoint that could not be written (a full disk, a lost mount): drop the partial
        one, and say which complete checkpoint the run resumes from."""
        shutil.rmtree(partial, ignore_errors=True)
        latest = self.latest()
        what = "the disk is full" if full else f"{getattr(exc, 'strerror', None) or exc}"
        where = getattr(exc, "filename", None) or partial
        resume = (
            f"the last complete checkpoint, {latest}, is intact and resumes with --resume"
            if latest is not None
            else "no complete checkpoint was written yet, so --resume starts from the beginning"
        )
        fewer = " (or set train.keep_checkpoints 1)" if self.keep > 1 else ""
        fix = f"free space there{fewer}" if full else "fix that"
        return TrainingError(
            f"could not write the checkpoint of step {step}: {what} ({where}); {resume}. "
            f"{fix[0].upper() + fix[1:]}, then rerun the same command with --resume"
        )

    def load(self, path: Path) -> dict[str, Any]:
        self.accelerator.load_state(str(path))
        return read_json(path / STATE_FILE)

    def remove_all(self) -> None:
        if self.accelerator.is_main_process and self.root.is_dir():
            shutil.rmtree(self.root, ignore_errors=True)
        self.accelerator.wait_for_everyone()


def disk_full(exc: BaseException, path: str | Path | None = None) -> bool:
    """Whether `exc`, raised while writing into `path`, came from a full disk (or quota). An
    OSError says so by its errno; torch's zip writer and safetensors raise other exceptions,
    recognised by their text or, failing that, by `path`'s file system having (almost) no space
    left at the moment of the failure."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if any(text in str(exc) for text in _DISK_FULL_TEXT):
        return True
    return path is not None and free_space(Path(path)) < _NEARLY_FULL


def free_space(path: Path) -> float:
    """Bytes this user may still write on the file system of `path` (or of its nearest folder
    that exists); infinite when that cannot be told."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return float("inf")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
