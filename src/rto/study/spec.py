"""A study file: one comparison, declared before it runs (`rto study SPEC.yaml`; the format with
a worked example: docs/guide.md, "Compare methods fairly"). Keys: name, question, description,
recipe (a pipeline recipe: built-in name, or a path relative to the file), seeds,
recipe_overrides, shared (the recipe's stages trained once per seed), evaluate (its eval stage),
stages (more shared stages: {from: STAGE, ...changes}), arms ({model: STAGE}, {from: STAGE, ...}
or RL settings; conditions: [...] runs an arm in some conditions only), conditions (recipe
overrides; every arm runs in each), frontiers (arms whose (KL, metric) points form a reward-KL
frontier), claims (rto.study.claims), amendments (appended with their reason, never editing a
registered claim: arms, frontiers, conditions, claims) and readme ({file, start, end}).
Every error names the file and the key, and says what to write instead.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rto.errors import ConfigError

KEYS = {"name", "question", "description", "recipe", "seeds", "recipe_overrides", "shared",
        "evaluate", "stages", "arms", "conditions", "frontiers", "claims", "amendments", "readme"}  # fmt: skip
ARM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


@dataclass
class Spec:  # the keys of the module docstring
    path: Path
    name: str
    question: str
    recipe: str
    seeds: list[int]
    recipe_overrides: dict[str, Any]
    shared: list[str]
    evaluate: str
    stages: dict[str, dict[str, Any]]
    arms: dict[str, dict[str, Any]]
    conditions: dict[str, dict[str, Any]]  # {"main": {}} when the file has none
    frontiers: dict[str, list[str]]
    claims: list[dict[str, Any]]
    amendments: list[dict[str, Any]]
    readme: dict[str, str] | None
    description: str

    def all_arms(self) -> dict[str, dict[str, Any]]:
        """The registered arms, then every amendment's."""
        arms = dict(self.arms)
        for a in self.amendments:
            arms.update(a.get("arms") or {})
        return arms

    def all_frontiers(self) -> dict[str, list[str]]:
        """The registered frontiers, each extended by the amendments' arms."""
        out = {k: list(v) for k, v in self.frontiers.items()}
        for a in self.amendments:
            for name, arms in (a.get("frontiers") or {}).items():
                out.setdefault(name, []).extend(x for x in arms if x not in out[name])
        return out

    def recipe_file(self) -> Path:
        from rto.pipeline import recipe_path

        local = self.path.parent / self.recipe
        return local if local.is_file() else recipe_path(self.recipe)


