"""Held-out accuracy of a learned reward (reward model or DPO implicit reward) next to its
ceiling: the accuracy of the gold reward on the same pairs, when the data carries gold scores."""

from __future__ import annotations

import statistics
from typing import Any


def gold_ceiling(examples: list[dict[str, Any]], columns: list[str]) -> float | None:
    """Accuracy of the gold reward on these pairs (ties count one half), if the columns exist."""
    if len(columns) != 2 or not examples or any(c not in examples[0] for c in columns):
        return None
    c, r = columns
    return statistics.fmean(1.0 if e[c] > e[r] else 0.5 if e[c] == e[r] else 0.0 for e in examples)


def add_held_out_accuracy(
    summary: dict[str, Any],
    engine: Any,
    examples: list[dict[str, Any]],
    columns: list[str],
    what: str,
    key: str,
) -> None:
    """Put the gold ceiling into `summary` and say both numbers."""
    ceiling = gold_ceiling(examples, columns)
    if ceiling is not None:
        summary["eval/gold_accuracy"] = ceiling
    engine.say(
        f"[rto] {what} held-out accuracy {summary[key]:.3f}"
        + (f" (gold reward on the same pairs: {ceiling:.3f})" if ceiling is not None else "")
    )
