"""The five RL roles behind one object: policy, reference, DPO model, reward model, critic.

The scorer, the reward sources and the update never hold models; they ask by role: "log-probs
of these tokens under `ref`", "values", "score". How the roles are laid out in memory is the
layout's business, so reward maths and the loop do not change with it:

    SeparateModels          one model per role (this file)
    rl.shared_base.SharedBase   one frozen base with named LoRA adapters (policy, dpo, reward,
                            critic; ref = adapters off)

A layout also owns its models' lifecycle: `prepare` hands the trainable roles (policy, critic)
to accelerate as one module with one optimiser and from then on runs them through it;
`generation_weights` gives the policy as generation needs it; `save` writes a trained role
(full model, adapter folder, or an adapter of the shared base) as that layout stores it;
`prepare_dpo` / `save_dpo` make the DPO model an optimised module of its own, for an online
token-reward model, and save what it learned.

A batch is a dict of the RL layout's tensors (`Rollout.take`): prompt_ids / prompt_mask (B, P)
left-padded, response_ids / response_mask (B, T) right-padded.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from rto.engine.distributed import GenerationWeights
from rto.engine.optimise import Optimised
from rto.models.forward import PADDED, Layout, Runner, response_logprobs
from rto.models.load import save_pretrained
from rto.models.trainable import Trainable

LOGPROB_ROLES = ("policy", "ref", "dpo")
TRAINED_ROLES = ("policy", "critic")
# how the engine names the DPO model learning online (its step health, in checkpoints and errors)
ONLINE_MODULE = {"name": "token_reward_model", "what": "online token-reward model",
                 "lr_key": "rl.online_dpo.lr", "weight_decay": 0.0}  # fmt: skip


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

    def forward(self, role: str, op: Any, *args: Any, **kwargs: Any) -> Any:
        """`op(role's module, *args)`, inside the wrapper's forward (models/forward.run_op)."""
        return op(getattr(self, role), *args, **kwargs)


def call_module(module: Any, *args: Any) -> Any:
    """The op that runs a module's own forward (a critic's, through the wrapper)."""
    return module(*args)


def direct(module: Any) -> Any:
    """How an unwrapped role runs an op: `op(module, *args)` directly."""
    return partial(_apply, module)


