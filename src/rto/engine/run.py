"""The output folder of a stage: refuse to clobber a finished run, write the resolved config,
and tell a complete output (summary.json written last) from an interrupted one."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from rto.config.core import to_dict
from rto.engine.files import write_atomic
from rto.errors import RtoError

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
# What rto writes into an output folder; --overwrite removes only these.
OWNED = (
    "checkpoints",
    "metrics.jsonl",
    SUMMARY_FILE,
    CONFIG_FILE,
    "tensorboard",
    "README.md",
)


def resolved_config(cfg: Any) -> dict[str, Any]:
    """The config as it should be written: everything resolved, run-control flags reset, so that
    `rto <stage> --config OUT/config.yaml` repeats the run."""
    data = to_dict(cfg)
    for flag in ("resume", "overwrite"):
        if flag in data:
            data[flag] = False
    if data.get("push_to_hub"):  # an action, not a setting: rerunning from the file does not upload
        data["push_to_hub"] = None
    return data


def prepare_out_dir(cfg: Any, stage: str, *, is_main: bool = True) -> Path:
    out = Path(cfg.out)
    resume = getattr(cfg, "resume", False)
    overwrite = getattr(cfg, "overwrite", False)
    has_run = out.is_dir() and any(
        (out / name).exists() for name in (SUMMARY_FILE, "checkpoints", "metrics.jsonl")
    )
    if has_run and not resume and not overwrite:
        raise RtoError(
            f"output folder {out} already holds a {stage} run; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    if is_main:
        if has_run and overwrite and not resume:
            for name in OWNED:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        new = resolved_config(cfg)
        old_path = out / CONFIG_FILE
        if resume and old_path.exists():
            old = yaml.safe_load(old_path.read_text()) or {}
            changed = sorted(_diff(old, new))
            if changed:
                print(
                    f"[rto] resuming with changed config keys: {', '.join(changed)}",
                    file=sys.stderr,
                )
        write_atomic(old_path, yaml.safe_dump(new, sort_keys=False))
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        out: list[str] = []
        for k in keys:
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b else []


def is_complete(out: str | Path) -> bool:
    return (Path(out) / SUMMARY_FILE).is_file()
