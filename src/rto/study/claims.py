"""Claims: a measure read per seed, and a rule that turns the readings into a verdict
(REFERENCE, shown by `rto study --help`)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from rto.errors import ConfigError

ORDER = ["no", "weak", "yes"]
VERDICTS = ("yes", "weak", "no", "partly", "n/a")
MEASURES = ("difference", "equal_kl", "budget_share", "curve_share", "slope", "minus", "recorded")
RULES = ("greater", "less", "not_below", "share_at_most", "near", "all_positive")
REFERENCE = """\
measures (one number per seed, None where not read; metric: gold_reward_mean unless given;
condition: the study's first unless given):
  {difference: [a, b]}            a's metric minus b's
  {equal_kl: a, frontier: F}      a's metric minus frontier F (linear in KL between its arms) at
                                  a's KL; not read outside F's KL range; sign: -1 for F minus a
  {budget_share: {arm: share}, target: b}
                                  the smallest share of the budget at which the arms' curve
                                  reaches b's metric (never: infinite)
  {curve_share: a, target: b}     the share of b's RL samples after which a's rollout gold reward
                                  (trailing mean over a tenth of the run) reaches b's final value
  {slope: MEASURE, over: {condition: x}}
                                  least-squares slope over conditions against x (a number, log2
                                  of it with log2: true, or {log2_of: arm, metric: M}); a seed
                                  counts where two or more conditions are read
  {minus: [MEASURE, MEASURE]}     the first reading minus the second
  {recorded: NAME}                values in the results' "recorded" (a measurement made apart);
                                  saved_as: NAME on a measure reads them where the runs' data is gone
rules (two or more seeds read, else "cannot tell"; se = sd / sqrt(n) of the per-seed readings):
  greater    yes: mean - 2 se > 0; weak: mean > 0; else no
  less       yes: mean + 2 se < 0; weak: mean < 0; else no
  not_below  yes: mean >= 0; weak: mean + 2 se >= 0; else no
  {share_at_most: s}             yes: reached in every seed, mean share <= s; else no
  {near: MEASURE, within: f}     yes: |mean| <= max(2 se, f |mean of MEASURE|); else no
  {all_positive: true}           yes: every reading > 0; else no
a claim: id, claim (the question in words), number (what its key number is), measure and rule;
or all: [parts] with combine: weakest | partly (yes if all yes, no if all no, else partly);
weaker_if: {measure: M, below: x} reads a yes as weak where M's mean is below x. An amendment's
claim with amends: ID decides that claim only where its registered reading cannot tell (both
are shown); one with an id of its own adds a claim, shown with the amendment's reason.
"""


def summary(values: list[float | None]) -> dict[str, Any]:
    """mean, sd, n and se over the values read (None: not read, counted apart; a share never
    reached is infinite, read, and leaves the mean infinite and the sd undefined)."""
    read = [v for v in values if v is not None]
    n = len(read)
    finite = all(math.isfinite(v) for v in read)
    mean = (statistics.fmean(read) if finite else math.inf) if read else None
    sd = statistics.stdev(read) if n > 1 and finite else None
    se = sd / math.sqrt(n) if sd is not None else None
    return {"mean": mean, "sd": sd, "se": se, "n": n, "not_read": len(values) - n, "values": values}


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through the points; None outside their x range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return None


def reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The smallest x where the curve (linear between points) reaches target; None: never."""
    points = sorted(curve)
    if points[0][1] >= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 < target <= y1:
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0)
    return None


def slope(xy: list[tuple[float, float]]) -> float:
    mx, my = statistics.fmean(x for x, _ in xy), statistics.fmean(y for _, y in xy)
    return sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)


