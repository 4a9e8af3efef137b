"""Built-in tasks and the registry of judges (gold rewards and fluency checks).

A judge is a function `(prompts: list[str], responses: list[str]) -> list[float | bool]`.
Stages ask for one by name: a registered name (`sentiment`) or `module:function` for a user's
own Python judge (the module must be importable, e.g. on PYTHONPATH).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

from rto.errors import ConfigError, RtoError

Judge = Callable[[list[str], list[str]], list[Any]]


def _sentiment(name: str) -> Judge:
    from rto.tasks import sentiment

    return getattr(sentiment, name)


REGISTERED: dict[str, dict[str, Callable[[], Judge]]] = {
    "gold": {"sentiment": lambda: _sentiment("gold_reward")},
    "fluency": {
        "sentiment": lambda: _sentiment("fluency"),  # the built-in (short) reviews
        "sentiment_medium": lambda: _sentiment("fluency_medium"),
        "sentiment_long": lambda: _sentiment("fluency_long"),
    },
}


def register(kind: str, name: str, fn: Judge) -> None:
    """Register a judge under `name` (kind 'gold' or 'fluency') for use from configs."""
    REGISTERED[kind][name] = lambda: fn


def resolve(spec: str, kind: str, key: str) -> Judge:
    """The judge `spec` names; `key` is the config key it came from (for error messages)."""
    if spec in REGISTERED[kind]:
        return REGISTERED[kind][spec]()
    if ":" not in spec:
        names = ", ".join(sorted(REGISTERED[kind]))
        raise ConfigError(
            f"config key '{key}' = {spec!r} is not a registered {kind} judge ({names}) nor a module:function"
        )
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"config key '{key}': cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(
            f"config key '{key}': module {module_name!r} has no function {func_name!r}"
        )
    return fn


def call_judge(
    fn: Judge,
    prompts: list[str],
    responses: list[str],
    spec: str,
    kind: str,
    what: str | None = None,
) -> list[Any]:
    """Call a judge and check that it returned one finite value per response (`what` names it
    in errors: "gold reward", "reward function" ...)."""
    what = what or ("gold reward" if kind == "gold" else f"{kind} judge")
    values = list(fn(prompts, responses))
    if len(values) != len(responses):
        raise RtoError(
            f"{what} {spec!r} returned {len(values)} values for {len(responses)} responses"
        )
    if kind == "gold":
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise RtoError(
                f"{what} {spec!r} returned a value that is not a number: {values!r:.80}"
            ) from None
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise RtoError(
                f"{what} {spec!r} returned a non-finite value for response {bad[0]}: {responses[bad[0]]!r:.80}"
            )
    else:
        values = [bool(v) for v in values]
    return values


TASKS = {"sentiment": "rto.tasks.sentiment"}
