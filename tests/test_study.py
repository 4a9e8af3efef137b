"""`rto study`: a study file runs end to end at toy size; the published studies' pages are what
`--report-only` writes from their results, with every published verdict and per-seed number;
the statistics follow their stated rules (checked against slow, obvious loops); a bad study
file is refused naming its key; a failed run leaves the earlier report as it was."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from rto.errors import ConfigError
from rto.study import claims, report
from rto.study import spec as spec_mod

from conftest import rto, rto_ok

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
PUBLISHED = ["paper_miniature", "group_estimators", "token_reward"]

# The verdicts and per-seed readings the studies published before they became study files (the
# scripts' own results pages), to three decimals; None: not read in that seed.
EXPECTED = {
    "paper_miniature": {
        "rto_ppo_sft": ("yes", [[0.044, 0.039, 0.057], [0.400, 0.537, 0.431]]),
        "granularity": ("weak", [[-0.006, 0.018, 0.014], [-0.005, 0.006, 0.019]]),
        "shaping": ("no", [[-0.078, -0.026, -0.029]]),
        "critic_free": ("weak", [[0.045, -0.038, 0.017]]),
        "data_efficiency": ("no", [[0.92, 0.94, 0.90]]),  # published to two decimals
        "equal_kl": ("yes", [[0.026, 0.001, 0.020]]),
        "dpo_fit": ("weak", [[0.009, -0.005, 0.019]]),
        "less_fit_equal_kl": ("weak", [[0.022, 0.003, 0.007]]),
    },
    "group_estimators": {
        "token_reward_in_groups": ("no", [[-0.044, -0.070, -0.026], [-0.038, -0.032, -0.021]]),
        "online": ("n/a", [[0.036, None, None]]),
        # the cost: rto_grpo's smaller saving (time or memory) per repeat, from the published rows
        "critic_free": ("no", [[-0.116, -0.168, -0.083], [0.152, 0.158]]),
    },
    "token_reward": {
        "length": ("no", [[-0.005, -0.003, -0.009]]),
        "rm_noise": ("yes", [[-0.061, -0.025, -0.045]]),
        "oracle_credit": ("yes", [[0.040, 0.029, 0.017]]),
        "oracle_judge": ("no", [[-0.016, -0.009, 0.002]]),
        "efficiency": (
            "no",
            [
                [0.80, 0.73, 0.76],
                [0.69, 0.52, 0.57],
                [0.41, 0.41, 0.45],
                [0.42, 0.66, 0.51],
                [0.61, 0.73, 0.62],
                [0.66, 0.71, 0.63],
                [0.90, 0.73, 0.70],
            ],
        ),  # fmt: skip
        "rm_noise_same_share": ("weak", [[-0.004, 0.002, -0.012]]),
        "efficiency_same_share": (
            "no",
            [[0.57, 0.88, 0.70], [0.66, 0.79, 0.75], [0.67, 0.77, 0.71]],
        ),
    },
}


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """`rto ARGS` in this process: its exit status and what it printed."""
    capsys.readouterr()
    code = rto(*args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def readings(judged: dict) -> list[list]:
    """Every leaf reading of a judged claim, in order (the amended one where it decided)."""
    if "parts" in judged:
        return [r for p in judged["parts"] for r in readings(p)]
    return [judged["summary"]["values"]]


def rounded(values: list, digits: int) -> list:
    return [None if v is None else round(v, digits) for v in values]


@pytest.mark.parametrize("name", PUBLISHED)
def test_report_only_reproduces_every_published_verdict_and_reading(
    name: str, tmp_path: Path
) -> None:
    """The committed page and README block are what --report-only writes from the committed
    results, and they state the verdicts and per-seed readings the studies published."""
    shutil.copy(STUDIES / "results" / f"{name}.json", tmp_path / f"{name}.json")
    rto_ok("study", str(STUDIES / f"{name}.yaml"), "--report-only", "--results", str(tmp_path))
    res = json.loads((tmp_path / f"{name}.json").read_text())
    for c in res["claims"]:
        verdict, expected = EXPECTED[name][c["id"]]
        assert c["verdict"] == verdict, c["id"]
        decided = (
            c["amended"]
            if "amended" in c and c["registered"]["verdict"] == "n/a"
            else c["registered"]
        )
        got = readings(decided)
        assert len(got) == len(expected), c["id"]
        for values, want in zip(got, expected):
            digits = 2 if want and all(v is None or round(v, 2) == v for v in want) else 3
            assert rounded([None if v == "never" else v for v in values], digits) == want, c["id"]
    assert set(EXPECTED[name]) == {c["id"] for c in res["claims"]}
    page = (tmp_path / f"{name}.md").read_text()
    assert page == (STUDIES / "results" / f"{name}.md").read_text(), (
        f"the committed page is stale: run rto study studies/{name}.yaml --report-only --readme"
    )
    spec = spec_mod.load(STUDIES / f"{name}.yaml")
    block = report.readme_block(spec, res, f"studies/results/{name}.md")
    assert block in (ROOT / "README.md").read_text(), "README block stale: rerun with --readme"


def test_a_toy_study_runs_end_to_end_and_reuses_its_finished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The toy study (the published studies' shape: shared stages per seed, two conditions,
    frontiers, every measure kind, an amendment) runs, reads its claims and writes its page;
    a rerun trains nothing; a study whose run fails leaves that page as it was."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    rto_ok("study", str(STUDIES / "toy.yaml"), "--runs", str(runs), "--results", str(out))
    res = json.loads((out / "toy.json").read_text())
    assert set(res["per_seed"]) == {"all_pairs", "half_pairs"}
    for cond in res["per_seed"].values():
        assert set(cond) == {"0", "1"}
        assert {"sft", "dpo", "ppo", "ppo_kl0.02", "rto", "rto_b2", "ppo_kl0.3"} <= set(cond["0"])
    assert [c["id"] for c in res["claims"]] == [
        "rto_beats_ppo",
        "equal_kl",
        "rm_data",
        "budget",
        "both",
    ]
    assert all(c["verdict"] in claims.VERDICTS for c in res["claims"])
    assert "amended" in res["claims"][1]
    # the conditions share SFT, pairs and the DPO model; the reward model is the condition's own
    recipe = yaml.safe_load((runs / "seed0" / "recipe.yaml").read_text())
    assert [n for n in recipe["stages"] if n.startswith(("sft", "rm", "dpo"))] == ["sft", "rm", "dpo", "rm_half_pairs"]  # fmt: skip
    assert recipe["stages"]["arm_rto_half_pairs"]["reward_model"] == "{rm_half_pairs}"
    page = (out / "toy.md").read_text()
    assert "## Held-out results: half_pairs" in page and "toy_all_pairs_gold_vs_kl.png" in page
    assert (out / "toy_half_pairs_gold_vs_kl.png").stat().st_size > 10_000
    assert str(tmp_path) not in page  # no machine paths on the page
    # a rerun reuses every finished run
    rto_ok("study", str(STUDIES / "toy.yaml"), "--runs", str(runs), "--results", str(out))
    for seed in ("seed0", "seed1"):
        statuses = json.loads((runs / seed / "pipeline_run.json").read_text())
        assert {v["status"] for v in statuses.values()} == {"skipped"}, statuses
    # --report-only gives the same page
    rto_ok("study", str(STUDIES / "toy.yaml"), "--report-only", "--results", str(out))
    assert (out / "toy.md").read_text() == page
    # a failing arm: the error names the logs, and the page and results stay as they were
    broken = yaml.safe_load((STUDIES / "toy.yaml").read_text())
    broken["arms"]["rto"]["data"] = {
        "path": "{task}/no_such_prompts.jsonl"
    }  # valid, fails when run
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(broken))
    saved = (out / "toy.json").read_text()
    code, output = cli(
        capsys, "study", str(tmp_path / "toy.yaml"), "--runs", str(runs), "--results", str(out)
    )
    assert code == 2 and "failed (logs:" in output and "rerun the same command" in output
    assert (out / "toy.json").read_text() == saved and (out / "toy.md").read_text() == page


# --------------------------------------------------------------------------- statistics


def reader(per_seed: dict, frontiers: dict | None = None, seeds=(0, 1, 2)) -> claims.Reader:
    return claims.Reader({"per_seed": per_seed}, frontiers or {}, list(seeds))


def rows(**arms: list[tuple[float, float]]) -> dict:
    """{"main": {seed: {arm: {gold_reward_mean, kl_mean}}}} from per-arm lists of (gold, kl)."""
    n = len(next(iter(arms.values())))
    return {"main": {str(s): {a: {"gold_reward_mean": v[s][0], "kl_mean": v[s][1]}
                              for a, v in arms.items() if v[s] is not None} for s in range(n)}}  # fmt: skip


def test_a_verdict_needs_two_seeds_and_its_standard_error_is_sd_over_root_n() -> None:
    r = reader(rows(a=[(0.5, 0)], b=[(0.1, 0)]), seeds=[0])
    s = claims.summary(r.read({"difference": ["a", "b"]}))
    assert s["n"] == 1 and claims.decide("greater", s, r) == "n/a"  # one seed: cannot tell
    values = [0.10, 0.02, 0.06]
    s = claims.summary(values)
    sd = math.sqrt(sum((v - 0.06) ** 2 for v in values) / 2)  # the sample sd, by hand
    assert s["sd"] == pytest.approx(sd) and s["se"] == pytest.approx(sd / math.sqrt(3))
    # mean 0.06, 2 se 0.046: a yes; shifted down by 0.05, positive within the noise: weak
    assert claims.decide("greater", s, r) == "yes"
    assert claims.decide("greater", claims.summary([v - 0.05 for v in values]), r) == "weak"
    assert claims.decide("greater", claims.summary([-v for v in values]), r) == "no"
    assert claims.decide("less", claims.summary([-v for v in values]), r) == "yes"
    assert claims.decide("not_below", claims.summary([v - 0.07 for v in values]), r) == "weak"
    assert claims.decide("not_below", claims.summary([v - 0.2 for v in values]), r) == "no"


def slow_frontier_reading(
    points: list[tuple[float, float]], at: tuple[float, float]
) -> float | None:
    """The equal-KL reading by brute force: walk the frontier's segments in KL order."""
    ordered = sorted(points)
    for i in range(len(ordered) - 1):
        (x0, y0), (x1, y1) = ordered[i], ordered[i + 1]
        if x0 <= at[1] <= x1:
            t = 0.0 if x1 == x0 else (at[1] - x0) / (x1 - x0)
            return at[0] - (y0 * (1 - t) + y1 * t)
    return None