class Reader:
    """Reads measures from a study's results: per_seed[condition][seed][arm][metric]."""

    def __init__(self, results: dict[str, Any], frontiers: dict[str, list[str]], seeds: list[int]):
        self.per_seed = results["per_seed"]
        self.curves = results.get("curves") or {}
        self.recorded = results.get("recorded") or {}
        self.frontiers = frontiers
        self.seeds = [str(s) for s in seeds]
        self.first = next(iter(self.per_seed))

    def read(self, m: dict[str, Any], condition: str | None = None) -> list[float | None]:
        """One value per seed (None where it cannot be read)."""
        cond = m.get("condition", condition or self.first)
        if "slope" in m:
            return self._slope(m)
        if "minus" in m:
            a, b = (self.read(x, cond) for x in m["minus"])
            return [None if x is None or y is None else x - y for x, y in zip(a, b)]
        if "recorded" in m:
            return _values(self.recorded[m["recorded"]]["values"])
        values = [self._one(m, cond, seed) for seed in self.seeds]
        saved = self.recorded.get(m.get("saved_as", ""))
        if saved and all(v is None for v in values):  # the runs' data for it was not kept
            return _values(saved["values"])
        return values

    def _one(self, m: dict[str, Any], cond: str, seed: str) -> float | None:
        res = self.per_seed.get(cond, {}).get(seed)
        if not res:
            return None
        metric = m.get("metric", "gold_reward_mean")

        def get(arm: str, key: str = metric) -> float | None:
            return (res.get(arm) or {}).get(key)

        if "difference" in m:
            a, b = (get(x) for x in m["difference"])
            return None if a is None or b is None else a - b
        if "equal_kl" in m:
            arm = m["equal_kl"]  # the frontier's arms run in this condition
            points = [(get(x, "kl_mean"), get(x)) for x in self.frontiers[m["frontier"]] if x in res]  # fmt: skip
            if get(arm) is None or get(arm, "kl_mean") is None or any(None in p for p in points):
                return None
            at = interpolate(points, get(arm, "kl_mean"))
            return None if at is None else m.get("sign", 1) * (get(arm) - at)
        if "budget_share" in m:
            curve = [(share, get(arm)) for arm, share in m["budget_share"].items()]
            if get(m["target"]) is None or any(y is None for _, y in curve):
                return None
            share = reach(curve, get(m["target"]))
            return math.inf if share is None else share
        if "curve_share" in m:
            curves = self.curves.get(cond, {}).get(seed, {})
            a, b = curves.get(m["curve_share"]), curves.get(m["target"])
            if not a or not b:
                return None
            window = max(1, round(len(b) / 10))
            a_s, b_s = _smooth(a, window), _smooth(b, window)
            total = b_s[-1][0]
            share = reach([(x / total, y) for x, y in a_s], b_s[-1][1])
            return math.inf if share is None else share
        raise KeyError(m)

    def _slope(self, m: dict[str, Any]) -> list[float | None]:
        by_cond = {c: self.read(m["slope"], c) for c in m["over"]}
        out: list[float | None] = []
        for i, seed in enumerate(self.seeds):
            xy = []
            for c, x in m["over"].items():
                y = by_cond[c][i]
                if isinstance(x, dict):
                    v = (self.per_seed.get(c, {}).get(seed, {}).get(x["log2_of"]) or {}).get(x.get("metric", "length_mean"))  # fmt: skip
                    x = None if not v else math.log2(v)
                elif m.get("log2"):
                    x = math.log2(x)
                if y is not None and x is not None:
                    xy.append((x, y))
            out.append(slope(xy) if len(xy) >= 2 else None)
        return out


def _values(values: list) -> list[float | None]:
    """Saved values: "never" (a share never reached) is infinite."""
    return [math.inf if v == "never" else v for v in values]