def _apply(module: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    return op(module, *args, **kwargs)


def policy_logprobs(call: Any, batch: dict[str, torch.Tensor], temperature: float, passes: Layout,
                    entropy: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(B, T) log-probs of the sampled tokens (and their entropies: `entropy` "value" or
    "grad"), the pass run by `call` (how the role runs an op) laid out by `passes`."""
    return call(response_logprobs, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                batch["response_mask"], temperature, passes, entropy)  # fmt: skip


def critic_values(call: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, T) V(s_h): the critic's output at the position that predicts response token h."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    out = call(call_module, ids, mask)
    p = prompt_ids.shape[1]
    return out[:, p - 1 : -1] * response_mask


class Roles:
    """What every layout answers. A layout gives the role modules (policy and critic trainable,
    ref and dpo frozen causal LMs or callables like them, a `RewardModel`), which parameters
    train, and how a trained role is saved."""

    layout = ""

    def __init__(self, *, policy: Any, ref: Any, dpo: Any | None, critic: Any | None,
                 reward_model: Any | None, passes: Layout = PADDED):  # fmt: skip
        self._modules = {"policy": policy, "ref": ref, "dpo": dpo, "critic": critic}
        # how each role runs an op (models/forward.run_op): directly, through `prepared` once
        # prepared, or with the shared base's adapter active
        self._calls = {role: m if callable(m) and not isinstance(m, torch.nn.Module) else direct(m)
                       for role, m in self._modules.items() if m is not None}  # fmt: skip
        self.passes = passes  # how the forward passes lay out their batches (padded or packed)
        self.reward_model = reward_model
        self.prepared: Any = None  # ActorCritic(policy, critic) as accelerate prepared it
        self.prepared_dpo: Any = None  # the DPO model, when it learns online (prepare_dpo)
        self.generation_weights: GenerationWeights | None = None

    # the role modules as loaded (before `prepare` wraps the trained ones)
    policy = property(lambda self: self._modules["policy"])
    ref = property(lambda self: self._modules["ref"])
    dpo = property(lambda self: self._modules["dpo"])
    critic = property(lambda self: self._modules["critic"])

    def describe(self) -> str:
        raise NotImplementedError

    def trained_parameters(self) -> tuple[list[Any], list[Any]]:
        """(the policy's, the critic's) parameters that train (one optimiser group each)."""
        raise NotImplementedError

    def save(self, role: str, out: str | Path, tokenizer: Any, accelerator: Any, lora: Any) -> None:
        """The trained `role` (policy or critic) into `out`, as this layout stores it."""
        raise NotImplementedError

    def prepare_dpo(self, engine: Any, lr: float) -> Optimised:
        """The DPO model as a second trained module, for an online token-reward model that keeps
        training it: every parameter trains, with its own AdamW (learning rate `lr`, no weight
        decay), prepared by accelerate; from then on the role runs through it."""
        dpo = self._modules["dpo"].requires_grad_(True)
        trained = engine.optimised(Runner(dpo), [(dpo, lr)], **ONLINE_MODULE)
        self._calls["dpo"] = self.prepared_dpo = trained.module  # runs ops in its forward
        return trained

    def dpo_parameters(self) -> dict[str, Any]:
        """The DPO model's trained parameters by name."""
        return dict(self._modules["dpo"].named_parameters())

    def save_dpo(self, out: str | Path, tokenizer: Any, accelerator: Any, lora: Any) -> None:
        """The DPO model as it is now (after an online run: as it learned) into `out`; prepared,
        its weights are gathered from their shards."""
        if self.prepared_dpo is not None:
            save_pretrained(self.prepared_dpo, tokenizer, out, accelerator, part="model")
            return
        if accelerator.is_main_process:
            save_pretrained(self._modules["dpo"], tokenizer, out)
        accelerator.wait_for_everyone()

    def has(self, role: str) -> bool:
        """Whether `role` (policy, ref, dpo, reward, critic) is there."""
        if role == "reward":
            return self.reward_model is not None
        return self._modules[role] is not None

    # ------------------------------------------------------------------ lifecycle

    def prepare(self, engine: Any, policy_lr: float, critic_lr: float) -> Optimised:
        """Wrap policy and critic into one module, prepared by accelerate with one optimiser (a
        parameter group each, as the layout says which parameters train); from then on the
        trained roles run through it. Returns it as the engine steps it."""
        policy_params, critic_params = self.trained_parameters()
        groups = [(policy_params, policy_lr)]
        if self.has("critic"):
            groups.append((critic_params, critic_lr))
        wrapper = ActorCritic(self._modules["policy"], self._modules["critic"])
        trained = engine.optimised(wrapper, groups)
        self.prepared = trained.module
        for role in TRAINED_ROLES:
            if self.has(role):
                self._calls[role] = partial(self.prepared, role)
        self.generation_weights = GenerationWeights(
            engine.accelerator, self.prepared, part="policy"
        )
        return trained

    def trained_module(self, role: str, accelerator: Any) -> Any:
        """The module behind the prepared wrapper that trains `role` (policy or critic)."""
        return getattr(accelerator.unwrap_model(self.prepared), role)

    # ------------------------------------------------------------------ asked by role

    def logprobs(
        self, role: str, batch: dict[str, torch.Tensor], temperature: float = 1.0
    ) -> torch.Tensor:
        """(B, T) log-probs of the response tokens under `role` at `temperature`."""
        return self.logprobs_and_entropy(role, batch, temperature, "none")[0]

    def logprobs_and_entropy(self, role: str, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                             entropy: str = "value") -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """(B, T) log-probs and entropies (`entropy`: "value" without gradient, "grad" with,
        "none") of the response tokens under `role` (the update's entropy)."""
        if role not in LOGPROB_ROLES or not self.has(role):
            raise ValueError(f"no log-probs for role {role!r} in this run")
        return policy_logprobs(self._calls[role], batch, temperature, self.passes, entropy)

    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) critic values V(s_h), read at the position that predicts response token h."""
        return critic_values(self._calls["critic"], batch["prompt_ids"], batch["prompt_mask"],
                             batch["response_ids"], batch["response_mask"])  # fmt: skip

    def score(self, batch: dict[str, torch.Tensor], prompts: list[Any] | None = None,
              responses: list[str] | None = None) -> torch.Tensor:  # fmt: skip
        """(B,) raw reward-model scores; `prompts` (as the rows held them) and `responses`
        (decoded) are read when the reward model has its own tokenizer."""
        return self.reward_model.score(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                       batch["response_mask"], prompts, responses)  # fmt: skip


class SeparateModels(Roles):
    """One model per role (the reward model wrapped in `models.reward_model.RewardModel`). The
    policy and the critic are `Trainable`s (full models, or adapters on their own copies of
    their bases), saved as such; a plain model given for either is trained whole."""

    layout = "separate models"

    def __init__(self, *, policy: Trainable | Any, ref: Any, dpo: Any | None = None,
                 critic: Trainable | Any | None = None, reward_model: Any | None = None,
                 passes: Layout = PADDED):  # fmt: skip
        self._trainables = {
            role: model if isinstance(model, Trainable) else Trainable(model)
            for role, model in (("policy", policy), ("critic", critic))
            if model is not None
        }
        modules = {role: t.model for role, t in self._trainables.items()}
        super().__init__(policy=modules["policy"], ref=ref, dpo=dpo, critic=modules.get("critic"),
                         reward_model=reward_model, passes=passes)  # fmt: skip

    def describe(self) -> str:
        return "separate models, one per role"

    def trained_parameters(self) -> tuple[list[Any], list[Any]]:
        return tuple(  # type: ignore[return-value]
            [] if m is None else [p for p in m.parameters() if p.requires_grad]
            for m in (self.policy, self.critic)
        )

    def save(self, role: str, out: str | Path, tokenizer: Any, accelerator: Any, lora: Any) -> None:
        self._trainables[role].save(self.prepared, tokenizer, out, accelerator, lora, part=role)
