"""Where rewards come from: token-reward sources (a registry) and sentence reward functions.

A token-reward source gives every policy response token a value, a (B, T) tensor aligned with
the rollout's response tokens; `rl/rewards.token_rewards` scales, clips and places it with the
source's own settings (coefficient, clip, granularity, shaping) and adds it to the reward:

    dpo       x_h = log pi_dpo(y_h|x,y_<h) - log pi_ref(y_h|x,y_<h), at temperature 1; beta1 =
              rl.dpo_reward.scale (RTO's dense reward); frozen, or with rl.online_dpo.enabled
              online learning on every rollout (`OnlineDPOSource`, rl/online_reward.py)
    function  the user's `f(prompts, responses, tokens)` (config key token_reward_fn): prompts
              as judges read them, decoded responses, and for each response one TokenSpan
              (text, start, end) per token (`data/spans.py`); it returns, per response, either
              one number per token or (start, end, reward) character spans, each placed on the
              token that owns the span's last character; beta = rl.token_reward_fn.scale

A sentence reward function (config key reward_fn) is `f(prompts, responses) -> list[float]`,
like a gold reward, added to the score on the last token with weight rl.reward_fn.coef.

More sources: `register(name, builder)`, where `builder(cfg, ctx)` returns the source or None
when the run's config switches it off (a source switched off is never computed). A source is
an object with
    name          its key in Rollout.token_sources, the reward parts and the logs
    settings      a `SourceSettings`: coefficient, clip, granularity, shaping
    model         (what, path) of the model its values come from, or None: NaN or inf in its
                  values then stops the run naming that model
    __call__(r)   the (B, T) values for a scored rollout `r` (the roles' passes are in it)
and, for a source that keeps learning (an online token-reward model), optionally
    learn(r)      called once per iteration after the rewards and advantages are made, with
                  the whole rollout; returns metrics, logged as source/<name>/<key>
    prepare(engine, iterations)
                  called once before training (and before --resume loads a checkpoint): a
                  source with a model of its own to train puts it on the engine's path
    state_dict() / load_state_dict(state)
                  its state (counters; weights and optimiser that accelerate does not hold),
                  saved in every checkpoint and loaded on --resume (accelerate's
                  register_for_checkpointing)
The trainer only calls sources through this; the DPO source has no other door.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rto.data.spans import rewards_on_tokens, token_spans
from rto.engine.distributed import sum_over_processes
from rto.errors import RtoError
from rto.rl.experience import Rollout
from rto.rl.online_reward import OnlineTokenReward
from rto.rl.rewards import SourceSettings
from rto.tasks import call_judge, resolve


@dataclass
class SourceContext:
    """What a source may use: the roles (rl/roles.py), the policy's tokenizer and stop tokens,
    and the scoring pass's settings."""

    roles: Any
    tokenizer: Any
    stop_ids: list[int]
    batch_size: int
    temperature: float


Builder = Callable[[Any, SourceContext], Any]
REGISTRY: dict[str, Builder] = {}


def register(name: str, builder: Builder) -> None:
    """Add a token-reward source: `builder(cfg, ctx)` -> the source, or None when off."""
    REGISTRY[name] = builder


def build_sources(cfg: Any, ctx: SourceContext) -> list[Any]:
    """The sources this run uses, in registry order."""
    sources = [builder(cfg, ctx) for builder in REGISTRY.values()]
    return [s for s in sources if s is not None]


def source_settings(section: Any) -> SourceSettings:
    """A source's settings from its config section (rl.dpo_reward, rl.token_reward_fn)."""
    return SourceSettings(section.scale, section.clip, section.granularity, section.shaping)


def response_token_ids(r: Rollout) -> list[list[int]]:
    """Each response's real tokens (up to and including the stop token)."""
    lengths = r.response_mask.sum(1).tolist()
    return [row[: int(n)] for row, n in zip(r.response_ids.tolist(), lengths)]


# --------------------------------------------------------------------------- dpo