def load(path: str | Path) -> Spec:
    """Read and check a study file (every arm, frontier and claim it names must exist)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"study file {p}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"study file {p}: expected a mapping of keys ({', '.join(sorted(KEYS))})")
    where = f"study file {p}"
    unknown = set(raw) - KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(KEYS))}")  # fmt: skip
    for key in ("name", "recipe", "seeds", "arms", "claims"):
        if key not in raw:
            raise ConfigError(f"{where}: key '{key}' is missing")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(raw["name"])):
        raise ConfigError(f"{where}: name {raw['name']!r}: use letters, digits, '_' and '-' (it names the results' files)")  # fmt: skip
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{where}: seeds must be a list of integers, e.g. [0, 1, 2]")
    spec = Spec(
        path=p, name=raw["name"], question=str(raw.get("question") or ""), recipe=str(raw["recipe"]),
        seeds=seeds, recipe_overrides=_mapping(raw, "recipe_overrides", where),
        shared=list(raw.get("shared") or []), evaluate=str(raw.get("evaluate") or "eval"),
        stages=_mapping(raw, "stages", where), arms=_mapping(raw, "arms", where),
        conditions=_mapping(raw, "conditions", where) or {"main": {}},
        frontiers=_mapping(raw, "frontiers", where), claims=list(raw["claims"] or []),
        amendments=list(raw.get("amendments") or []), readme=raw.get("readme"),
        description=str(raw.get("description") or ""),
    )  # fmt: skip
    for i, amendment in enumerate(spec.amendments):  # conditions an amendment adds run too
        added = amendment.get("conditions") if isinstance(amendment, dict) else None
        if added:
            if not isinstance(added, dict) or set(added) & set(spec.conditions):
                raise ConfigError(f"{where}, amendments[{i}].conditions: a mapping of new conditions (a registered one is never changed)")  # fmt: skip
            spec.conditions.update(copy.deepcopy(added))
    check(spec)
    return spec


def _mapping(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping")
    return copy.deepcopy(value)


def check(spec: Spec) -> None:
    """Everything a study names exists, before any run: its recipe and its stages, each arm's
    kind, the frontiers' arms, the claims' measures and rules (rto.study.claims.check)."""
    from rto.study import claims

    where = f"study file {spec.path}"
    try:
        recipe = yaml.safe_load(spec.recipe_file().read_text(encoding="utf-8"))
    except ConfigError as exc:
        raise ConfigError(f"{where}, key 'recipe': {exc}") from None
    stages = recipe.get("stages") or {}
    for name in [*spec.shared, spec.evaluate]:
        if name not in stages:
            raise ConfigError(f"{where}: stage '{name}' is not in the recipe {spec.recipe} (its stages: {', '.join(stages)})")  # fmt: skip
    for name, extra in spec.stages.items():
        if not isinstance(extra, dict) or ("from" not in extra and "stage" not in extra):
            raise ConfigError(f"{where}, stages.{name}: give 'from: <recipe stage>' or 'stage: <kind>'")  # fmt: skip
        if "from" in extra and extra["from"] not in stages:
            raise ConfigError(f"{where}, stages.{name}.from: '{extra['from']}' is not a recipe stage")  # fmt: skip
    known_models = set(spec.shared) | set(spec.stages)
    arms = spec.all_arms()
    if not arms:
        raise ConfigError(f"{where}: 'arms' is empty; name at least two things to compare")
    for i, amendment in enumerate(spec.amendments):
        if not isinstance(amendment, dict) or not str(amendment.get("reason") or "").strip():
            raise ConfigError(f"{where}, amendments[{i}]: an amendment needs its 'reason' (why it was added, and when)")  # fmt: skip
    for name, arm in arms.items():
        if not ARM_NAME.fullmatch(str(name)):
            raise ConfigError(f"{where}, arms.{name}: use letters, digits, '_', '-' and '.'")
        if not isinstance(arm, dict):
            raise ConfigError(f"{where}, arms.{name}: expected a mapping such as {{preset: ppo}}")
        only = arm.get("conditions", [])
        if not isinstance(only, list) or any(c not in spec.conditions for c in only):
            raise ConfigError(f"{where}, arms.{name}.conditions: a list of the study's conditions ({', '.join(spec.conditions)})")  # fmt: skip
        arm = {k: v for k, v in arm.items() if k != "conditions"}
        if "model" in arm:
            if set(arm) != {"model"} or arm["model"] not in known_models:
                raise ConfigError(f"{where}, arms.{name}.model: name a shared stage ({', '.join(sorted(known_models))}), alone")  # fmt: skip
        elif "from" in arm and arm["from"] not in stages:
            raise ConfigError(f"{where}, arms.{name}.from: '{arm['from']}' is not a recipe stage")
    for cond, over in spec.conditions.items():
        if not re.fullmatch(r"[A-Za-z0-9_\-/]+", str(cond)) or not isinstance(over, dict):
            raise ConfigError(f"{where}, conditions.{cond}: a name of letters, digits, '_', '-', '/' and a mapping of recipe overrides")  # fmt: skip
    for name, members in spec.all_frontiers().items():
        missing = [a for a in members if a not in arms]
        if missing or len(members) < 2:
            raise ConfigError(f"{where}, frontiers.{name}: needs two or more arms" + (f"; not arms: {', '.join(missing)}" if missing else ""))  # fmt: skip
    claims.check(spec, where)