def test_equal_kl_reads_the_frontier_between_its_points_and_not_outside() -> None:
    ppo = [(0.40, 1.0), (0.50, 2.0), (0.55, 4.0)]  # (gold, kl) of three PPO runs, each seed
    rto_runs = [(0.52, 1.5), (0.60, 3.0), (0.60, 5.0)]  # the third lies beyond every PPO KL
    per = {"main": {str(s): {"rto": {"gold_reward_mean": rto_runs[s][0], "kl_mean": rto_runs[s][1]},
                             **{f"ppo{i}": {"gold_reward_mean": g, "kl_mean": k} for i, (g, k) in enumerate(ppo)}}
                    for s in range(3)}}  # fmt: skip
    r = reader(per, {"ppo": ["ppo0", "ppo1", "ppo2"]})
    got = r.read({"equal_kl": "rto", "frontier": "ppo"})
    want = [slow_frontier_reading([(k, g) for g, k in ppo], run) for run in rto_runs]
    assert got[:2] == pytest.approx(want[:2])
    assert got[2] is None and want[2] is None
    s = claims.summary(got)
    assert s["n"] == 2 and s["not_read"] == 1
    text = report.reading_text(s, [0, 1, 2])
    assert text.count("not read") == 1 and "seed 2" in text and "—" not in text
    assert r.read({"equal_kl": "rto", "frontier": "ppo", "sign": -1})[:2] == pytest.approx(
        [-w for w in want[:2]]
    )


