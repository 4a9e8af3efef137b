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
    except Exception as exc:  # the module itself fails: a syntax error, an error at import time
        raise ConfigError(
            f"config key '{key}': importing module {module_name!r} raised {type(exc).__name__}: "
            f"{exc}{_where_raised(exc)}"
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
    """Call a judge and check what it returned: one finite number (gold) or one true / false
    value (fluency) per response. Anything else is refused, naming the judge (`what` says what
    it is: "gold reward", "reward function" ...) and the value."""
    what = f"{what or ('gold reward' if kind == 'gold' else 'fluency check')} {spec!r}"
    try:
        values = fn(prompts, responses)
    except Exception as exc:  # a user's function: say whose, where, and on what
        raise RtoError(
            f"{what} raised {type(exc).__name__}: {exc}{_where_raised(exc)}, when called with "
            f"{len(responses)} prompts and responses (the first response: {_short(responses[:1])}); "
            "fix the function, then rerun"
        ) from None
    one = "number" if kind == "gold" else "true / false value"
    expected = f"a list with one {one} per response"
    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise RtoError(
            f"{what} returned {_short(values)} ({type(values).__name__}); a judge must return {expected}"
        )
    values = list(values)
    if len(values) != len(responses):
        raise RtoError(
            f"{what} returned {len(values)} values for {len(responses)} responses; a judge must return "
            f"{expected} (it returned {_short(values)})"
        )
    out = [_judge_value(v, kind) for v in values]
    bad = [i for i, v in enumerate(out) if v is None]
    if bad:
        i, value = bad[0], values[bad[0]]
        non_finite = isinstance(value, float) and not math.isfinite(value)
        got = (
            f"a non-finite value, {value},"
            if non_finite
            else f"{_short(value)} ({type(value).__name__})"
        )
        raise RtoError(
            f"{what} returned {got} for response {i} ({_short(responses[i])}); a judge must "
            f"return {expected}" + (" (finite: no NaN or inf)" if kind == "gold" else "")
        )
    return out


def _judge_value(v: Any, kind: str) -> float | bool | None:
    """A judge's value as a float (gold) or a bool (fluency); None if it is not one."""
    if isinstance(v, (str, bytes)) or v is None:
        return None
    try:
        number = float(v)  # int, float, bool, numpy and 0-d torch numbers
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    if kind == "gold":
        return number
    return bool(number) if number in (0.0, 1.0) else None


def _short(value: Any) -> str:
    return f"{value!r:.80}"


def _where_raised(exc: BaseException) -> str:
    """' (at file.py:12)': the innermost frame of the user's judge."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


TASKS = {"sentiment": "rto.tasks.sentiment"}
