"""`rto pipeline --config FILE`: run the stages a recipe lists, in order, each feeding the next.

A recipe is YAML:

    out: runs/demo                 # every stage writes OUT/<stage name>
    seed: 0                        # default seed of every stage
    defaults:                      # per stage kind, under each stage of that kind
      rl: {train: {lr: 1.0e-4}}
    stages:
      task: {stage: task, task: sentiment}
      sft:  {stage: sft, model: {path: "{task}/base_model"}, data: {path: "{task}/sft_train.jsonl"}}
      ...

"{name}" in a value is the output folder of stage `name` (and "{out}" the pipeline's root). A
stage is skipped when its output is complete and was made with the same resolved config and the
same inputs (a fingerprint of its config and of the stages it reads from); a changed config or
`--force STAGE` reruns it and every stage after it that reads from it; an interrupted stage is
resumed from its last checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rto.commands import STAGES, TASK_STAGES, run_stage
from rto.config import core
from rto.engine.run import resolved_config
from rto.errors import ConfigError
from rto.files import read_json, write_atomic, write_json

RECIPES = Path(__file__).parent / "recipes"
STATE_FILE = "pipeline.json"
STAGE_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_\-]*)\}")


@dataclass
class PlannedStage:
    name: str
    kind: str
    config: Any
    task: str | None
    deps: list[str] = field(default_factory=list)
    fingerprint: str = ""


def recipe_path(spec: str) -> Path:
    """A recipe file, or the name of a built-in recipe (src/rto/recipes/NAME.yaml)."""
    p = Path(spec)
    if p.is_file():
        return p
    builtin = RECIPES / f"{spec.replace('-', '_')}.yaml"
    if builtin.is_file():
        return builtin
    names = ", ".join(sorted(f.stem for f in RECIPES.glob("*.yaml")))
    raise ConfigError(f"pipeline config {spec} is neither a file nor a built-in recipe ({names})")


def _substitute(value: Any, folders: dict[str, str], where: str, deps: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, folders, f"{where}.{k}", deps) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, folders, f"{where}[{i}]", deps) for i, v in enumerate(value)]
    if isinstance(value, str):

        def repl(m: re.Match) -> str:
            ref = m.group(1)
            if ref not in folders:
                known = ", ".join(folders)
                raise ConfigError(
                    f"pipeline key '{where}' refers to {{{ref}}}, which is not an earlier stage ({known})"
                )
            if ref != "out":
                deps.add(ref)
            return folders[ref]

        return STAGE_REF.sub(repl, value)
    return value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_override(recipe: dict[str, Any], assignment: str) -> None:
    """--set STAGE.key.sub=value"""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r} must look like STAGE.key=value")
    key, value = assignment.split("=", 1)
    parts = key.split(".")
    stages = recipe.get("stages") or {}
    if parts[0] not in stages:
        raise ConfigError(
            f"--set {assignment!r}: no stage named {parts[0]!r} (stages: {', '.join(stages)})"
        )
    node = stages[parts[0]]
    for i, p in enumerate(parts[1:-1], start=1):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(
                f"--set {assignment!r}: {'.'.join(parts[: i + 1])} is a value ({node!r}), "
                "not a section with keys"
            )
    try:
        node[parts[-1]] = yaml.safe_load(value) if value else value
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).strip()
        raise ConfigError(
            f"--set {assignment!r}: the value is not valid YAML ({problem})"
        ) from None


def plan(
    recipe_file: str,
    *,
    out: str | None = None,
    overrides: list[str] | None = None,
    backend: str | None = None,
) -> tuple[list[PlannedStage], dict[str, Any]]:
    """Validate every stage's config before any work; return them in order with fingerprints.
    `backend` (hf | vllm) sets generate.backend in every stage that samples."""
    path = recipe_path(recipe_file)
    recipe = core.load_yaml(path)
    for a in overrides or []:
        _set_override(recipe, a)
    unknown = set(recipe) - {"out", "seed", "defaults", "stages", "description"}
    if unknown:
        raise ConfigError(
            f"unknown pipeline key(s) {', '.join(sorted(unknown))} in {path}; allowed: out, seed, defaults, stages, description"
        )
    root = out or recipe.get("out")
    if not root:
        raise ConfigError(f"pipeline config {path} needs 'out' (or pass --out)")
    stages = recipe.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"pipeline config {path} needs a non-empty mapping 'stages'")
    defaults = recipe.get("defaults") or {}
    kinds = {s.name: s for s in STAGES}
    folders = {"out": str(root)}
    planned: list[PlannedStage] = []
    for name, spec in stages.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", str(name)) or name == "out":
            raise ConfigError(
                f"pipeline stage name {name!r} in {path}: use letters, digits, '_' and '-' (it names a folder and a {{placeholder}})"
            )
        if not isinstance(spec, dict) or "stage" not in spec:
            raise ConfigError(
                f"pipeline stage '{name}' in {path} needs 'stage: <kind>' (task, {', '.join(kinds)})"
            )
        spec = dict(spec)
        kind = spec.pop("stage")
        task = spec.pop("task", None) if kind == "task" else None
        if kind == "task":
            if task not in TASK_STAGES:
                raise ConfigError(
                    f"pipeline stage '{name}': unknown task {task!r}; built-in tasks: {', '.join(TASK_STAGES)}"
                )
            cls = TASK_STAGES[task].config_class()
        elif kind in kinds:
            cls = kinds[kind].config_class()
        else:
            raise ConfigError(
                f"pipeline stage '{name}': unknown stage kind {kind!r}; use task, {', '.join(kinds)}"
            )
        values = deep_merge(defaults.get(kind, {}) or {}, spec)
        keys = {f.name for f in dataclasses.fields(cls)}
        if "seed" in keys:
            values.setdefault("seed", recipe.get("seed", 0))
        if backend and "generate" in keys:
            values["generate"] = {**(values.get("generate") or {}), "backend": backend}
        deps: set[str] = set()
        values = _substitute(values, folders, f"stages.{name}", deps)
        leftover = re.search(r"\{[A-Za-z_][^{}]*\}", json.dumps(values))
        if leftover:
            raise ConfigError(
                f"pipeline stage '{name}': {leftover.group(0)} is not a stage name (stage names take letters, digits, '_' and '-')"
            )
        values["out"] = str(Path(root) / name)
        cfg = core.build(cls, file_values=values, file_name=f"{path} (stage {name})")
        planned.append(PlannedStage(name, kind, cfg, task, sorted(deps)))
        folders[name] = values["out"]
    by_name = {p.name: p for p in planned}
    for p in planned:
        payload = json.dumps({"kind": p.kind, "task": p.task, "config": resolved_config(p.config),
                              "inputs": {d: by_name[d].fingerprint for d in p.deps}}, sort_keys=True)  # fmt: skip
        p.fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return planned, {"recipe": str(path), "out": str(root), "stages": {p.name: {"stage": p.kind, **({"task": p.task} if p.task else {}),
                     **resolved_config(p.config)} for p in planned}}  # fmt: skip


def _state(folder: Path) -> dict[str, Any]:
    f = folder / STATE_FILE
    try:
        return read_json(f) if f.is_file() else {}
    except json.JSONDecodeError:
        return {}


def run(
    recipe_file: str,
    *,
    out: str | None = None,
    force: list[str] | None = None,
    overrides: list[str] | None = None,
    backend: str | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages in order (module docstring); returns {stage: status, seconds}."""
    planned, resolved = plan(recipe_file, out=out, overrides=overrides, backend=backend)
    names = [p.name for p in planned]
    for f in force or []:
        if f not in names:
            raise ConfigError(f"--force {f}: no stage of that name (stages: {', '.join(names)})")
    forced_from = min((names.index(f) for f in force or []), default=len(names))
    return PipelineRun(planned, resolved, forced_from).run()


