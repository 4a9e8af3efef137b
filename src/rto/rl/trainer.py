"""The RL loop: rollout -> scoring passes -> token rewards -> advantages -> PPO update.

One iteration (a "step" for logging, checkpoints and --resume):
  1. rollout: sample responses to rl.rollout_batch_size prompts from the current policy;
  2. score: log-probs under policy / reference, critic values, reward-model score, asked of the
     roles (rto.rl.roles); then the token-reward sources (DPO log-ratio, a user's function) and
     sentence reward functions (rto.rl.sources);
  3. rewards: rto.rl.rewards.token_rewards (the RTO formula and its variants);
  4. advantages: GAE with the critic, or REINFORCE++ returns, then whitening;
  5. update: rl.ppo_epochs passes of minibatches of train.batch_size responses, clipped policy
     and value losses, separate optimisers for actor and critic.
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
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from rto.engine.distributed import GenerationWeights, max_over_processes, sum_over_processes
from rto.engine.faults import maybe_fault
from rto.errors import ConfigError, ModelError, RtoError
from rto.models.forward import entropy_from_logits
from rto.models.generate import decode_responses, sample, stop_ids
from rto.models.seeded import row_seed
from rto.rl.advantages import estimate, whiten
from rto.rl.experience import Rollout, merge_samples, score_rollout, to_device
from rto.rl.kl import KLController
from rto.rl.losses import explained_variance, policy_loss, token_mean, value_loss
from rto.rl.rewards import RewardSettings, normalize_score, reward_breakdown, token_rewards
from rto.rl.sources import SourceContext, build_sources, score_sources, sentence_rewards
from rto.tasks import call_judge, resolve


@dataclass
class RunningMoments:
    """Running mean / std of reward-model scores (rl.score_normalization running)."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        n = float(x.numel())
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.count - 1, 1)) or 1.0


def delimiter_token_ids(tokenizer: Any, delimiters: list[str]) -> list[int]:
    """Ids of tokens whose text ends with a segment delimiter ('.', '!', '?', newline), spaces
    and tabs after it aside. Newline tokens ("\n", " \n", "\n\n") are delimiters themselves."""
    ids = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id]).rstrip(" \t")
        if text and text.endswith(tuple(delimiters)):
            ids.append(token_id)
    return ids


def check_prompt_count(n_prompts: int, rollout_batch_size: int) -> None:
    if n_prompts < rollout_batch_size:
        raise RtoError(
            f"only {n_prompts} prompts for rl.rollout_batch_size {rollout_batch_size}; lower "
            "rl.rollout_batch_size or add prompts"
        )


