"""The output folder of a stage, and the promise that a command that fails changes nothing in it.

A stage opens its folder in two steps:

* `RunFolder.check(cfg, stage)`, before any work: refuses an --out that is a file or cannot be
  written, or that is (or holds) one of the run's own inputs, refuses to clobber an earlier run
  without --resume or --overwrite, and decides what this run does there. It writes nothing.
* `folder.begin()`, once every input has been validated and loaded, right before the first
  write: only then is an old run replaced (--overwrite) and config.yaml written.

So a typo in a path, a bad data row or a model that does not load leaves an earlier run exactly
as it was. A run is finished when summary.json exists (it is written last); --resume on a
finished run with the same config does nothing and says so, with another config it is refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rto.engine.card import CARD_FILE, written_by_rto
from rto.errors import RtoError
from rto.files import read_json, write_atomic

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
# What rto writes into an output folder; --overwrite removes only these.
OWNED = (
    "checkpoints",
    "metrics.jsonl",
    SUMMARY_FILE,
    CONFIG_FILE,
    "tensorboard",
    CARD_FILE,  # unless it is the user's own
)
# Config keys that do not change what a run makes: a finished run resumed with other values of
# these is still the same run.
NOT_COMPARED = ("out", "log")
# Config leaves whose values are names, not files or folders (splits, columns, judges, hub ids of
# uploads, tracker names): a value that happens to name a path there is not an input. Every other
# string leaf without fixed choices is an input when it names an existing file or folder.
NOT_PATHS = frozenset(
    {
        "out",
        "split",
        "eval_split",
        "prompts_split",
        "revision",
        "gguf_file",  # a file name inside model.path, which is checked itself
        "push_to_hub",
        "gold_reward",
        "fluency",
        "reward_fn",
        "token_reward_fn",
        "gold_columns",
        "margin_column",
        "segment_delimiters",
        "target_modules",
        "report_to",
        "project",
        "run_name",
        "title",
        "baseline",
    }
)


def resolved_config(cfg: Any) -> dict[str, Any]:
    """The config as it should be written: everything resolved, run-control flags reset, so that
    `rto <stage> --config OUT/config.yaml` repeats the run."""
    data = asdict(cfg)
    for flag in ("resume", "overwrite"):
        if flag in data:
            data[flag] = False
    if data.get("push_to_hub"):  # an action, not a setting: rerunning from the file does not upload
        data["push_to_hub"] = None
    return data


@dataclass
class RunFolder:
    """What a stage run will do in its output folder (from `check`); `begin` does it.

    action: "start" (no earlier run), "continue" (--resume an interrupted run), "replace"
    (--overwrite an earlier run) or "done" (--resume a run that finished with this config)."""

    path: Path
    stage: str
    action: str
    config: dict[str, Any] = field(repr=False)
    # called (main process) once the run begins writing, after config.yaml: the caller's own
    # record of the run (the pipeline's stage state) goes in at the same moment
    on_begin: Callable[[], None] | None = field(default=None, repr=False)

    @classmethod
    def check(cls, cfg: Any, stage: str) -> RunFolder:
        """Decide what this run does in cfg.out; refuse what would lose data. Writes nothing."""
        out = Path(cfg.out)
        check_writable(out)
        check_not_an_input(cfg, out)
        config = resolved_config(cfg)
        resume = getattr(cfg, "resume", False)
        overwrite = getattr(cfg, "overwrite", False)
        finished = (out / SUMMARY_FILE).is_file()
        has_run = out.is_dir() and any(
            (out / name).exists() for name in (SUMMARY_FILE, "checkpoints", "metrics.jsonl")
        )
        what = f"a finished {_stage_of(out) or stage}" if finished else f"an unfinished {stage}"
        if not has_run:
            action = "start"
        elif finished and overwrite:
            action = "replace"
        elif finished and resume:
            changed = changed_keys(_read_config(out), config)
            if changed:
                raise RtoError(
                    f"output folder {out} holds {what} run made with another config "
                    f"({describe_changes(changed)}); --resume only continues an unfinished run. Pass "
                    "--overwrite to replace the finished run, or choose another --out"
                )
            action = "done"
        elif resume:
            foreign = foreign_keys(_read_config(out), config)
            if foreign:
                raise RtoError(
                    f"output folder {out} holds an unfinished run that this {stage} run cannot "
                    f"continue: its config.yaml has other keys ({', '.join(foreign[:6])}"
                    f"{' ...' if len(foreign) > 6 else ''}), so another stage (or another rto "
                    "version) made it. Resume it with the command that started it, pass --overwrite "
                    "to replace it, or choose another --out"
                )
            action = "continue"
        elif overwrite:
            action = "replace"
        else:
            hint = "--resume to continue it, " if not finished and hasattr(cfg, "resume") else ""
            raise RtoError(
                f"output folder {out} already holds {what} run; pass {hint}--overwrite to "
                "replace it, or choose another --out"
            )
        return cls(out, stage, action, config)

    @property
    def done(self) -> bool:
        """--resume on a run that already finished with this config: there is nothing to do."""
        return self.action == "done"

    def finished_summary(self) -> dict[str, Any]:
        """The summary of the finished run (action "done"), after saying so."""
        print(
            f"[rto] {self.path} already holds a finished {self.stage} run with this config; "
            "nothing to do (pass --overwrite to run it again)",
            file=sys.stderr,
            flush=True,
        )
        return read_json(self.path / SUMMARY_FILE)

    def begin(self, *, is_main: bool = True) -> Path:
        """Every input is validated and loaded: replace the old run (--overwrite), write
        config.yaml. Only the main process writes; the caller synchronises processes."""
        out = self.path
        if not is_main or self.done:
            return out
        if self.action == "replace":
            for name in OWNED:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists() and (name != CARD_FILE or written_by_rto(p)):
                    p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        if self.action == "continue" and (out / CONFIG_FILE).exists():
            changed = changed_keys(_read_config(out), self.config)
            if changed:
                print(
                    f"[rto] resuming with changed config keys: {describe_changes(changed)}",
                    file=sys.stderr,
                )
        else:  # a continued run keeps its config.yaml until its checkpoint has loaded
            self.write_config()
        if self.on_begin is not None:
            self.on_begin()
        return out

    def write_config(self, *, is_main: bool = True) -> None:
        """Write this run's config.yaml: at `begin`, or once a continued run's checkpoint has
        loaded (so a checkpoint that does not fit leaves the config it was made with)."""
        if is_main:
            write_atomic(self.path / CONFIG_FILE, yaml.safe_dump(self.config, sort_keys=False))


def check_writable(out: Path) -> None:
    """--out must be a folder that exists and can be written, or one that can be created."""
    if out.exists() and not out.is_dir():
        raise RtoError(f"--out {out} is a file, not a folder; choose a folder for the run's output")
    existing = out
    while not existing.exists():  # the nearest folder that exists: the one a new --out goes in
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise RtoError(
            f"--out {out} cannot be created: {existing} is a file, not a folder; choose another --out"
        )
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        where = "it is" if existing == out else f"{existing} is"
        raise RtoError(
            f"--out {out} cannot be written: {where} read-only for this user; choose another --out "
            "or change the folder's permissions"
        )


def input_paths(cfg: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, path) for every file or folder the config names: any string leaf (or list
    item) without fixed choices that exists as a path, as a whole, as one of its comma-separated
    parts (data.path) or as the PATH of a NAME=PATH entry (eval's policies, report's curves).
    Generic on purpose, so that a new key that takes a path is covered without a list to update."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from input_paths(value, key + ".")
            continue
        if f.name in NOT_PATHS or f.metadata.get("choices"):
            continue
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str) or not text.strip():
                continue
            if os.path.exists(text):
                yield key, text
                continue
            for part in text.split(","):
                part = part.strip()
                for candidate in dict.fromkeys((part, part.split("=", 1)[-1])):
                    if candidate and os.path.exists(candidate):
                        yield key, candidate
                        break


def check_not_an_input(cfg: Any, out: Path) -> None:
    """--out must not be, or hold, a file or folder the run reads: a run writes its model,
    config.yaml and metrics there, and --overwrite removes what an earlier run left, so the run
    would replace its own input (`rto sft --out M --model.path M`). Refused with or without
    --overwrite or --resume. Compared by the files themselves (symlinks and relative paths
    resolve to the same folder); an --out inside an input's folder is fine (a pipeline's root
    holds every stage's output)."""
    try:
        target = os.stat(out)
    except OSError:
        return  # a new --out holds nothing yet
    same = (target.st_dev, target.st_ino)
    for key, path in input_paths(cfg):
        real = Path(os.path.realpath(path))
        for folder in (real, *real.parents):
            try:
                st = os.stat(folder)
            except OSError:
                break
            if (st.st_dev, st.st_ino) != same:
                continue
            if folder == real:
                what, harm = f"is {key} ({path})", "would replace"
            else:
                what, harm = f"holds {key} ({path})", "could replace (or --overwrite remove)"
            raise RtoError(
                f"--out {out} {what}, an input of this run, which the run's files {harm}. Choose "
                "another --out, one that neither is nor holds an input of the run"
            )


def _stage_of(out: Path) -> str | None:
    """The stage that made the finished run in `out` (its summary says), if it can be read."""
    try:
        stage = read_json(out / SUMMARY_FILE).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, str) else None


def _read_config(out: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load((out / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def changed_keys(old: dict[str, Any] | None, new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every compared key that differs; a missing or
    unreadable old config differs as a whole."""
    if old is None:
        return [(CONFIG_FILE, "missing or unreadable", "this run's config")]
    old = {k: v for k, v in old.items() if k not in NOT_COMPARED}
    new = {k: v for k, v in new.items() if k not in NOT_COMPARED}
    return sorted(_diff(old, new))


def foreign_keys(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Dotted keys that only one of two configs has: a run of another stage (an unreadable old
    config has none, and is reported by `changed_keys`)."""
    if old is None:
        return []
    return sorted(_keys(old) ^ _keys(new))


def _keys(config: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in config.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def describe_changes(changed: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    shown = [f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:limit]]
    more = f", and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(shown) + more


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[tuple[str, Any, Any]] = []
        for k in set(a) | set(b):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [(prefix.rstrip("."), a, b)] if a != b else []
