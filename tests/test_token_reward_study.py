"""The token-reward study's bookkeeping (benchmarks/token_reward_study.py): its units are valid
pipelines that share what they should, the schedule keeps units of one folder in order, and the
report turns per-seed results into the verdicts its pre-written rules give (made-up results, no
training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from rto.pipeline import plan

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import token_reward_design as design  # noqa: E402
import token_reward_report as report  # noqa: E402
import token_reward_study as study  # noqa: E402


def planned(unit: str, tmp_path: Path, size=design.FULL) -> dict:
    recipe = tmp_path / f"{unit}.yaml"
    folder = design.unit_folder(tmp_path / "runs", 0, unit)
    recipe.write_text(yaml.safe_dump(design.recipe_for(unit, 0, folder, size), sort_keys=False))
    return {p.name: p for p in plan(str(recipe))[0]}


def test_units_are_valid_pipelines_that_reuse_shared_stages(tmp_path: Path) -> None:
    short, rm_data = planned("short", tmp_path), planned("rm_data", tmp_path)
    shared = ("task", "sft", "pairs", "rm", "dpo")
    # the units of short's folder reuse its finished stages: same configs, same fingerprints
    assert [short[s].fingerprint for s in shared] == [rm_data[s].fingerprint for s in shared]
    # the recipe's settings, with the better defaults (DPO lr 1e-3, reward model 8 epochs)
    assert short["dpo"].config.train.lr == 1e-3 and short["rm"].config.train.epochs == 8
    assert short["task"].config.seed == 0 and short["sft"].config.seed == 0
    coefs = {s: p.config.rl.kl.coef for s, p in short.items() if s.startswith("rl_ppo")}
    assert sorted(coefs.values()) == sorted(design.PPO_KL_COEFS)
    assert short["rl_rto"].config.rl.kl.coef == design.recipe_kl_coef() == 0.1
    assert short["rl_rto"].config.rl.dpo_reward.scale == 0.05
    policies = dict(e.split("=", 1) for e in short["eval_short"].config.policies)
    assert set(policies) == {"sft", "dpo", "rto", *(f"ppo_kl{c}" for c in design.PPO_KL_COEFS)}
    # each share of the pairs: its own reward model, the sentence reward and critic start of its runs
    for tag, share in design.RM_SHARES.items():
        assert rm_data[f"rm_{tag}"].config.data.train_fraction == share
        for name in (design.rto_stage(tag), design.ppo_stage(tag, 0.05)):
            assert rm_data[name].config.reward_model.endswith(f"rm_{tag}")
            assert rm_data[name].config.rl.critic_init == "reward_model"
    policies = dict(e.split("=", 1) for e in rm_data["eval_rm_data"].config.policies)
    assert policies["rto_f8"].endswith("rl_rto_f8") and "ppo_f2_kl0.025" in policies
    assert short["rm"].config.data.train_fraction == 1.0
    assert rm_data["rl_rto_f8"].config.dpo_model.endswith("/dpo")  # all the pairs


def test_rm_same_gives_rto_a_dpo_model_on_the_reward_models_own_pairs(tmp_path: Path) -> None:
    rm_data, rm_same = planned("rm_data", tmp_path), planned("rm_same", tmp_path)
    # the reward models and PPO runs are rm_data's (reused), only the DPO models and RTO are new
    shared = [
        s
        for s in rm_data
        if s.startswith(("rm_", "rl_ppo_")) or s in ("task", "sft", "pairs", "dpo")
    ]
    assert len(shared) == 4 + 3 + 3 * len(design.PPO_KL_COEFS)
    assert [rm_data[s].fingerprint for s in shared] == [rm_same[s].fingerprint for s in shared]
    for tag, share in design.RM_SHARES.items():
        dpo = rm_same[f"dpo_{tag}"].config
        assert dpo.data.train_fraction == share == rm_same[f"rm_{tag}"].config.data.train_fraction
        # the same settings as the DPO model on all pairs, but for the share
        assert (
            dpo.train.lr == rm_same["dpo"].config.train.lr and dpo.seed == rm_same["rm"].config.seed
        )
        assert dpo.data.path == rm_same[f"rm_{tag}"].config.data.path
        rto = rm_same[design.rto_stage(tag, "rm_same")].config
        assert rto.dpo_model.endswith(f"dpo_{tag}") and rto.reward_model.endswith(f"rm_{tag}")
    policies = dict(e.split("=", 1) for e in rm_same["eval_rm_same"].config.policies)
    assert policies["rto_f4"].endswith("rl_rto_f4_dpo_f4") and "ppo_f4_kl0.1" in policies


def test_a_share_of_the_pairs_is_the_same_rows_for_the_reward_model_and_the_dpo_model(
    tmp_path: Path,
) -> None:
    import dataclasses

    from rto.data.sources import load_train_eval

    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(400)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stages = planned("rm_same", tmp_path)
    taken = {}
    for stage in ("rm_f8", "dpo_f8", "rm_f2"):
        cfg = stages[stage].config  # each stage's own data section and seed, on one file
        data = dataclasses.replace(cfg.data, path=str(f), eval_path=str(f))
        train, _ = load_train_eval(data, cfg.seed)
        taken[stage] = [r["prompt"] for r in train]
    assert taken["rm_f8"] == taken["dpo_f8"] and len(taken["rm_f8"]) == 400 // 8
    assert set(taken["rm_f8"]) < set(taken["rm_f2"])  # the shares nest


@pytest.mark.parametrize("length", ["medium", "long"])
def test_longer_reviews_get_room_for_their_responses(length: str, tmp_path: Path) -> None:
    stages = planned(length, tmp_path)
    from rto.config.stages import SentimentTaskConfig

    task = stages["task"].config
    assert task.review_length == length
    budget = design.LENGTHS[length]
    rl = stages["rl_rto"].config
    assert rl.generate.max_new_tokens == budget["max_new_tokens"] > 48
    assert rl.data.max_prompt_length + rl.generate.max_new_tokens <= task.max_positions
    assert task.max_positions == SentimentTaskConfig.POSITIONS[length]
    assert stages["sft"].config.data.max_length == budget["max_length"]
    assert stages[f"eval_{length}"].config.eval.fluency == f"sentiment_{length}"
    # the same RL budget (prompts and iterations) as the short reviews
    short = planned("short", tmp_path)["rl_rto"].config
    assert (rl.train.max_steps, rl.rl.rollout_batch_size) == (
        short.train.max_steps,
        short.rl.rollout_batch_size,
    )
    # PPO's frontier: every study coefficient, plus this length's own points (KL grows with
    # length), each run evaluated beside RTO
    coefs = sorted(design.PPO_KL_COEFS + design.EXTRA_KL_COEFS.get(length, ()))
    assert length == "medium" or len(coefs) > len(design.PPO_KL_COEFS)
    ppo = {s: p.config.rl.kl.coef for s, p in stages.items() if s.startswith("rl_ppo")}
    assert sorted(ppo.values()) == coefs
    policies = dict(e.split("=", 1) for e in stages[f"eval_{length}"].config.policies)
    assert {p for p in policies if p.startswith("ppo")} == {f"ppo_kl{c}" for c in coefs}


def fake_pairs(folder: Path, gold: list[tuple[float, float]]) -> None:
    (folder / "pairs").mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": "the food", "chosen": " was good .", "rejected": " was bad .",
             "chosen_gold": c, "rejected_gold": r} for c, r in gold]  # fmt: skip
    (folder / "pairs" / "pairs_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_oracle_unit_uses_the_gold_reward_alone_as_sentence_reward(tmp_path: Path) -> None:
    folder = design.unit_folder(tmp_path / "runs", 0, "oracle")
    assert folder == design.unit_folder(tmp_path / "runs", 0, "short")  # short's pairs and models
    with pytest.raises(SystemExit, match="run the short unit first"):
        design.recipe_for("oracle", 0, folder)
    # gold rewards of the pair responses: 0.5, -0.5, 0.3, -0.3 -> sd 0.4123 -> weight 2.425
    fake_pairs(folder, [(0.5, -0.5), (0.3, -0.3)])
    stages = planned("oracle", tmp_path)
    runs = {k: p.config for k, p in stages.items() if k.startswith("rl_")}
    assert set(runs) == {design.rto_stage("oracle")} | {
        design.ppo_stage("oracle", c) for c in design.PPO_KL_COEFS
    }
    for cfg in runs.values():
        # the gold reward in place of the reward model's score, weighted as the score is
        # normalised; the reward model still starts the critic
        assert cfg.reward_fn == "sentiment" and cfg.reward_sources()[-1] == "reward_fn"
        assert "score" not in cfg.reward_sources() and cfg.rl.score.coef == 0.0
        assert cfg.rl.reward_fn.coef == 2.425
        assert cfg.reward_model.endswith("/rm") and cfg.rl.critic_init == "reward_model"
    from rto.stages.rl import critic_source

    assert critic_source(runs[design.rto_stage("oracle")], True)[0].endswith("/rm")
    assert runs[design.rto_stage("oracle")].reward_sources() == ["dpo", "reward_fn"]
    # everything upstream is short's, so the oracle unit reuses short's finished stages
    short = planned("short", tmp_path)
    assert [short[s].fingerprint for s in ("sft", "rm", "dpo")] == [
        stages[s].fingerprint for s in ("sft", "rm", "dpo")
    ]


def test_schedule_keeps_the_units_of_one_folder_in_order() -> None:
    chains = design.jobs([0, 1], list(design.UNITS))
    assert chains[0] == [(0, "long")] and chains[1] == [(1, "long")]
    assert [(0, "short"), (0, "rm_same"), (0, "rm_data"), (0, "oracle")] in chains
    assert sorted(u for c in chains for u in c) == sorted(
        (s, u) for s in (0, 1) for u in design.UNITS
    )


def test_the_results_pages_state_every_claim_they_judge_and_its_rule() -> None:
    results = ROOT / "benchmarks" / "results"
    pages = [results / f"{stem}.md" for stem in ("token_reward_study", "token_reward_rm_share")]
    for page in filter(Path.is_file, pages):
        text = " ".join(page.read_text().split())
        judged = json.loads(page.with_suffix(".json").read_text())["claims"]
        assert judged, page
        for c in judged:
            claim = next(d for d in design.CLAIMS if d["id"] == c["id"])
            assert claim["claim"] in text and claim["rule"] in text, (page.name, c["id"])


# --------------------------------------------------------------------------- the report

# made-up results: PPO's frontier is KL 2, 3, 4 -> gold 0.5, 0.6, 0.65 in every condition;
# RTO lies at KL 2.5, where the frontier is 0.55, plus the condition's advantage
FRONTIER = {0.1: (2.0, 0.5), 0.05: (3.0, 0.6), 0.025: (4.0, 0.65)}
ADVANTAGE = {"short": 0.0, "medium": 0.05, "long": 0.10, "rm_1/8": 0.09, "rm_1/4": 0.06,
             "rm_1/2": 0.03, "rm_same_1/8": -0.03, "rm_same_1/4": -0.02, "rm_same_1/2": 0.0,
             "oracle": -0.02}  # fmt: skip
SFT_LENGTH = {"short": 14.0, "medium": 37.0, "long": 90.0}


def fake_study(runs: Path, seeds: list[int]) -> None:
    for seed in seeds:
        noise = 0.004 * (seed - 1)
        evals: dict[str, dict] = {}
        for point, (unit, tag) in design.POINTS.items():
            methods = evals.setdefault(unit, {})
            methods["sft"] = {"gold_reward_mean": 0.05, "kl_mean": 0.0, "fluency_rate": 0.95,
                              "length_mean": SFT_LENGTH.get(point, 14.0)}  # fmt: skip
            for coef, (kl, gold) in FRONTIER.items():
                methods[design.ppo_policy(tag, coef)] = {"gold_reward_mean": gold, "kl_mean": kl,
                                                        "fluency_rate": 0.9, "length_mean": 20.0}  # fmt: skip
            rto_kl = 5.0 if (point, seed) == ("long", 2) else 2.5  # beyond PPO's frontier: not read
            methods[design.rto_policy(tag)] = {"gold_reward_mean": 0.55 + ADVANTAGE[point] + noise,
                                              "kl_mean": rto_kl, "fluency_rate": 0.9, "length_mean": 21.0}  # fmt: skip
            folder = design.unit_folder(runs, seed, unit)
            # rollout curves: PPO flat at 0.5; RTO 0 for 4 iterations, then 1 (reaches PPO's
            # final value after a quarter of the samples), except with the oracle: never
            ppo = [0.5] * 20
            rto = [0.0] * 4 + [1.0 if point != "oracle" else 0.2] * 16
            for stage, curve in (
                (design.ppo_stage(tag, 0.1), ppo),
                (design.rto_stage(tag, unit), rto),
            ):
                (folder / stage).mkdir(parents=True, exist_ok=True)
                # the oracle runs' sentence reward is the gold reward alone, weighted 2.5 (the
                # report checks it); the others' is the reward model's score
                sentence = ({"reward/reward_fn_sum": 2.5 * g} if tag == "oracle" else
                            {"reward/score_sum": 2 * g} for g in curve)  # fmt: skip
                rows = [{"step": i + 1, "samples": 64 * (i + 1), "rollout/gold_reward": g, **r}
                        for i, (g, r) in enumerate(zip(curve, sentence))]  # fmt: skip
                (folder / stage / "metrics.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in rows)
                )
                rl = {"reward_fn": {"coef": 2.5}, "score": {"coef": 0.0}} if tag == "oracle" else {}
                (folder / stage / "config.yaml").write_text(yaml.safe_dump({"rl": rl}))
        for unit, methods in evals.items():
            out = design.unit_folder(runs, seed, unit) / f"eval_{unit}"
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text(json.dumps({"methods": methods}))
            env = {"cpu": "Test CPU", "cpu_capability": "AVX2", "packages": {"torch": "2.13.0"}}
            (out / "summary.json").write_text(json.dumps({"environment": env}))
        for stage, share in (("rm", 1.0), ("rm_f8", 1 / 8), ("rm_f4", 1 / 4), ("rm_f2", 1 / 2)):
            folder = design.unit_folder(runs, seed, "short") / stage
            folder.mkdir(parents=True, exist_ok=True)
            summary = {"eval/accuracy": 0.7 + 0.1 * share, "eval/gold_accuracy": 0.95,
                       "data": {"train": {"rows": round(3000 * share)}}}  # fmt: skip
            (folder / "summary.json").write_text(json.dumps(summary))


def test_report_turns_seed_results_into_the_written_verdicts(tmp_path: Path) -> None:
    fake_study(tmp_path / "runs", [0, 1, 2])
    study.main(
        ["--report-only", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "out")]
    )
    res = json.loads((tmp_path / "out" / "token_reward_study.json").read_text())
    verdicts = {c["id"]: c["verdict"] for c in res["claims"]}
    evidence = {c["id"]: c["evidence"] for c in res["claims"]}
    assert verdicts == {"length": "yes", "rm_noise": "yes", "rm_noise_same_share": "no",
                        "oracle_credit": "no", "oracle_judge": "yes", "efficiency": "partly"}  # fmt: skip
    # equal KL: RTO minus PPO's frontier at KL 2.5 (0.55), per seed; long's seed 2 is not read
    assert res["points"]["long"]["equal_kl"] == pytest.approx([0.096, 0.1, None])
    assert res["points"]["medium"]["same_coef"] == pytest.approx([0.096, 0.1, 0.104])
    assert "long +0.098 (+0.096, +0.100, not read)" in evidence["length"]
    # per seed, the slope against log2 of the SFT length (seed 2: from two lengths only)
    import math

    xs = [math.log2(SFT_LENGTH[p]) for p in ("short", "medium", "long")]
    three = report.slope(list(zip(xs, [0.0, 0.05, 0.10])))
    two = report.slope(list(zip(xs[:2], [0.0, 0.05])))
    assert f"slope per doubling of length +{(2 * three + two) / 3:.3f}" in evidence["length"]
    assert "1/8 of the pairs +0.090" in evidence["rm_noise"]
    assert "oracle no (never, never, never)" in evidence["efficiency"]
    assert "short yes (0.25, 0.25, 0.25)" in evidence["efficiency"]
    md = (tmp_path / "out" / "token_reward_study.md").read_text()
    assert "Made on: Test CPU (AVX2)" in md
    for claim in design.CLAIMS:  # the rules are echoed beside the verdicts
        assert claim["rule"] in md
    assert "| 0.25 | 750 ± 0 | 0.725 ± 0.000 | 0.950 ± 0.000 |" in md
    assert "| long | " in md and "(per seed +0.096, +0.100, not read) |" in md
    for name in ("samples", "kl", "delta"):
        assert (tmp_path / "out" / f"token_reward_study_{name}.png").stat().st_size > 10_000


def test_slopes_and_too_few_seeds(tmp_path: Path) -> None:
    assert report.slope([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == pytest.approx(2.0)
    assert report.seed_verdict([0.1]) == "n/a"  # one seed cannot tell
    assert report.seed_verdict([0.1, 0.12, 0.11]) == "yes"
    assert report.seed_verdict([0.1, 0.12, 0.11], sign=-1) == "no"
    fake_study(tmp_path / "runs", [0])
    res = report.build(tmp_path / "runs", [0], "cmd", None)
    assert {c["verdict"] for c in res["claims"] if c["id"] != "efficiency"} == {"n/a"}


@pytest.mark.parametrize("spoil", ["off_gold", "with_score"])
def test_no_oracle_verdict_unless_its_sentence_reward_was_the_gold_reward_alone(
    spoil: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    fake_study(runs, [0, 1, 2])
    stage = design.unit_folder(runs, 1, "oracle") / design.rto_stage("oracle") / "metrics.jsonl"
    rows = [json.loads(line) for line in stage.read_text().splitlines()]
    if spoil == "off_gold":
        rows[3]["reward/reward_fn_sum"] += 1.25  # not the gold reward times its weight
    else:
        rows[3]["reward/score_sum"] = 0.3  # a reward-model score beside the gold reward
    stage.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = report.build(runs, [0, 1, 2], "cmd", None)
    claims = {c["id"]: c for c in res["claims"]}
    assert claims["oracle_credit"]["verdict"] == claims["oracle_judge"]["verdict"] == "n/a"
    expected = "largest difference 0.5" if spoil == "off_gold" else "1 oracle rollouts had a"
    assert expected in claims["oracle_credit"]["evidence"]
    assert claims["length"]["verdict"] == "yes"  # the other claims stand
    assert "oracle" not in claims["efficiency"]["evidence"]


def test_an_oracle_gain_bought_with_malformed_text_is_weak_at_best(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fake_study(runs, [0, 1, 2])
    for seed in (0, 1, 2):  # RTO beats PPO by 0.1 with the oracle, at 0.1 less fluency
        f = design.unit_folder(runs, seed, "oracle") / "eval_oracle" / "eval.json"
        res = json.loads(f.read_text())
        res["methods"]["rto_oracle"].update(gold_reward_mean=0.65 + seed / 100, fluency_rate=0.8)
        f.write_text(json.dumps(res))
    claims = {c["id"]: c for c in report.build(runs, [0, 1, 2], "cmd", None)["claims"]}
    assert claims["oracle_credit"]["verdict"] == "weak"
    assert "fluency, RTO - PPO's frontier: -0.100 ± 0.000" in claims["oracle_credit"]["evidence"]


def test_the_share_report_shows_the_earlier_arm_and_whether_its_runs_repeat(tmp_path: Path) -> None:
    fake_study(tmp_path / "runs", [0, 1, 2])
    first = report.build(tmp_path / "runs", [0, 1, 2], "cmd", None)
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(first))
    res = report.build(tmp_path / "runs", [0, 1, 2], "cmd", None, earlier)
    arm = res["earlier_arm"]
    assert arm["short_repeated"] is True
    assert arm["equal_kl"]["rm_1/8"] == pytest.approx([0.086, 0.09, 0.094])
    assert "repeated here to the last digit" in report.markdown(res, [])
    first["points"]["short"]["rto"]["gold_reward_mean"]["values"][1] += 1e-6  # one digit moved
    earlier.write_text(json.dumps(first))
    res = report.build(tmp_path / "runs", [0, 1, 2], "cmd", None, earlier)
    assert res["earlier_arm"]["short_repeated"] is False
    assert "NOT repeated here" in report.markdown(res, [])
    # the README's lines state the two reward-model-share claims, with per-seed values
    block = report.readme_block(res)
    assert "helps more when the sentence reward is noisier" in block and "per seed" in block
    assert block.count("\n  - ") == 2