@torch.no_grad()
def dpo_log_ratio(roles: Any, batch: dict[str, torch.Tensor],
                  logp_ref: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(B, T) x_h = log pi_dpo(y_h|x,y_<h) - log pi_ref(y_h|x,y_<h) at temperature 1, asked of
    `roles` (rl/roles.py) for a batch in the RL layout; 0 outside the response mask. RTO's token
    reward is beta1 * x_h: under a token-level Bradley-Terry model it is the reward the DPO
    policy is optimal for (the value terms cancel between two responses to the same prompt).
    `logp_ref`: the reference's log-probs at temperature 1, when already computed."""
    ref = logp_ref if logp_ref is not None else roles.logprobs("ref", batch, 1.0)
    return roles.logprobs("dpo", batch, 1.0) - ref


class DPOSource:
    """RTO's dense reward: the DPO model's log-ratio to the reference at temperature 1."""

    name = "dpo"

    def __init__(self, settings: SourceSettings, ctx: SourceContext, path: str | None = None):
        self.settings, self.ctx = settings, ctx
        self.model = ("DPO model", path)

    def __call__(self, r: Rollout) -> torch.Tensor:
        out = []
        for idx in r.chunks(self.ctx.batch_size):
            b = r.take(idx)
            # the KL pass scored the reference at the sampling temperature: reuse it at 1 only
            reuse = self.ctx.temperature == 1.0 and "logp_ref" in b
            out.append(dpo_log_ratio(self.ctx.roles, b, b["logp_ref"] if reuse else None))
        return torch.cat(out).float()


class OnlineDPOSource(DPOSource):
    """The DPO source whose model keeps learning (rl.online_dpo.enabled): PRIME's update
    (rl/online_reward.py) on every rollout, after it scores it (rl.online_dpo.order
    after) or before (the rollout is scored by the updated model). Logs source/dpo/loss and
    accuracy (before the update), labelled_share, updates and reward_drift: the mean over real
    tokens of |beta1 (x_after - x_before)|, how far this rollout's token rewards moved (one more
    forward pass of the DPO model)."""

    def __init__(self, settings: SourceSettings, ctx: SourceContext, path: str | None,
                 learner: OnlineTokenReward, order: str):  # fmt: skip
        super().__init__(settings, ctx, path)
        self.learner, self.order = learner, order
        self.metrics: dict[str, float] = {}

    def prepare(self, engine: Any, iterations: int) -> None:
        """Its DPO model on the engine's optimisation path (`OnlineTokenReward.prepare`)."""
        self.learner.prepare(engine, iterations)

    def __call__(self, r: Rollout) -> torch.Tensor:
        if self.order == "after":
            return super().__call__(r)
        before = super().__call__(r)
        self.metrics = self.learner.step(r, self.ref_logprobs(r))
        after = super().__call__(r)
        self.metrics["reward_drift"] = self.drift(r, before, after)
        return after

    def learn(self, r: Rollout) -> dict[str, float]:
        if self.order == "after":
            self.metrics = self.learner.step(r, self.ref_logprobs(r))
            after = super().__call__(r)
            self.metrics["reward_drift"] = self.drift(r, r.token_sources[self.name], after)
        return self.metrics

    @torch.no_grad()
    def ref_logprobs(self, r: Rollout) -> torch.Tensor:
        if self.ctx.temperature == 1.0 and r.logp_ref is not None:
            return r.logp_ref
        chunks = r.chunks(self.ctx.batch_size)
        return torch.cat(
            [self.ctx.roles.logprobs("ref", r.take(idx), 1.0) for idx in chunks]
        ).float()

    def drift(self, r: Rollout, before: torch.Tensor, after: torch.Tensor) -> float:
        mask = r.response_mask.bool()
        moved = (self.settings.scale * (after - before)).abs().masked_fill(~mask, 0.0)
        sums = sum_over_processes({"moved": float(moved.sum()), "tokens": float(mask.sum())})
        return sums["moved"] / max(sums["tokens"], 1.0)

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)


