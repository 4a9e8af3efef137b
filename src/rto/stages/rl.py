"""`rto rl`: online RL from prompts with token-level rewards (RTO) and its baselines.

Loads the five models of RTO (policy, reference, DPO policy, reward model, critic), checks
that they share one tokenizer, and hands them to rto.rl.trainer.PPOTrainer. Presets name the
paper's methods: ppo, rto, rs_ppo, semi_rto, ddpo, rpp, rto_rpp (`--preset`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rto.config.stages import RLConfig
from rto.data.tokenize import load_prompts
from rto.engine.files import read_json
from rto.engine.run import RunFolder
from rto.engine.trainer import Engine
from rto.errors import ModelError
from rto.evaluation.sampled import load_eval_inputs
from rto.models.forward import TokenScorer
from rto.models.load import (
    check_same_tokenizer,
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
    save_pretrained,
)
from rto.rl.trainer import PPOTrainer, check_prompt_count
from rto.stages.rm import STATS_FILE


def reward_stats(cfg: RLConfig) -> dict[str, float] | None:
    if not cfg.reward_model or cfg.rl.score_normalization != "stored":
        return None
    path = Path(cfg.reward_model) / STATS_FILE
    if not path.is_file():
        raise ModelError(
            f"rl.score_normalization is 'stored' but {path} does not exist (reward models from `rto rm` write it); "
            "set rl.score_normalization to running or none for other reward models"
        )
    stats = read_json(path)
    if not stats.get("std"):
        raise ModelError(f"{path} has no usable 'std'; set rl.score_normalization running")
    return stats


def run(cfg: RLConfig) -> dict[str, Any]:
    folder = RunFolder.check(cfg, "rl")  # writes nothing; the folder changes at engine.begin()
    if folder.done:
        return folder.finished_summary()
    engine = Engine.for_stage(
        cfg, folder, progress_keys=("rollout/gold_reward", "rollout/score", "rollout/kl")
    )
    rl = cfg.rl
    tokenizer = load_tokenizer(cfg.model)
    ref_path = cfg.ref_model or cfg.model.path
    use_dpo = rl.dpo_reward_scale > 0
    use_rm = rl.score_coef > 0
    critic_from_rm = rl.advantage_estimator == "gae" and rl.critic_init == "reward_model"
    others = [("reference model", ref_path), ("DPO model", cfg.dpo_model if use_dpo else None),
              ("reward model", cfg.reward_model if (use_rm or critic_from_rm) else None)]  # fmt: skip
    for name, path in others:
        if path and path != (cfg.model.tokenizer or cfg.model.path):
            check_same_tokenizer(tokenizer, "policy", load_tokenizer(cfg.model, path, name), name)
    stats = reward_stats(cfg) if use_rm else None

    prompts, report = load_prompts(
        cfg.data.path, cfg.data.split, tokenizer, max_rows=cfg.data.max_rows, seed=cfg.seed,
        max_prompt_length=cfg.data.max_prompt_length, source=cfg.model.path, chat_prompts=cfg.data.chat_prompts,
    )  # fmt: skip
    engine.say("[rto] prompts: " + report.describe())
    check_prompt_count(len(prompts), cfg.rl.rollout_batch_size)  # before loading five models
    eval_prompts = load_eval_inputs(cfg, tokenizer, cfg.model.path) or []

    device = engine.device
    policy = load_causal_lm(cfg.model, role="policy")
    ref = load_causal_lm(cfg.model, path=ref_path, trainable=False, role="reference model")
    ref = ref.to(device)
    dpo = (
        load_causal_lm(cfg.model, path=cfg.dpo_model, trainable=False, role="DPO model").to(device)
        if use_dpo
        else None
    )
    reward_model = None
    if use_rm:
        hf = load_sequence_scorer(
            cfg.model, cfg.reward_model, trainable=False, require_head=True, role="reward model"
        )
        reward_model = TokenScorer(hf).to(device)
    critic = None
    if rl.advantage_estimator == "gae":
        source = cfg.reward_model if critic_from_rm else cfg.model.path
        critic = TokenScorer(
            load_sequence_scorer(
                cfg.model, source, trainable=True, require_head=critic_from_rm, role="critic"
            )
        )

    trainer = PPOTrainer(cfg, engine, policy=policy, critic=critic, ref=ref, dpo=dpo, reward_model=reward_model,
                         tokenizer=tokenizer, prompts=prompts, eval_prompts=eval_prompts, score_stats=stats)  # fmt: skip
    trainer.plan()  # sizes checked before the run begins
    out = engine.begin()
    summary = trainer.train()
    save_pretrained(trainer.policy, tokenizer, out, engine.accelerator)
    if cfg.save_critic and trainer.critic is not None:
        save_pretrained(trainer.critic, tokenizer, out / "critic", engine.accelerator)
    summary = {
        "stage": "rl",
        "preset": cfg.preset,
        **summary,
        "data": {"prompts": report.to_dict()},
    }
    engine.finish(summary)
    return summary
