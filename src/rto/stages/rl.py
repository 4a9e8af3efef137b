"""`rto rl`: online RL from prompts with token-level rewards (RTO) and its baselines.

Loads the five roles of RTO (policy, reference, DPO policy, reward model, critic) in one of two
layouts and hands them to rto.rl.trainer.PPOTrainer: `rl/roles.SeparateModels`, one model per
role, or, with --lora.r when the DPO model and the reward model are adapters on the policy's
base, `rl/shared_base.SharedBase`, one frozen base with an adapter per role. The reference, the DPO
model and the critic read the policy's token ids, so they must share its tokenizer (checked
before loading); a reward model may have its own (it then reads re-rendered text, and the critic
starts from the policy). Presets name the paper's methods: ppo, rto, rs_ppo, semi_rto, ddpo,
rpp, rto_rpp, and the critic-free group estimators grpo, rto_grpo, rloo, rto_rloo (`--preset`);
every estimator but gae loads no critic. With rl.online_dpo.enabled the DPO model (or
the shared base's DPO adapter) keeps learning and is saved as it learned in --out/token_reward_model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rto.config.stages import RLConfig
from rto.data.tokenize import load_prompts
from rto.engine.run import RunFolder
from rto.engine.trainer import Engine
from rto.errors import ModelError
from rto.evaluation.sampled import load_eval_inputs
from rto.files import read_json
from rto.models.forward import Layout
from rto.models.load import (
    check_same_tokenizer,
    load_causal_lm,
    load_tokenizer,
    tokenizer_fingerprint,
)
from rto.models.placement import shards_weights
from rto.models.reward_model import load_reward_model
from rto.models.trainable import load_trainable_lm, load_trainable_scorer
from rto.rl.roles import SeparateModels
from rto.rl.shared_base import adapter_roles, load_shared_base, why_not_shared
from rto.rl.sources import resolve_function
from rto.rl.trainer import PPOTrainer, check_prompt_count
from rto.stages.rm import STATS_FILE

TOKEN_REWARD_MODEL = "token_reward_model"  # the online DPO model as it learned, in --out


def reward_stats(cfg: RLConfig) -> dict[str, float] | None:
    if not cfg.reward_model or cfg.rl.score.normalization != "stored":
        return None
    path = Path(cfg.reward_model) / STATS_FILE
    if not path.is_file():
        raise ModelError(
            f"rl.score.normalization is 'stored' but {path} does not exist (reward models from `rto rm` write it); "
            "set rl.score.normalization to running or none for other reward models"
        )
    stats = read_json(path)
    if not stats.get("std"):
        raise ModelError(f"{path} has no usable 'std'; set rl.score.normalization running")
    return stats


def critic_source(cfg: RLConfig, rm_same_tokenizer: bool) -> tuple[str, bool, str | None]:
    """(where the critic starts, whether that checkpoint must have a score head, a note when
    rl.critic_init asked for the reward model and it cannot be used)."""
    if cfg.critic_model:
        return cfg.critic_model, False, None
    if cfg.rl.critic_init == "policy":
        return cfg.model.path, False, None
    if cfg.reward_model and rm_same_tokenizer:
        return cfg.reward_model, True, None
    why = (f"the reward model {cfg.reward_model} has its own tokenizer, so its weights cannot read the policy's "
           "tokens" if cfg.reward_model else "there is no reward model")  # fmt: skip
    note = (f"[rto] note: the critic starts from the policy {cfg.model.path} with a new value head: {why} "
            "(give critic_model to start it from another model with the policy's tokenizer)")  # fmt: skip
    return cfg.model.path, False, note


def run(cfg: RLConfig, folder: RunFolder) -> dict[str, Any]:
    """Run the stage into `folder` (checked by the caller, not yet begun: the folder changes at
    engine.begin())."""
    engine = Engine.for_stage(
        cfg, folder, progress_keys=("rollout/gold_reward", "rollout/score", "rollout/kl")
    )
    rl = cfg.rl
    tokenizer = load_tokenizer(cfg.model)
    ref_path = cfg.ref_model or cfg.model.path
    use_dpo = rl.dpo_reward.scale > 0
    use_rm = rl.score.coef > 0 and bool(cfg.reward_model)
    own = cfg.model.tokenizer or cfg.model.path
    dpo_reason = ("the DPO model's rewards are per policy token (log pi_dpo - log pi_ref of the policy's own "
                  "tokens), so it must share the policy's tokenizer")  # fmt: skip
    same_ids = [("reference model", ref_path, None), ("DPO model", cfg.dpo_model if use_dpo else None, dpo_reason),
                ("critic model", cfg.critic_model, None)]  # fmt: skip
    for name, path, reason in same_ids:
        if path and path != own:
            check_same_tokenizer(
                tokenizer, "policy", load_tokenizer(cfg.model, path, name), name, reason
            )
    rm_same = bool(cfg.reward_model) and (
        cfg.reward_model == own
        or tokenizer_fingerprint(load_tokenizer(cfg.model, cfg.reward_model, "reward model"))
        == tokenizer_fingerprint(tokenizer)
    )
    stats = reward_stats(cfg) if use_rm else None
    # a user's function that cannot be imported is refused now, before any model is loaded
    for key in ("reward_fn", "token_reward_fn"):
        if getattr(cfg, key):
            resolve_function(getattr(cfg, key), key)

    prompts, report = load_prompts(
        cfg.data.path, cfg.data.split, tokenizer, max_rows=cfg.data.max_rows, seed=cfg.seed,
        max_prompt_length=cfg.data.max_prompt_length, source=cfg.model.path, chat_prompts=cfg.data.chat_prompts,
        fraction=cfg.data.train_fraction,
    )  # fmt: skip
    engine.say("[rto] prompts: " + report.describe())
    check_prompt_count(len(prompts), cfg.rl.rollout_batch_size)  # before loading five models
    eval_prompts = load_eval_inputs(cfg, tokenizer, cfg.model.path) or []

    device = engine.device
    critic_from, require_head = None, False
    if rl.advantage_estimator == "gae":
        critic_from, require_head, note = critic_source(cfg, rm_same)
        if note:
            engine.say(note)
    frozen = adapter_roles(cfg, use_dpo=use_dpo, use_rm=use_rm, critic_from=critic_from)
    why_not = why_not_shared(cfg, frozen, sharded=shards_weights(engine.accelerator))
    if why_not is None and use_rm and not rm_same:
        why_not = f"the reward model {cfg.reward_model} has its own tokenizer"
    if why_not is None:
        roles = load_shared_base(cfg, tokenizer, use_dpo=use_dpo, use_rm=use_rm,
                                 critic_from=critic_from, device=device)  # fmt: skip
    else:
        roles = separate_models(cfg, engine, tokenizer, use_dpo=use_dpo, use_rm=use_rm,
                                critic_from=critic_from, require_head=require_head)  # fmt: skip
    engine.say(f"[rto] roles: {roles.describe()}" + (f" ({why_not})" if why_not else ""))
    if roles.reward_model is not None:
        roles.reward_model.check_prompts([p["prompt_value"] for p in prompts])
        engine.say("[rto] " + roles.reward_model.describe())
    engine.say("[rto] rewards: " + ", ".join(cfg.reward_sources()))

    trainer = PPOTrainer(cfg, engine, roles=roles, tokenizer=tokenizer, prompts=prompts,
                         eval_prompts=eval_prompts, score_stats=stats)  # fmt: skip
    trainer.plan()  # sizes checked before the run begins
    out = engine.begin()
    summary = trainer.train()
    roles.save("policy", out, tokenizer, engine.accelerator, cfg.lora)
    if cfg.save_critic and roles.has("critic"):
        roles.save("critic", out / "critic", tokenizer, engine.accelerator, cfg.lora)
    learned = {}
    if use_dpo and rl.online_dpo.enabled:  # what the DPO model learned online
        roles.save_dpo(out / TOKEN_REWARD_MODEL, tokenizer, engine.accelerator, cfg.lora)
        learned = {"token_reward_model": str(out / TOKEN_REWARD_MODEL)}
        engine.say(
            f"[rto] the online token-reward model (the DPO model as it learned): {out / TOKEN_REWARD_MODEL}"
        )
    summary = {
        "stage": "rl",
        "preset": cfg.preset,
        **summary,
        "roles": roles.layout,
        "rewards": cfg.reward_sources(),
        **learned,
        "data": {"prompts": report.to_dict()},
    }
    engine.finish(summary)
    return summary


def separate_models(cfg: RLConfig, engine: Engine, tokenizer: Any, *, use_dpo: bool, use_rm: bool, critic_from: str | None,
                    require_head: bool) -> SeparateModels:  # fmt: skip
    """One model per role; with LoRA the policy and the critic are adapters on their own copies
    of their bases, and an adapter-folder DPO or reward model is loaded merged."""
    device, ref_path = engine.device, cfg.ref_model or cfg.model.path
    policy = load_trainable_lm(cfg.model, cfg.lora, role="policy")
    ref = load_causal_lm(cfg.model, path=ref_path, trainable=False, role="reference model")
    ref = ref.to(device)
    dpo = None
    if use_dpo:  # learning online, it loads as a trained model does (float32 weights under auto)
        online = cfg.rl.online_dpo.enabled
        dpo = load_causal_lm(cfg.model, path=cfg.dpo_model, trainable=online, role="DPO model").to(
            device
        )
    reward_model = None
    if use_rm:
        reward_model = load_reward_model(cfg.model, cfg.reward_model, tokenizer,
                                         chat_prompts=cfg.data.chat_prompts, device=device)  # fmt: skip
    critic = None
    if critic_from is not None:
        critic = load_trainable_scorer(cfg.model, cfg.lora, critic_from, require_head=require_head,
                                       role="critic")  # fmt: skip
    return SeparateModels(
        policy=policy,
        ref=ref,
        dpo=dpo,
        critic=critic,
        reward_model=reward_model,
        passes=Layout.of(cfg.model),
    )