class ActorCritic(torch.nn.Module):
    """The trained roles (policy, and the critic when there is one) as one module with one
    optimiser (a parameter group each, with its own learning rate): DeepSpeed runs one model per
    engine, and DDP / FSDP then wrap both at once. `model("policy", ...)` runs one role through
    the wrapper, as the gradient synchronisation and the sharding need."""

    def __init__(self, policy: Any, critic: Any | None):
        super().__init__()
        self.policy = policy
        self.critic = critic

    @property
    def _no_split_modules(self) -> list[str]:  # FSDP's transformer-layer auto-wrap reads it
        parts = [m for m in (self.policy, self.critic) if m is not None]
        names = [
            n
            for m in parts
            for n in (getattr(getattr(m, "hf", m), "_no_split_modules", None) or [])
        ]
        return sorted(set(names))

    def forward(self, role: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, role)(*args, **kwargs)


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
        self.kl = KLController(self.rl.kl_coef, self.rl.kl_target, self.rl.kl_horizon)
        self.eos = stop_ids(tokenizer, roles.policy)
        self.gold = (
            resolve(cfg.eval.gold_reward, "gold", "eval.gold_reward")
            if cfg.eval.gold_reward
            else None
        )
        temperature = cfg.generate.temperature or 1.0
        context = SourceContext(roles, tokenizer, self.eos, self.rl.forward_batch_size, temperature)
        self.sources = build_sources(cfg, context)  # token-reward sources (rl/sources.py)
        self.sentence = sentence_rewards(cfg)  # sentence reward functions
        self.segment_ids = None
        if any(s.settings.granularity == "segment" for s in self.sources):
            self.segment_ids = torch.tensor(
                delimiter_token_ids(tokenizer, self.rl.segment_delimiters)
            )
        self.samples_seen = 0
        self.model: Any = None  # ActorCritic, prepared by accelerate (see `prepare`)
        self._trained: list[list[Any]] = []  # the policy's and the critic's trained parameters
        self.generation_weights: GenerationWeights | None = None

    # the trainable roles, as accelerate prepares them
    @property
    def policy(self) -> Any:
        return self.roles.policy

    @policy.setter
    def policy(self, model: Any) -> None:
        self.roles.policy = model

    @property
    def critic(self) -> Any:
        return self.roles.critic

    @critic.setter
    def critic(self, model: Any) -> None:
        self.roles.critic = model

    @property
    def ref(self) -> Any:
        return self.roles.ref

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

    # ------------------------------------------------------------------ 1-2: rollout and scoring

    def rollout(self, iteration: int) -> tuple[Rollout, float]:
        eng, gen, k = self.engine, self.cfg.generate, self.rl.samples_per_prompt
        idx = eng.batch_indices(iteration, len(self.prompts), batch_size=self.rl.rollout_batch_size)
        first = eng.rank * len(idx)  # this share's position in the global rollout batch
        chosen = [self.prompts[i] for i in idx for _ in range(k)]
        seeds = [row_seed(self.cfg.seed, iteration, first + j, s) for j in range(len(idx)) for s in range(k)]  # fmt: skip
        assert self.generation_weights is not None
        chunks = []
        began = time.time()
        with self.generation_weights() as policy:  # whole weights, gathered once per rollout
            for s in range(0, len(chosen), gen.batch_size):
                chunks.append(sample(
                    policy, [p["prompt_ids"] for p in chosen[s : s + gen.batch_size]], pad_id=self.tokenizer.pad_token_id,
                    eos=self.eos, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                    top_k=gen.top_k, device=eng.device, seeds=seeds[s : s + gen.batch_size],
                ))  # fmt: skip
        seconds = time.time() - began
        r = to_device(merge_samples(chunks, self.tokenizer.pad_token_id), eng.device)
        r.texts["prompts"] = [p["prompt"] for p in chosen]  # as judges read them
        r.texts["prompt_values"] = [p["prompt_value"] for p in chosen]  # as the rows held them
        r.texts["responses"] = decode_responses(self.tokenizer, r, self.eos)
        return r, seconds

    def score(self, r: Rollout, iteration: int = 0) -> None:
        temperature = self.cfg.generate.temperature or 1.0
        score_rollout(r, self.roles, batch_size=self.rl.forward_batch_size, temperature=temperature)
        score_sources(r, self.sources, self.sentence)
        self.check_frozen_outputs(r, iteration)
        if self.gold is not None:
            r.texts["gold"] = call_judge(
                self.gold,
                r.texts["prompts"],
                r.texts["responses"],
                self.cfg.eval.gold_reward,
                "gold",
            )

    def check_frozen_outputs(self, r: Rollout, iteration: int) -> None:
        """NaN or inf from a frozen model (reference, DPO model, reward model) comes from that
        model, not from training: name it, before it reaches the rewards and the update."""
        cfg = self.cfg
        frozen = [
            ("reference model", cfg.ref_model or cfg.model.path, r.logp_ref),
            ("DPO model", cfg.dpo_model, r.dpo_log_ratio),
            ("reward model", cfg.reward_model, r.score if self.roles.has("reward") else None),
        ]
        counts = torch.tensor(
            [0.0 if t is None else float((~torch.isfinite(t)).reshape(len(t), -1).any(1).sum())
             for _, _, t in frozen], device=self.engine.device,
        )  # fmt: skip
        if self.acc.num_processes > 1:
            counts = self.acc.reduce(counts, reduction="sum")
        for (name, path, _), n in zip(frozen, counts.tolist()):
            if n:
                scored = "scored" if name == "reward model" else "gave log-probabilities of"
                raise ModelError(
                    f"the {name} ({path}) {scored} {int(n)} of {len(r) * self.engine.world} "
                    f"responses as NaN or inf in RL iteration {iteration + 1}; the {name} is frozen, "
                    "so its weights (or its score head) are broken, not the learning rate: check or "
                    "retrain it"
                )

    # ------------------------------------------------------------------ 3-4: rewards and advantages

    def normalized_score(self, r: Rollout) -> torch.Tensor:
        rl = self.rl
        mean, std = 0.0, 1.0
        if rl.score_normalization == "stored" and self.score_stats is not None:
            mean, std = self.score_stats["mean"], self.score_stats["std"]
        elif rl.score_normalization == "running":
            self.running.update(self.acc.gather(r.score).float())
            mean, std = self.running.mean, self.running.std
        return normalize_score(r.score, mean=mean, std=std, clamp=rl.score_clamp, truncated=r.truncated,
                               missing_eos_penalty=rl.missing_eos_penalty)  # fmt: skip

    def assemble(self, r: Rollout) -> dict[str, torch.Tensor]:
        rl = self.rl
        settings = RewardSettings(
            dpo_reward_scale=rl.dpo_reward_scale, dpo_reward_clip=rl.dpo_reward_clip,
            granularity=rl.dpo_reward_granularity, shaping=rl.dpo_reward_shaping,
            kl_coef=self.kl.value, score_coef=rl.score_coef,
        )  # fmt: skip
        segment_end = None
        if self.segment_ids is not None:
            segment_end = torch.isin(r.response_ids, self.segment_ids.to(r.response_ids.device))
        others = {
            s.name: (r.token_sources[s.name], s.settings) for s in self.sources if s.name != "dpo"
        }
        sentence = {f.name: (r.sentence[f.name], f.weight) for f in self.sentence}
        r.rewards, parts = token_rewards(r.response_mask, r.logp_old, r.logp_ref, self.normalized_score(r), settings,
                                         dpo_log_ratio=r.dpo_log_ratio, segment_end=segment_end, sources=others,
                                         sentence=sentence)  # fmt: skip
        adv, ret = estimate(
            rl.advantage_estimator,
            r.rewards,
            r.values,
            r.response_mask,
            gamma=rl.gamma,
            lam=rl.gae_lambda,
        )
        if rl.whiten_advantages:
            adv = whiten(adv, r.response_mask, reduce_sum=self._reduce_sum)
        r.advantages, r.returns = adv, ret
        return parts

    def _reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x, reduction="sum") if self.acc.num_processes > 1 else x

    # ------------------------------------------------------------------ 5: update

    def update(
        self, r: Rollout, iteration: int, optimizer: Any, total_updates: int, per_iter: int
    ) -> dict[str, float]:
        """rl.ppo_epochs passes over the rollout in minibatches of train.batch_size responses (this
        process: its share), one optimiser step each. Each loss is the token mean over the whole
        minibatch: summed per micro-batch, divided by the minibatch's real tokens on all processes."""
        rl, t, eng, acc = self.rl, self.cfg.train, self.engine, self.acc
        temperature = self.cfg.generate.temperature or 1.0
        n_local = len(r)
        mb_local = t.batch_size // eng.world
        sums: dict[str, float] = defaultdict(float)
        grad_norms: list[float] = []
        minibatches = 0
        generator = torch.Generator().manual_seed(self.engine.seed * 100_003 + iteration)
        parts = self.trained_parts()
        update_index = iteration * per_iter
        for _ in range(rl.ppo_epochs):
            order = torch.randperm(n_local, generator=generator)
            for start in range(0, n_local, mb_local):
                lr = eng.lr_at(update_index, total_updates, t.lr)
                optimizer.param_groups[0]["lr"] = lr  # the policy's group, then the critic's
                if self.critic is not None:
                    optimizer.param_groups[1]["lr"] = eng.lr_at(
                        update_index, total_updates, rl.critic_lr
                    )
                finite = True
                mb = order[start : start + mb_local]
                local_tokens = float(r.response_mask[mb.to(r.response_mask.device)].sum())
                tokens = sum_over_processes({"tokens": local_tokens})[
                    "tokens"
                ]  # num_items_in_batch
                for micro in mb.split(eng.micro_batch_size):
                    b = r.take(micro.to(r.response_ids.device))
                    mask = b["response_mask"]
                    with acc.accumulate(self.model):
                        with acc.autocast():
                            logp, logits = self.roles.logprobs_and_logits("policy", b, temperature)
                            pl, pstats = policy_loss(
                                logp, b["logp_old"], b["advantages"], mask, rl.clip_range, tokens
                            )
                            # without an entropy bonus the entropy is only reported: made
                            # outside the graph, its (B, T, V) temporaries are not kept
                            with torch.set_grad_enabled(
                                rl.entropy_coef > 0 and torch.is_grad_enabled()
                            ):
                                entropy = token_mean(
                                    entropy_from_logits(logits, temperature), mask, tokens
                                )
                            loss = pl - rl.entropy_coef * entropy
                            if self.critic is not None:
                                v = self.roles.values(b)
                                vl, vstats = value_loss(
                                    v, b["values"], b["returns"], mask, rl.value_clip, tokens
                                )
                                loss = loss + vl
                        # the terms are already shares of the minibatch mean: undo accelerate's
                        # division by the accumulation steps and DDP's average over processes
                        loss = loss * eng.micro_loss_factor
                        if not torch.isfinite(loss.detach()):
                            finite = False
                            loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
                        acc.backward(loss)
                        if acc.sync_gradients:
                            norms = eng.clip_gradients(parts, whole=self.model)
                            finite = not eng.any_true(not finite) and all(
                                n is None or math.isfinite(n) for n in norms
                            )
                            if finite:
                                optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                            if norms[0] is not None:  # of the synced gradient: global
                                grad_norms.append(norms[0])
                    for k, v in {"policy/loss": pl, "policy/entropy": entropy, "policy/clipfrac": pstats["clipfrac"],
                                 "policy/approx_kl": pstats["approx_kl"]}.items():  # fmt: skip
                        sums[k] += float(v.detach())
                    if self.critic is not None:
                        sums["value/loss"] += float(vl.detach())
                        sums["value/clipfrac"] += float(vstats["clipfrac"])
                eng.record_step_health(finite, iteration + 1)  # as metrics.jsonl counts
                update_index += 1
                minibatches += 1
        # each term is a share of its minibatch's global token mean: sum over processes, then
        # average over the minibatches
        out = {k: v / max(minibatches, 1) for k, v in sum_over_processes(sums).items()}
        out["policy/grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        out["lr"] = lr
        return out

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
        for name, (total, share) in reward_breakdown(parts, self.kl.value).items():
            if name == "score" and not self.roles.has("reward") and not self.rl.missing_eos_penalty:
                continue  # no reward model: no score to report
            sums[f"reward/{name}_sum"] = total * len(r)
            sums[f"reward/{name}_share"] = share * len(r)
        if "gold" in r.texts:
            sums["rollout/gold_reward"] = float(sum(r.texts["gold"]))
        sums = sum_over_processes(sums)
        n = sums.pop("n")
        m = {k: v / n for k, v in sums.items()}
        m["rollout/kl_coef"] = self.kl.value
        if r.values is not None:
            m["value/explained_variance"] = explained_variance(
                r.values, r.returns, r.response_mask, reduce_sum=self._reduce_sum
            )
        return m

    # ------------------------------------------------------------------ the loop

    def evaluate(self) -> dict[str, float]:
        """Sampled metrics on the held-out prompts, split over the processes."""
        from rto.evaluation.sampled import sampled_metrics

        if not self.eval_prompts:
            return {}
        assert self.generation_weights is not None
        with self.generation_weights() as policy:
            metrics, _ = sampled_metrics(
                policy, self.tokenizer, self.eval_prompts, self.cfg.eval, self.cfg.generate,
                device=self.engine.device, seed=self.cfg.seed, ref=self.ref,
            )  # fmt: skip
        return {f"eval/{k}": v for k, v in metrics.items()}

    def trained_parts(self) -> list[Any]:
        """The policy's and the critic's trained parameters (for gradient clipping)."""
        return self._trained

    def prepare(self) -> Any:
        """Wrap policy and critic into one prepared module with one optimiser (a parameter group
        each, as the roles' layout says which parameters train); from then on self.policy /
        self.critic run their role through it."""
        eng, acc, rl = self.engine, self.acc, self.rl
        policy_params, critic_params = self.roles.trained_parameters()
        groups = [(policy_params, self.cfg.train.lr)] + (
            [(critic_params, rl.critic_lr)] if self.critic is not None else []
        )
        self._trained = [params for params, _ in groups]
        optimizer = eng.optimizer_for_groups(groups)
        self.model, optimizer = acc.prepare(ActorCritic(self.policy, self.critic), optimizer)
        self.policy = partial(self.model, "policy")
        self.critic = partial(self.model, "critic") if self.critic is not None else None
        self.generation_weights = GenerationWeights(acc, self.model, part="policy")
        return optimizer

    def train(self) -> dict[str, Any]:
        eng, rl, t = self.engine, self.rl, self.cfg.train
        iterations, per_iter = self.plan()
        total_updates = iterations * per_iter
        optimizer = self.prepare()
        state = eng.resume_or_start(self.cfg.resume)
        start = state["step"]
        self.kl.value = state.get("kl_coef", self.kl.value)
        self.samples_seen = state.get("samples_seen", 0)
        for k in ("count", "mean", "m2"):
            setattr(
                self.running, k, state.get("running_score", {}).get(k, getattr(self.running, k))
            )
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
            parts = self.assemble(r)
            t2 = time.time()
            rollout_stats = self.rollout_metrics(r, parts)
            self.kl.update(rollout_stats["rollout/kl"], len(r) * eng.world)
            train_stats = self.update(r, it, optimizer, total_updates, per_iter)
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
            done = it + 1
            if t.eval_every and done % t.eval_every == 0 and done < iterations:
                row.update(self.evaluate())
            if done % t.log_every == 0 or done == iterations:
                logger.log(done, row)
            logger.advance()
            if t.save_every and done % t.save_every == 0 and done < iterations:
                eng.save_checkpoint(done, {"kl_coef": self.kl.value, "samples_seen": self.samples_seen,
                                           "running_score": vars(self.running)})  # fmt: skip
            maybe_fault("kill_after_step", done)
        inner = self.acc.unwrap_model(self.model)  # the modules behind the prepared wrapper
        eng.check_finite_weights(inner.policy, iterations, "policy")
        if inner.critic is not None and self.cfg.save_critic:
            eng.check_finite_weights(inner.critic, iterations, "critic")
        final = self.evaluate()
        if final:
            logger.log(iterations, {"samples": self.samples_seen, **final})
        summary = {f"train/{k}": v for k, v in row.items()}
        summary.update(final)
        summary.update({"iterations": iterations, "updates": total_updates, "samples": self.samples_seen,
                        "skipped_steps": eng.skipped_steps, "train_seconds": round(time.time() - began, 1),
                        **eng.identical_on_every_process(self.model)})  # fmt: skip
        return summary