def jsonable(value: Any) -> Any:
    """`value` with every infinite number written as "never" (JSON has no infinity)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return "never" if isinstance(value, float) and math.isinf(value) else value


def _smooth(curve: list, window: int) -> list[tuple[float, float]]:
    ys = [y for _, y in curve]
    return [(x, statistics.fmean(ys[max(0, i + 1 - window) : i + 1])) for i, (x, _) in enumerate(curve)]  # fmt: skip


def decide(rule: Any, s: dict[str, Any], reader: Reader, condition: str | None = None) -> str:
    """A verdict from the per-seed summary `s` of a measure."""
    if s["n"] < 2:
        return "n/a"
    name = rule if isinstance(rule, str) else next(iter(rule))
    mean, se = s["mean"], s["se"]
    if name == "greater":
        return "yes" if mean - 2 * se > 0 else "weak" if mean > 0 else "no"
    if name == "less":
        return "yes" if mean + 2 * se < 0 else "weak" if mean < 0 else "no"
    if name == "not_below":
        return "yes" if mean >= 0 else "weak" if mean + 2 * se >= 0 else "no"
    if name == "share_at_most":  # never reaching it in a seed (an infinite share) is a no
        return "yes" if s["not_read"] == 0 and mean <= rule[name] else "no"
    if name == "near":
        other = summary(reader.read(rule["near"], condition))["mean"] or 0.0
        return "yes" if abs(mean) <= max(2 * se, rule.get("within", 0.5) * abs(other)) else "no"
    if name == "all_positive":
        return "yes" if s["not_read"] == 0 and all(v > 0 for v in s["values"]) else "no"
    raise KeyError(name)


def combine(verdicts: list[str], how: str) -> str:
    if "n/a" in verdicts:
        return "n/a"
    if how == "partly":
        return verdicts[0] if len(set(verdicts)) == 1 and verdicts[0] in ("yes", "no") else "partly"
    if "partly" in verdicts:
        return "partly"
    return min(verdicts, key=ORDER.index)


def judge_one(claim: dict[str, Any], reader: Reader) -> dict[str, Any]:
    """A claim's verdict and its readings: {verdict, parts: [{label, verdict, summary}]}."""
    if "all" in claim:
        parts = [judge_one(p, reader) for p in claim["all"]]
        verdict = combine([p["verdict"] for p in parts], claim.get("combine", "weakest"))
        return {"verdict": verdict, "label": claim.get("label", ""), "parts": parts}
    cond = claim.get("condition")
    s = summary(reader.read(claim["measure"], cond))
    if {"budget_share", "curve_share"} & set(claim["measure"]):
        s["kind"] = "share"  # a share of a budget: unsigned, "never" when not reached
    if "recorded" in claim["measure"]:
        s["unit"] = reader.recorded[claim["measure"]["recorded"]].get("unit", "seed")
        s["note"] = reader.recorded[claim["measure"]["recorded"]].get("text", "")
    verdict = decide(claim.get("rule", "greater"), s, reader, cond)
    guard, guarded = claim.get("weaker_if"), None
    if guard and verdict == "yes":
        g = summary(reader.read(guard["measure"], cond))
        if g["mean"] is not None and g["mean"] < guard["below"]:
            verdict, guarded = "weak", g
    return {"verdict": verdict, "label": claim.get("label", ""), "summary": s, "guard": guarded}


def judge(spec_claims: list[dict], amendments: list[dict], reader: Reader) -> list[dict[str, Any]]:
    """Every claim's verdict: the registered ones (with an amendment's second reading, which
    decides where the registered one cannot tell), then those amendments added."""
    amended = {c["amends"]: (a, c) for a in amendments for c in a.get("claims") or [] if "amends" in c}  # fmt: skip
    added = [(c, a["reason"]) for a in amendments for c in a.get("claims") or [] if "amends" not in c]  # fmt: skip
    out = []
    for claim, reason in [(c, None) for c in spec_claims] + added:
        registered = judge_one(claim, reader)
        row = {"id": claim["id"], "claim": claim["claim"], "registered": registered,
               "verdict": registered["verdict"], "number": claim.get("number", "")}  # fmt: skip
        if reason:
            row["added_by_amendment"] = reason
        if claim["id"] in amended:
            amendment, amending = amended[claim["id"]]
            row["amended"], row["amendment_reason"] = (
                judge_one(amending, reader),
                amendment["reason"],
            )
            if registered["verdict"] == "n/a":
                row["verdict"] = row["amended"]["verdict"]
        out.append(row)
    return out