def test_budget_share_slope_and_rules_of_shares() -> None:
    per = rows(ppo=[(0.4, 1)] * 3, b8=[(0.1, 1)] * 3, b2=[(0.3, 1), (0.5, 1), (0.2, 1)], full=[(0.5, 1), (0.6, 1), (0.35, 1)])  # fmt: skip
    r = reader(per)
    shares = r.read({"budget_share": {"b8": 0.125, "b2": 0.5, "full": 1.0}, "target": "ppo"})
    # seed 0: 0.4 reached between 1/2 (0.3) and all (0.5): 0.5 + 0.5 * 0.5; seed 1 between 1/8
    # and 1/2; seed 2 never
    assert shares[0] == pytest.approx(0.75) and shares[1] == pytest.approx(0.125 + 0.375 * 0.75)
    assert math.isinf(shares[2])
    s = claims.summary(shares)
    assert claims.decide({"share_at_most": 1.0}, s, r) == "no"  # a seed that never reaches it
    assert claims.decide({"share_at_most": 0.8}, claims.summary(shares[:2] + [0.5]), r) == "yes"
    assert "never" in report.reading_text({**s, "kind": "share"}, [0, 1, 2])
    # a slope over conditions, by hand: y = 0.1 at x = log2(1/4) = -2, 0.0 at x = 0
    per = {"a": rows(x=[(0.3, 0)] * 3, y=[(0.2, 0)] * 3)["main"], "b": rows(x=[(0.2, 0)] * 3, y=[(0.2, 0)] * 3)["main"]}  # fmt: skip
    r = claims.Reader({"per_seed": per}, {}, [0, 1, 2])
    got = r.read({"slope": {"difference": ["x", "y"]}, "over": {"a": 0.25, "b": 1.0}, "log2": True})
    assert got == pytest.approx([-0.05] * 3)
    xy = [(-2.0, 0.1), (0.0, 0.0)]
    mx, my = statistics.fmean(x for x, _ in xy), statistics.fmean(y for _, y in xy)
    assert got[0] == pytest.approx(
        sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)
    )