def _dpo_builder(cfg: Any, ctx: SourceContext) -> DPOSource | None:
    rl = cfg.rl
    if rl.dpo_reward.scale == 0.0:
        return None
    settings = source_settings(rl.dpo_reward)
    if not rl.online_dpo.enabled:
        return DPOSource(settings, ctx, cfg.dpo_model)
    weights = {
        "score": rl.score.coef if ctx.roles.has("reward") else 0.0,
        "reward_fn": rl.reward_fn.coef,
    }
    learner = OnlineTokenReward(ctx.roles, beta=rl.dpo_reward.scale, lr=rl.online_dpo.lr,
                                steps=rl.online_dpo.steps, label=rl.online_dpo.label,
                                batch_size=ctx.batch_size, sentence_weights=weights)  # fmt: skip
    return OnlineDPOSource(settings, ctx, cfg.dpo_model, learner, rl.online_dpo.order)


# --------------------------------------------------------------------------- function


class FunctionSource:
    """Per-token rewards from the user's function of the decoded responses."""

    name = "function"
    model = None

    def __init__(
        self, fn: Callable[..., Any], spec: str, settings: SourceSettings, ctx: SourceContext
    ):
        self.fn, self.spec, self.settings, self.ctx = fn, spec, settings, ctx

    def __call__(self, r: Rollout) -> torch.Tensor:
        texts, spans = token_spans(self.ctx.tokenizer, response_token_ids(r), self.ctx.stop_ids)
        values = list(self.fn(list(r.texts["prompts"]), texts, spans))
        if len(values) != len(texts):
            raise RtoError(
                f"token reward function {self.spec!r} returned {len(values)} lists for {len(texts)} responses"
            )
        out = torch.zeros(r.response_ids.shape, dtype=torch.float32)
        for b, (value, row, text) in enumerate(zip(values, spans, texts)):
            where = f"token reward function {self.spec!r}, response {b} ({text!r:.60})"
            out[b, : len(row)] = torch.tensor(rewards_on_tokens(value, row, text, where))
        return out.to(r.response_ids.device)


def _function_builder(cfg: Any, ctx: SourceContext) -> FunctionSource | None:
    rl = cfg.rl
    if not cfg.token_reward_fn or rl.token_reward_fn.scale == 0.0:
        return None
    fn = resolve_function(cfg.token_reward_fn, "token_reward_fn")
    settings = source_settings(rl.token_reward_fn)
    return FunctionSource(fn, cfg.token_reward_fn, settings, ctx)


register("dpo", _dpo_builder)
register("function", _function_builder)


def resolve_function(spec: str, key: str) -> Callable[..., Any]:
    """A user's `module:function` (or a registered gold reward's name) from config key `key`."""
    return resolve(spec, "gold", key)


# --------------------------------------------------------------------------- sentence rewards


class SentenceRewardFunction:
    """A programmatic sentence reward f(prompts, responses) -> list[float] (a verifiable reward,
    or a task's gold reward as an oracle), read on the raw prompt as judges read it."""

    def __init__(self, spec: str, weight: float, name: str = "reward_fn"):
        self.fn, self.spec, self.weight, self.name = (
            resolve_function(spec, "reward_fn"),
            spec,
            weight,
            name,
        )

    def __call__(self, r: Rollout) -> torch.Tensor:
        values = call_judge(self.fn, list(r.texts["prompts"]), list(r.texts["responses"]), self.spec, "gold",
                            what="reward function")  # fmt: skip
        return torch.tensor(values, dtype=torch.float32, device=r.response_ids.device)


def sentence_rewards(cfg: Any) -> list[SentenceRewardFunction]:
    if not cfg.reward_fn or cfg.rl.reward_fn.coef == 0.0:
        return []
    return [SentenceRewardFunction(cfg.reward_fn, cfg.rl.reward_fn.coef)]


def score_sources(r: Rollout, sources: list[Any], sentence: list[SentenceRewardFunction]) -> None:
    """Fill r.token_sources (raw (B, T) values) and r.sentence ((B,) values) after the roles'
    scoring pass."""
    for reward in sentence:  # first: a source that learns before it scores reads them
        r.sentence[reward.name] = reward(r)
    for source in sources:
        r.token_sources[source.name] = source(r)