def check(spec: Any, where: str) -> None:
    """Every claim names measures, rules, arms, frontiers and conditions that exist."""
    arms, frontiers, conds = spec.all_arms(), spec.all_frontiers(), spec.conditions
    ids = set()

    def measure(m: Any, at: str) -> None:
        if not isinstance(m, dict) or not (set(m) & set(MEASURES)):
            raise ConfigError(f"{where}, {at}: a measure is one of {', '.join(MEASURES)}, e.g. {{difference: [rto, ppo]}}")  # fmt: skip
        named = []
        if "difference" in m:
            if not isinstance(m["difference"], list) or len(m["difference"]) != 2:
                raise ConfigError(f"{where}, {at}.difference: give two arms, [a, b]")
            named = m["difference"]
        elif "equal_kl" in m:
            if m.get("frontier") not in frontiers:
                raise ConfigError(f"{where}, {at}.frontier: {m.get('frontier')!r} is not a frontier ({', '.join(frontiers) or 'none declared'})")  # fmt: skip
            named = [m["equal_kl"]]
        elif "budget_share" in m:
            named = [*m["budget_share"], m.get("target")]
        elif "curve_share" in m:
            named = [m["curve_share"], m.get("target")]
        elif "slope" in m:
            measure(m["slope"], f"{at}.slope")
            over = m.get("over")
            if not isinstance(over, dict) or len(over) < 2:
                raise ConfigError(f"{where}, {at}.over: map two or more conditions to their x")
            for c, x in over.items():
                if c not in conds:
                    raise ConfigError(f"{where}, {at}.over: {c!r} is not a condition ({', '.join(conds)})")  # fmt: skip
                if isinstance(x, dict) and x.get("log2_of") not in arms:
                    raise ConfigError(f"{where}, {at}.over.{c}: log2_of names an arm")
        elif "minus" in m:
            if not isinstance(m["minus"], list) or len(m["minus"]) != 2:
                raise ConfigError(f"{where}, {at}.minus: give two measures")
            for i, x in enumerate(m["minus"]):
                measure(x, f"{at}.minus[{i}]")
        missing = [a for a in named if a not in arms]
        if missing:
            raise ConfigError(f"{where}, {at}: {', '.join(map(str, missing))} not among the arms ({', '.join(arms)})")  # fmt: skip
        if "condition" in m and m["condition"] not in conds:
            raise ConfigError(f"{where}, {at}.condition: {m['condition']!r} is not a condition ({', '.join(conds)})")  # fmt: skip

    def claim(c: Any, at: str) -> None:
        if not isinstance(c, dict):
            raise ConfigError(f"{where}, {at}: a claim is a mapping (id, claim, measure, rule)")
        if "all" in c:
            if c.get("combine", "weakest") not in ("weakest", "partly"):
                raise ConfigError(f"{where}, {at}.combine: weakest or partly")
            for i, part in enumerate(c["all"]):
                claim(part, f"{at}.all[{i}]")
            return
        measure(c.get("measure"), f"{at}.measure")
        rule = c.get("rule", "greater")
        name = rule if isinstance(rule, str) else next(iter(rule), None) if isinstance(rule, dict) else None  # fmt: skip
        if name not in RULES:
            raise ConfigError(f"{where}, {at}.rule: one of {', '.join(RULES)}")
        if name == "near":
            measure(rule["near"], f"{at}.rule.near")
        if "weaker_if" in c:
            measure(c["weaker_if"].get("measure"), f"{at}.weaker_if.measure")

    for i, c in enumerate(spec.claims):
        at = f"claims[{i}]"
        if not isinstance(c, dict) or not c.get("id") or not c.get("claim"):
            raise ConfigError(f"{where}, {at}: a claim needs 'id' and 'claim' (its question, in words)")  # fmt: skip
        if c["id"] in ids:
            raise ConfigError(f"{where}, {at}: id {c['id']!r} is used twice")
        ids.add(c["id"])
        claim(c, at)
    registered = set(ids)
    for i, a in enumerate(spec.amendments):
        for j, c in enumerate(a.get("claims") or []):
            at = f"amendments[{i}].claims[{j}]"
            if "amends" in c and c["amends"] not in registered:
                raise ConfigError(f"{where}, {at}.amends: name a registered claim's id ({', '.join(sorted(registered))})")  # fmt: skip
            if "amends" not in c:  # a claim the amendment adds: never one that edits another
                if not c.get("id") or not c.get("claim") or c["id"] in ids:
                    raise ConfigError(f"{where}, {at}: give 'amends: ID' (a second reading of a registered claim) or a new claim's own 'id' and 'claim'")  # fmt: skip
                ids.add(c["id"])
            claim(c, at)
