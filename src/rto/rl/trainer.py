"""The RL loop: rollout -> score -> rewards -> advantages -> update, one method per phase.

One iteration (a "step" for logging, checkpoints and --resume):
  1. rollout     sample responses to rl.rollout_batch_size prompts from the current policy;
  2. score       log-probs under policy and reference, critic values, reward-model score, asked
                 of the roles (rl/roles.py); then the token-reward sources (the DPO log-ratio, a
                 user's function ...) and sentence reward functions (rl/sources.py);
  3. rewards     rl/rewards.token_rewards: the RTO formula, every source with its own settings;
  4. advantages  GAE with the critic, REINFORCE++ returns, or a group estimator (RLOO, GRPO,
                 REINFORCE++-baseline) over each prompt's rl.samples_per_prompt responses
                 (rl/advantages.py), then whitening;
  5. update      rl.ppo_epochs passes of minibatches of train.batch_size responses, clipped
                 policy and value losses (rl/losses.py; with rl.kl.in_loss the k3 KL to the
                 reference as a loss term), one engine optimiser step each.
The maths lives in rto.rl.{rewards, advantages, losses}; this file only moves data between them.

With several processes each one generates, scores and trains on its share of every rollout
(rollout_batch_size / processes prompts); every response is sampled with its own seed (run seed,
iteration, position in the global rollout), so the rollout does not depend on the process
count. Losses are token means over each whole minibatch (all micro-batches, all processes), and
every logged number is a global mean.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import torch

from rto.data.spans import delimiter_token_ids
from rto.engine.distributed import max_over_processes, sum_over_processes
from rto.engine.optimise import Optimised, StepResult
from rto.errors import ConfigError, ModelError, RtoError
from rto.models.generate import decode_responses, stop_ids
from rto.models.generators import make_generator
from rto.models.seeded import row_seed, stream_seed
from rto.rl.advantages import estimate, whiten
from rto.rl.experience import Rollout, merge_samples, score_rollout, to_device
from rto.rl.kl import KLController
from rto.rl.losses import (
    explained_variance,
    kl_loss,
    policy_loss,
    sampler_weights,
    token_mean,
    value_loss,
)
from rto.rl.rewards import (
    RewardSettings,
    RunningMoments,
    normalize_score,
    reward_breakdown,
    sentence_part,
    token_rewards,
)
from rto.rl.sources import SourceContext, build_sources, score_sources, sentence_rewards
from rto.tasks import call_judge, resolve


def check_prompt_count(n_prompts: int, rollout_batch_size: int) -> None:
    if n_prompts < rollout_batch_size:
        raise RtoError(
            f"only {n_prompts} prompts for rl.rollout_batch_size {rollout_batch_size}; lower "
            "rl.rollout_batch_size or add prompts"
        )


class PPOTrainer:
    def __init__(self, cfg: Any, engine: Any, *, roles: Any, tokenizer: Any, prompts: list[dict[str, Any]],
                 eval_prompts: list[dict[str, Any]], score_stats: dict[str, float] | None):  # fmt: skip
        self.cfg, self.rl, self.engine = cfg, cfg.rl, engine
        self.acc = engine.accelerator
        self.roles = roles  # policy, ref, dpo, reward model, critic: asked by role (rl/roles.py)
        self.tokenizer = tokenizer
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.score_stats = score_stats
        self.running = RunningMoments()
        self.kl = KLController(self.rl.kl.coef, self.rl.kl.target, self.rl.kl.horizon)
        self.eos = stop_ids(tokenizer, roles.policy)
        self.gold = (
            resolve(cfg.eval.gold_reward, "gold", "eval.gold_reward")
            if cfg.eval.gold_reward
            else None
        )
        self.temperature = cfg.generate.temperature or 1.0
        # what samples (generate.backend): made once; the policy's weights go in before each rollout
        self.generator = make_generator(
            cfg.generate, tokenizer=tokenizer, eos=self.eos, device=engine.device, model=roles.policy,
            model_cfg=cfg.model, model_path=cfg.model.path, max_prompt_length=cfg.data.max_prompt_length,
        )  # fmt: skip
        # vLLM: its sampling log-probs kept beside pi_old (rl.sampler.correction, the gap's logs)
        self.generator.report_logprobs = True
        context = SourceContext(roles, tokenizer, self.eos, self.rl.forward_batch_size, self.temperature)  # fmt: skip
        self.sources = build_sources(cfg, context)  # token-reward sources (rl/sources.py)
        for source in self.sources:  # a learning source's state goes into every checkpoint
            if hasattr(source, "state_dict"):
                self.acc.register_for_checkpointing(source)
        self.sentence = sentence_rewards(cfg)  # sentence reward functions
        self.segment_ids = None
        if any(s.settings.granularity == "segment" for s in self.sources):
            self.segment_ids = torch.tensor(
                delimiter_token_ids(tokenizer, self.rl.segment_delimiters)
            )
        self.samples_seen = 0

    # ------------------------------------------------------------------ sizes

    def plan(self) -> tuple[int, int]:
        """(iterations, optimiser updates per iteration)."""
        rl, t = self.rl, self.cfg.train
        if rl.rollout_batch_size % self.engine.world:
            raise ConfigError(
                f"config key 'rl.rollout_batch_size' ({rl.rollout_batch_size}) must be a multiple of the number of "
                f"processes ({self.engine.world})"
            )
        check_prompt_count(len(self.prompts), rl.rollout_batch_size)
        iterations = t.max_steps or max(
            1, int(t.epochs * len(self.prompts) // rl.rollout_batch_size)
        )
        per_iter = rl.ppo_epochs * rl.rollout_batch_size * rl.samples_per_prompt // t.batch_size
        return iterations, per_iter

    # ------------------------------------------------------------------ 1: rollout

    def rollout(self, iteration: int) -> tuple[Rollout, float]:
        """This process's share of the iteration's prompts, each response sampled with its own
        seed; returns the rollout and the seconds generation took."""
        eng, gen, k = self.engine, self.cfg.generate, self.rl.samples_per_prompt
        idx = eng.batch_indices(iteration, len(self.prompts), batch_size=self.rl.rollout_batch_size)
        first = eng.rank * len(idx)  # this share's position in the global rollout batch
        chosen = [self.prompts[i] for i in idx for _ in range(k)]
        seeds = [row_seed(self.cfg.seed, iteration, first + j, s) for j in range(len(idx)) for s in range(k)]  # fmt: skip
        chunks = []
        began = time.time()
        with self.roles.generation_weights() as policy:  # whole weights, gathered once per rollout
            self.generator.load_weights(policy)
            for s in range(0, len(chosen), gen.batch_size):
                chunks.append(self.generator.sample(
                    [p["prompt_ids"] for p in chosen[s : s + gen.batch_size]], seeds[s : s + gen.batch_size]
                ))  # fmt: skip
        self.generator.sleep()
        seconds = time.time() - began
        r = to_device(merge_samples(chunks, self.tokenizer.pad_token_id), eng.device)
        r.texts["prompts"] = [p["prompt"] for p in chosen]  # as judges read them
        r.texts["prompt_values"] = [p["prompt_value"] for p in chosen]  # as the rows held them
        r.texts["responses"] = decode_responses(self.tokenizer, r, self.eos)
        # a group per prompt: its K responses, adjacent, on this process (prompts are split)
        r.group = torch.arange(first, first + len(idx), device=eng.device).repeat_interleave(k)
        return r, seconds

    # ------------------------------------------------------------------ 2: score

    def score(self, r: Rollout, iteration: int = 0) -> None:
        score_rollout(r, self.roles, batch_size=self.rl.forward_batch_size, temperature=self.temperature)  # fmt: skip
        score_sources(r, self.sources, self.sentence)
        self.check_frozen_outputs(r, iteration)
        if self.gold is not None:
            r.texts["gold"] = call_judge(self.gold, r.texts["prompts"], r.texts["responses"],
                                         self.cfg.eval.gold_reward, "gold")  # fmt: skip

    def check_frozen_outputs(self, r: Rollout, iteration: int) -> None:
        """NaN or inf from a model that the policy's update does not train (reference, a
        token-reward source's model such as the DPO model, reward model) comes from that model,
        not from the policy's learning rate: name it, before it reaches the rewards and the
        update. A DPO model learning online (a source with a `learner`) is named as such."""
        cfg = self.cfg
        checked = [("reference model", cfg.ref_model or cfg.model.path, r.logp_ref, False)]
        checked += [(*s.model, r.token_sources[s.name], hasattr(s, "learner"))
                    for s in self.sources if getattr(s, "model", None)]  # fmt: skip
        checked.append(("reward model", cfg.reward_model, r.score if self.roles.has("reward") else None, False))  # fmt: skip
        counts = torch.tensor(
            [0.0 if t is None else float((~torch.isfinite(t)).reshape(len(t), -1).any(1).sum())
             for _, _, t, _ in checked], device=self.engine.device,
        )  # fmt: skip
        if self.acc.num_processes > 1:
            counts = self.acc.reduce(counts, reduction="sum")
        for (name, path, _, learning), n in zip(checked, counts.tolist()):
            if not n:
                continue
            scored = "scored" if name == "reward model" else "gave log-probabilities of"
            why = (
                f"the {name} learns online (rl.online_dpo.enabled), so its own updates may "
                "have diverged: lower rl.online_dpo.lr, or run with rl.online_dpo.enabled false "
                "to check the model as loaded"
                if learning
                else f"the {name} is frozen, so its weights (or its score head) are broken, not the "
                "learning rate: check or retrain it"
            )
            raise ModelError(
                f"the {name} ({path}) {scored} {int(n)} of {len(r) * self.engine.world} "
                f"responses as NaN or inf in RL iteration {iteration + 1}; {why}"
            )

    # ------------------------------------------------------------------ 3: rewards

    def normalized_score(self, r: Rollout) -> torch.Tensor:
        rl = self.rl
        mean, std = 0.0, 1.0
        if rl.score.normalization == "stored" and self.score_stats is not None:
            mean, std = self.score_stats["mean"], self.score_stats["std"]
        elif rl.score.normalization == "running":
            self.running.update(self.acc.gather(r.score).float())
            mean, std = self.running.mean, self.running.std
        return normalize_score(r.score, mean=mean, std=std, clamp=rl.score.clamp, truncated=r.truncated,
                               missing_eos_penalty=rl.score.missing_eos_penalty)  # fmt: skip

    def rewards(self, r: Rollout) -> dict[str, torch.Tensor]:
        """r.rewards, (B, T); returns the reward's parts (for the logs)."""
        segment_end = None
        if self.segment_ids is not None:
            segment_end = torch.isin(r.response_ids, self.segment_ids.to(r.response_ids.device))
        settings = RewardSettings(kl_coef=self.kl.value, score_coef=self.rl.score.coef,
                                  kl_in_reward=not self.rl.kl.in_loss)  # fmt: skip
        sources = {s.name: (r.token_sources[s.name], s.settings) for s in self.sources}
        sentence = {f.name: (r.sentence[f.name], f.weight) for f in self.sentence}
        r.rewards, parts = token_rewards(r.response_mask, r.logp_old, r.logp_ref, self.normalized_score(r), settings,
                                         segment_end=segment_end, sources=sources, sentence=sentence)  # fmt: skip
        r.sentence_reward = sentence_part(parts)
        return parts

    # ------------------------------------------------------------------ 4: advantages

    def advantages(self, r: Rollout) -> None:
        """r.advantages and r.returns, (B, T)."""
        rl = self.rl
        adv, ret = estimate(rl.advantage_estimator, r.rewards, r.values, r.response_mask,
                            gamma=rl.gamma, lam=rl.gae_lambda, sentence=r.sentence_reward, group=r.group,
                            std_normalization=rl.group_std_normalization)  # fmt: skip
        if rl.whiten_advantages:
            adv = whiten(adv, r.response_mask, reduce_sum=self._reduce_sum)
        r.advantages, r.returns = adv, ret

    def learn(self, r: Rollout) -> dict[str, float]:
        """Let the sources that keep learning (`learn`, rl/sources.py) learn from this rollout."""
        metrics = {}
        for source in self.sources:
            if hasattr(source, "learn"):
                learned = source.learn(r) or {}
                metrics.update({f"source/{source.name}/{k}": float(v) for k, v in learned.items()})
        return metrics

    def learned_modules(self) -> list[Any]:
        """The modules the sources train besides the policy (the online DPO model, prepared)."""
        learners = [getattr(s, "learner", None) for s in self.sources]
        return [lr.module for lr in learners if lr is not None and lr.module is not None]

    def _reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x, reduction="sum") if self.acc.num_processes > 1 else x

    # ------------------------------------------------------------------ 5: update

    def update(self, r: Rollout, iteration: int, trained: Optimised, total_updates: int,
               per_iter: int) -> dict[str, float]:  # fmt: skip
        """rl.ppo_epochs passes over the rollout in minibatches of train.batch_size responses (this
        process: its share), one optimiser step of the actor-critic (`trained`) each."""
        eng = self.engine
        sums: dict[str, float] = defaultdict(float)
        grad_norms: list[float] = []
        minibatches, lr = 0, 0.0
        update_index = iteration * per_iter
        generator = torch.Generator().manual_seed(
            stream_seed(eng.seed, "minibatch_order", iteration)
        )
        mb_local = self.cfg.train.batch_size // eng.world
        for _ in range(self.rl.ppo_epochs):
            order = torch.randperm(len(r), generator=generator)
            for start in range(0, len(r), mb_local):
                result = self.train_minibatch(r, order[start : start + mb_local], trained, update_index,
                                              total_updates, iteration + 1, sums)  # fmt: skip
                lr = result.lr
                if result.grad_norm is not None:  # of the synced gradient: global
                    grad_norms.append(result.grad_norm)
                update_index += 1
                minibatches += 1
        # each term is a share of its minibatch's global token mean: sum over processes, then
        # average over the minibatches
        out = {k: v / max(minibatches, 1) for k, v in sum_over_processes(sums).items()}
        out["policy/grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        out["lr"] = lr
        return out

    def train_minibatch(self, r: Rollout, rows: torch.Tensor, trained: Optimised, index: int, total: int,
                        label: int, sums: dict[str, float]) -> StepResult:  # fmt: skip
        """Optimiser step `index` of `total` on rollout rows `rows`, in micro-batches (its terms
        summed into `sums`). Each loss is the token mean over the whole minibatch: summed per
        micro-batch, divided by the minibatch's real tokens on all processes (transformers'
        num_items_in_batch), so it is already its share of the step's mean."""
        eng = self.engine
        local_tokens = float(r.response_mask[rows.to(r.response_mask.device)].sum())
        tokens = sum_over_processes({"tokens": local_tokens})["tokens"]
        micro = [r.take(m.to(r.response_ids.device)) for m in rows.split(eng.micro_batch_size)]
        return trained.step(index, total, micro, lambda b: self.losses(b, tokens),
                            scale=eng.micro_loss_factor, label=label, sums=sums)  # fmt: skip

    def losses(
        self, b: dict[str, torch.Tensor], tokens: float
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The PPO loss of one micro-batch (policy, entropy bonus, value) and its terms."""
        rl, mask = self.rl, b["response_mask"]
        # without an entropy bonus the entropy is only reported: made outside the graph
        logp, token_entropy = self.roles.logprobs_and_entropy(
            "policy", b, self.temperature, "grad" if rl.entropy_coef > 0 else "value"
        )
        weights = None
        if rl.sampler.correction == "tis" and "logp_sampler" in b:
            weights = sampler_weights(b["logp_old"], b["logp_sampler"], rl.sampler.tis_cap)
        pl, pstats = policy_loss(
            logp, b["logp_old"], b["advantages"], mask, rl.clip_range, tokens, weights
        )
        entropy = token_mean(token_entropy, mask, tokens)
        loss = pl - rl.entropy_coef * entropy
        stats = {"policy/loss": pl, "policy/entropy": entropy, "policy/clipfrac": pstats["clipfrac"],
                 "policy/approx_kl": pstats["approx_kl"]}  # fmt: skip
        if rl.kl.in_loss:  # GRPO's k3 KL to the reference, weighted by beta2 (rl.kl.coef)
            kl = kl_loss(logp, b["logp_ref"], mask, tokens)
            loss = loss + self.kl.value * kl
            stats["policy/kl_loss"] = kl
        if self.roles.has("critic"):
            v = self.roles.values(b)
            vl, vstats = value_loss(v, b["values"], b["returns"], mask, rl.value_clip, tokens)
            loss = loss + vl
            stats.update({"value/loss": vl, "value/clipfrac": vstats["clipfrac"]})
        return loss, stats

    # ------------------------------------------------------------------ logging helpers

    def rollout_metrics(self, r: Rollout, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means over every response of the global rollout (sums over processes / count)."""
        mask = r.response_mask.float()
        sums: dict[str, float] = {
            "n": float(len(r)),
            "rollout/score": float(r.score.sum()),
            "rollout/kl": float(parts["kl"].sum()),
            "rollout/return": float(r.rewards.sum()),
            "rollout/response_length": float(mask.sum()),
            "rollout/truncated_share": float(r.truncated.float().sum()),
        }
        if "dpo_per_token" in parts:
            sums["rollout/dpo_reward_sum"] = float(parts["dpo_per_token"].sum())
        # per-response means, weighted by this process's responses (a share is a ratio of sums
        # over this process's tokens: the mean over processes, exact with one process)
        in_reward = (
            parts if not self.rl.kl.in_loss else {k: v for k, v in parts.items() if k != "kl"}
        )
        for name, (total, share) in reward_breakdown(in_reward, self.kl.value).items():
            if (
                name == "score"
                and not self.roles.has("reward")
                and not self.rl.score.missing_eos_penalty
            ):
                continue  # no reward model: no score to report
            sums[f"reward/{name}_sum"] = total * len(r)
            sums[f"reward/{name}_share"] = share * len(r)
        if "gold" in r.texts:
            sums["rollout/gold_reward"] = float(sum(r.texts["gold"]))
        sampler = {}
        if r.logp_sampler is not None:  # vLLM sampled: how far its log-probs are from pi_old's
            gap = (r.logp_old - r.logp_sampler).masked_fill(~r.response_mask.bool(), 0.0)
            sampler = {"tokens": float(mask.sum()), "gap": float(gap.sum()), "gap_abs": float(gap.abs().sum()),
                       "capped": float((gap > math.log(self.rl.sampler.tis_cap)).sum())}  # fmt: skip
            sums.update({f"_sampler/{k}": v for k, v in sampler.items()})
        sums = sum_over_processes(sums)
        n = sums.pop("n")
        if sampler:  # per token: log pi_old - log pi_vllm, its mean size, and the tokens TIS caps
            got = {k: sums.pop(f"_sampler/{k}") for k in sampler}
            tokens = max(got["tokens"], 1.0)
            sums.update({"rollout/sampler_gap": got["gap"] / tokens * n,
                         "rollout/sampler_gap_abs": got["gap_abs"] / tokens * n,
                         "rollout/sampler_tis_capped_share": got["capped"] / tokens * n})  # fmt: skip
        m = {k: v / n for k, v in sums.items()}
        m["rollout/kl_coef"] = self.kl.value
        if r.values is not None:
            m["value/explained_variance"] = explained_variance(
                r.values, r.returns, r.response_mask, reduce_sum=self._reduce_sum
            )
        return m

    def evaluate(self) -> dict[str, float]:
        """Sampled metrics on the held-out prompts, split over the processes."""
        from rto.evaluation.sampled import sampled_metrics

        if not self.eval_prompts:
            return {}
        with self.roles.generation_weights() as policy:
            self.generator.load_weights(policy)
            metrics, _ = sampled_metrics(
                policy, self.tokenizer, self.eval_prompts, self.cfg.eval, self.cfg.generate,
                device=self.engine.device, seed=self.cfg.seed, ref=self.roles.ref, generator=self.generator,
                passes=self.roles.passes,
            )  # fmt: skip
        self.generator.sleep()
        return {f"eval/{k}": v for k, v in metrics.items()}

    # ------------------------------------------------------------------ the loop

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the weights, optimiser and random generators."""
        return {"kl_coef": self.kl.value, "samples_seen": self.samples_seen,
                "running_score": vars(self.running)}  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        self.kl.value = state.get("kl_coef", self.kl.value)
        self.samples_seen = state.get("samples_seen", 0)
        for k in ("count", "mean", "m2"):
            setattr(
                self.running, k, state.get("running_score", {}).get(k, getattr(self.running, k))
            )

    def train(self) -> dict[str, Any]:
        eng, rl, t = self.engine, self.rl, self.cfg.train
        iterations, per_iter = self.plan()
        total_updates = iterations * per_iter
        trained = self.roles.prepare(eng, t.lr, rl.critic_lr)
        for source in self.sources:  # a learning source's model is optimised on the same path
            if hasattr(source, "prepare"):
                source.prepare(eng, iterations)
        state = eng.resume_or_start(self.cfg.resume)
        start = state["step"]
        self.restore(state)
        logger = eng.start_logging(iterations)
        logger.start_at(start)
        if start == 0:
            first = self.evaluate()
            if first:
                logger.log(0, {"samples": 0, **first})
        began = time.time()
        row: dict[str, Any] = {}
        for it in range(start, iterations):
            t0 = time.time()
            r, gen_seconds = self.rollout(it)
            t1 = time.time()
            self.score(r, it)
            parts = self.rewards(r)
            self.advantages(r)
            learned = self.learn(r)
            t2 = time.time()
            rollout_stats = {**self.rollout_metrics(r, parts), **learned}
            self.kl.update(rollout_stats["rollout/kl"], len(r) * eng.world)
            train_stats = self.update(r, it, trained, total_updates, per_iter)
            t3 = time.time()
            self.samples_seen += len(r) * eng.world
            counts = sum_over_processes({"generated": float(r.response_mask.sum()),
                                         "trained": rl.ppo_epochs * float(r.prompt_mask.sum() + r.response_mask.sum())})  # fmt: skip
            gen_seconds = max_over_processes(gen_seconds)  # the slowest process sets the pace
            row = {"samples": self.samples_seen, **rollout_stats, **train_stats,
                   "time/generate": gen_seconds, "time/score": t2 - t1, "time/update": t3 - t2,
                   "time/iteration": t3 - t0,
                   "time/generated_tokens_per_second": counts["generated"] / max(gen_seconds, 1e-9),
                   "time/train_tokens_per_second": counts["trained"] / max(t3 - t2, 1e-9)}  # fmt: skip
            eng.end_step(it + 1, iterations, row, evaluate=self.evaluate, state=self.checkpoint_state)  # fmt: skip
        eng.check_finite_weights(
            self.roles.trained_module("policy", self.acc), iterations, "policy"
        )
        if self.roles.has("critic") and self.cfg.save_critic:
            eng.check_finite_weights(self.roles.trained_module("critic", self.acc), iterations, "critic")  # fmt: skip
        final = self.evaluate()
        self.generator.close()
        if final:
            logger.log(iterations, {"samples": self.samples_seen, **final})
        summary = {f"train/{k}": v for k, v in row.items()}
        summary.update(final)
        summary.update({"iterations": iterations, "updates": total_updates, "samples": self.samples_seen,
                        "skipped_steps": eng.skipped_steps, "train_seconds": round(time.time() - began, 1),
                        **eng.identical_on_every_process(self.roles.prepared, *self.learned_modules())})  # fmt: skip
        return summary