class PipelineRun:
    """One `rto pipeline` run over its planned stages. What it writes besides the stages' own
    folders: OUT/pipeline.yaml (the resolved recipe, once the first stage begins writing, so a
    pipeline that fails on its inputs leaves the earlier run's recipe in place), each stage's
    OUT/<stage>/pipeline.json (its fingerprint; complete or not), OUT/pipeline_run.json."""

    def __init__(self, planned: list[PlannedStage], resolved: dict[str, Any], forced_from: int):
        from rto.engine.distributed import init_distributed

        # under torchrun / accelerate launch: one job over every process; each stage splits its
        # work, except task and report (main only)
        self.dist = init_distributed()
        self.main = self.dist.is_main_process
        self.planned, self.resolved, self.forced_from = planned, resolved, forced_from
        self.root = Path(resolved["out"])
        self.recipe_written = False
        self.rerun: set[str] = set()

    def say(self, message: str) -> None:
        if self.main:
            print(f"[rto] pipeline: {message}", file=sys.stderr, flush=True)

    def write_recipe(self) -> None:
        if self.main and not self.recipe_written:
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(
                self.root / "pipeline.yaml", yaml.safe_dump(self.resolved, sort_keys=False)
            )
        self.recipe_written = True

    def mark_started(self, stage: PlannedStage) -> None:
        """The stage began writing into its folder (main process): from now on the folder holds
        this run, unfinished, and resumes as it."""
        self.write_recipe()
        write_json(
            Path(stage.config.out) / STATE_FILE,
            {"fingerprint": stage.fingerprint, "complete": False},
        )

    def decide(self, i: int, p: PlannedStage) -> str | None:
        """None when stage `p` is up to date (skipped); else why it runs, with its config set to
        resume its interrupted run or to overwrite what its folder holds."""
        folder = Path(p.config.out)
        state = _state(folder)
        same = state.get("fingerprint") == p.fingerprint
        upstream_rerun = any(d in self.rerun for d in p.deps)
        forced = i >= self.forced_from
        if not forced and same and state.get("complete") and (folder / "summary.json").is_file() \
                and not upstream_rerun:  # fmt: skip
            return None
        if hasattr(p.config, "resume") and same and not upstream_rerun and not forced \
                and (folder / "checkpoints").is_dir():  # fmt: skip
            p.config.resume = True
            return "resuming its interrupted run"
        p.config.overwrite = True
        if forced:
            return "forced"
        if not state:
            return "first run"
        if upstream_rerun:
            return "its inputs were rerun"
        return "config changed" if not same else "incomplete"

    def run(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        for i, p in enumerate(self.planned):
            self.dist.wait_for_everyone()
            why = self.decide(i, p)
            if why is None:
                self.say(f"{p.name} is up to date, skipped")
                report[p.name] = {"status": "skipped"}
                continue
            self.say(f"running {p.name} ({p.kind}; {why})")
            self.dist.wait_for_everyone()
            began = time.time()
            # the stage's folder (its pipeline.json included) changes only once its inputs are
            # all loaded: the stage calls back when it begins writing
            run_stage(p.kind, p.config, p.task, on_begin=lambda p=p: self.mark_started(p))
            self.dist.wait_for_everyone()
            seconds = round(time.time() - began, 1)
            if self.main:
                write_json(Path(p.config.out) / STATE_FILE,
                           {"fingerprint": p.fingerprint, "complete": True, "seconds": seconds})  # fmt: skip
            self.rerun.add(p.name)
            report[p.name] = {"status": "ran", "seconds": seconds}
        self.write_recipe()
        if self.main:
            write_json(self.root / "pipeline_run.json", report)
        return report