def test_combined_claims_guards_and_amendments() -> None:
    r = reader(rows(a=[(0.5, 0), (0.6, 0), (0.55, 0)], b=[(0.1, 0), (0.2, 0), (0.1, 0)], c=[(0.5, 0), (0.7, 0), (0.5, 0)]))  # fmt: skip
    yes = {"measure": {"difference": ["a", "b"]}, "rule": "greater"}
    no = {"measure": {"difference": ["b", "a"]}, "rule": "greater"}
    assert claims.judge_one({"all": [yes, no], "combine": "weakest"}, r)["verdict"] == "no"
    assert claims.judge_one({"all": [yes, no], "combine": "partly"}, r)["verdict"] == "partly"
    assert claims.judge_one({"all": [yes, yes], "combine": "partly"}, r)["verdict"] == "yes"
    guarded = {**yes, "weaker_if": {"measure": {"difference": ["b", "c"]}, "below": -0.05}}
    assert claims.judge_one(guarded, r)["verdict"] == "weak"
    cannot = {"id": "x", "claim": "x", "measure": {"equal_kl": "a", "frontier": "f"}}
    r.frontiers = {"f": ["b", "c"]}  # KL 0 everywhere: a frontier with no width reads at 0
    amended = [{"reason": "why", "claims": [{"amends": "x", **yes}]}]
    row = claims.judge([{**cannot, "measure": {"difference": ["a", "missing"]}}], amended, r)[0]
    assert (
        row["registered"]["verdict"] == "n/a" and row["verdict"] == "yes"
    )  # the amendment decides
    row = claims.judge([{"id": "x", "claim": "x", **no}], amended, r)[0]
    assert (
        row["verdict"] == "no" and row["amended"]["verdict"] == "yes"
    )  # both shown, registered stands


# --------------------------------------------------------------------------- the study file


def write_spec(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((STUDIES / "toy.yaml").read_text())
    raw["recipe"] = "sentiment_quick"
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arms": None}, "key 'arms' is missing"),
        ({"seeds": "0,1"}, "seeds must be a list of integers"),
        ({"colour": "red"}, "unknown key(s) colour"),
        ({"frontiers": {"ppo": ["ppo", "ppo_kl0.02"], "one": ["rto"]}}, "frontiers.one: needs two or more arms"),
        ({"frontiers": {"ppo": ["ppo", "nobody"]}}, "not arms: nobody"),
        ({"claims": [{"id": "a", "claim": "?", "measure": {"difference": ["rto", "ghost"]}}]}, "claims[0].measure: ghost not among the arms"),
        ({"claims": [{"id": "a", "claim": "?", "measure": {"equal_kl": "rto", "frontier": "gpo"}}]}, "claims[0].measure.frontier: 'gpo' is not a frontier"),
        ({"claims": [{"id": "a", "claim": "?", "measure": {"difference": ["rto", "ppo"]}, "rule": "bigger"}]}, "claims[0].rule: one of greater"),
        ({"amendments": [{"arms": {}}]}, "amendments[0]: an amendment needs its 'reason'"),
        ({"amendments": [{"reason": "r", "claims": [{"amends": "nope", "measure": {"difference": ["rto", "ppo"]}}]}]}, "amends: name a registered claim's id"),
        ({"amendments": [{"reason": "r", "conditions": {"all_pairs": {}}}]}, "a registered one is never changed"),
        ({"shared": ["task", "sfft"]}, "stage 'sfft' is not in the recipe"),
    ],
)  # fmt: skip
def test_a_bad_study_file_is_refused_naming_the_key(
    tmp_path: Path, changes: dict, message: str, capsys: pytest.CaptureFixture
) -> None:
    path = write_spec(tmp_path, **changes)
    with pytest.raises(ConfigError) as err:
        spec_mod.load(path)
    assert message in str(err.value) and str(path) in str(err.value)
    code, output = cli(capsys, "study", str(path), "--check")
    assert code == 2 and message in output


def test_an_arm_with_a_bad_option_is_refused_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = yaml.safe_load((STUDIES / "toy.yaml").read_text())
    raw["arms"]["ppo"]["train"] = {"lrr": 1.0}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    code, output = cli(capsys, "study", str(tmp_path / "s.yaml"), "--runs", str(tmp_path / "runs"))
    assert code == 2 and "unknown config key 'train.lrr' (arm ppo). Did you mean 'lr'?" in output
    assert not (tmp_path / "runs").exists()


def test_check_validates_every_published_study_without_running(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for name in [*PUBLISHED, "toy"]:
        code, output = cli(
            capsys, "study", str(STUDIES / f"{name}.yaml"), "--check", "--runs", str(tmp_path)
        )
        assert code == 0 and "the file is valid" in output, output
    assert not any(tmp_path.iterdir())  # --check runs nothing


def test_study_help_names_the_measures_and_rules(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        rto("study", "--help")
    output = capsys.readouterr().out
    code = done.value.code
    assert code == 0 and "--report-only" in output and "--workers" in output and "--check" in output


# --------------------------------------------------------------------------- user text

USER_FILES = ["README.md", *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md"))],
              *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "benchmarks").rglob("*")) if p.is_file()
                and "_runs" not in p.parts and p.suffix in (".py", ".md", ".json", ".sh")],
              *[str(p.relative_to(ROOT)) for p in sorted(STUDIES.rglob("*")) if p.suffix in (".yaml", ".md", ".json")],
              *[str(p.relative_to(ROOT)) for folder in ("tools", "examples", "src/rto/recipes")
                for p in sorted((ROOT / folder).rglob("*")) if p.suffix in (".py", ".yaml", ".md")]]  # fmt: skip


@pytest.mark.parametrize("name", USER_FILES)
def test_user_facing_files_hold_no_machine_path_issue_number_or_todays_code(name: str) -> None:
    text = (ROOT / name).read_text()
    assert not re.search(r"(?<![\w.])/(work|home|tmp|root|Users)/\w", text), (
        f"{name}: an absolute path"
    )
    assert not re.search(r"\bissues? #?\d+|\(#\d+\)", text, flags=re.I), f"{name}: an issue number"
    assert "today's code" not in text, f"{name}: 'today's code' (say what the code is)"


def test_the_guides_worked_study_is_the_committed_file() -> None:
    guide = (ROOT / "docs" / "guide.md").read_text()
    block = re.search(r"```yaml\n# my_study.yaml\n(.*?)```", guide, flags=re.S).group(1)
    committed = (STUDIES / "rto_vs_ppo.yaml").read_text()
    assert committed.split("\n", 1)[1] == block
    spec_mod.load(STUDIES / "rto_vs_ppo.yaml")  # a valid study


def test_a_study_over_a_users_own_recipe_checks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The guide's second step: the same study pointed at examples/smollm2_cpu.yaml (a hub model
    and dataset, the reward model as judge), its claim on the reward model's score."""
    raw = {"name": "mine", "recipe": str(ROOT / "examples" / "smollm2_cpu.yaml"), "seeds": [0, 1],
           "shared": ["sft", "rm", "dpo"], "evaluate": "eval",
           "arms": {"sft": {"model": "sft"}, "ppo": {"preset": "ppo"}, "ppo_kl0.02": {"preset": "ppo", "rl": {"kl": {"coef": 0.02}}},
                    "rto": {"preset": "rto"}},
           "frontiers": {"ppo": ["ppo", "ppo_kl0.02"]},
           "claims": [{"id": "rm", "claim": "RTO scores above PPO's frontier at equal KL (reward model as judge).",
                       "measure": {"equal_kl": "rto", "frontier": "ppo", "metric": "rm_score_mean"}}]}  # fmt: skip
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw))
    code, output = cli(capsys, "study", str(tmp_path / "mine.yaml"), "--check", "--runs", str(tmp_path / "r"))
    assert code == 0 and "4 arms x 2 seeds; 6 stages to train per seed" in output, output
