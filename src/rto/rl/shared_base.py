"""The shared-base layout of the RL roles: one frozen base in memory serves all five.

    policy        base + "policy" adapter (trained)
    reference     base with every adapter off (the SFT model is the base)
    DPO model     base + "dpo" adapter (frozen; the adapter `rto dpo --lora.r` wrote; trained
                  only inside the online token-reward model's update, `prepare_dpo`)
    reward model  base + "reward" adapter (frozen) read through its score head
    critic        base + "critic" adapter (trained) read through a value head (trained)

The adapters take turns on the base (`models.lora.SharedAdapters`); the heads are small
separate modules reading the backbone's last hidden state. `SharedBase` answers the same
questions as `roles.SeparateModels` (callables stand in for the frozen models), so rewards,
scoring and the update do not change with the layout, and saves a trained role as an adapter
folder on the shared base.

Prepared by accelerate as `ActorCritic(policy, critic)`: the policy module holds the base and
every adapter, the critic module only its value head (it borrows the policy's base without
registering it), so DDP and the checkpoints see the base once; only the trained adapters and
the value head require gradients, and the frozen ones stay out of checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rto.engine.optimise import Optimised
from rto.errors import ModelError
from rto.models import lora
from rto.models.forward import PADDED, Layout, backbone_of, head_scores
from rto.models.load import load_causal_lm
from rto.models.lora import SharedAdapters
from rto.models.reward_model import RewardModel
from rto.models.trainable import frozen_base
from rto.rl.roles import ONLINE_MODULE, Roles


class AdapterRole:
    """A frozen causal-LM role of the shared base (reference: adapter None; DPO model), which
    runs an op (models/forward.run_op) with its adapter active; no_grad is the caller's."""

    def __init__(self, adapters: SharedAdapters, adapter: str | None):
        self.adapters, self.adapter = adapters, adapter

    def __call__(self, op: Any, *args: Any, **kwargs: Any) -> Any:
        with self.adapters.using(self.adapter):
            return op(self.adapters.model, *args, **kwargs)


class HeadScorer(nn.Module):
    """A role of the shared base read through a score head (reward model, critic): (B, L)
    head(last hidden state with `adapter` active), like `models.forward.TokenScorer`. Only the
    head is a submodule: the base is the policy's."""

    def __init__(self, adapters: SharedAdapters, adapter: str, head: nn.Linear,
                 passes: Layout = PADDED):  # fmt: skip
        super().__init__()
        self.head = head
        self.adapter = adapter
        self.adapters = adapters  # a plain object, not a submodule
        self.passes = passes

    @property
    def config(self) -> Any:
        return self.adapters.hf.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hf = self.adapters.hf
        with self.adapters.using(self.adapter):
            return head_scores(
                backbone_of(hf), self.head, input_ids, attention_mask, self.passes, hf
            )


def new_value_head(adapters: SharedAdapters) -> nn.Linear:
    """A value head as transformers initialises a sequence classifier's score head."""
    config = adapters.hf.config
    hidden = adapters.hf.get_output_embeddings().in_features
    head = nn.Linear(hidden, 1, bias=False)
    nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    return head


class SharedBase(Roles):
    layout = "one shared base"

    def __init__(self, adapters: SharedAdapters, *, reward_model: Any | None = None,
                 critic: HeadScorer | None = None, passes: Layout = PADDED):  # fmt: skip
        has_dpo = "dpo" in adapters.trains
        super().__init__(policy=adapters.model, ref=AdapterRole(adapters, None),
                         dpo=AdapterRole(adapters, "dpo") if has_dpo else None, critic=critic,
                         reward_model=reward_model, passes=passes)  # fmt: skip
        self.adapters = adapters

    def trained_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the policy's, the critic's) trained parameters: its adapter, and the value head."""
        critic = []
        if self.critic is not None:
            critic = self.adapters.parameters("critic") + list(self.critic.head.parameters())
        return self.adapters.parameters("policy"), critic

    def describe(self) -> str:
        frozen = [n for n, trains in self.adapters.trains.items() if not trains]
        trained = [n for n, trains in self.adapters.trains.items() if trains]
        return (f"one shared base ({self.adapters.record.base_model}) with adapters "
                f"{', '.join(trained)} (trained), {', '.join(frozen) or 'none'} (frozen); "
                "reference = adapters off")  # fmt: skip

    def prepare_dpo(self, engine: Any, lr: float) -> Optimised:
        """The DPO adapter as a second trained module. It lives inside the policy's prepared
        module, which cannot be wrapped twice, so the engine averages its gradients over the
        processes itself; it trains only inside each step (`SharedAdapters.training`) and stays
        frozen outside, so DDP and the policy's checkpoints never see it train (the online
        source checkpoints it)."""
        params = self.adapters.parameters("dpo")
        return engine.optimised(None, [(params, lr)], context=lambda: self.adapters.training("dpo"),
                                **ONLINE_MODULE)  # fmt: skip

    def dpo_parameters(self) -> dict[str, Any]:
        """The DPO adapter's parameters by name."""
        ids = {id(p) for p in self.adapters.parameters("dpo")}
        return {n: p for n, p in self.adapters.model.named_parameters() if id(p) in ids}

    def save_dpo(self, out: str | Path, tokenizer: Any, accelerator: Any, lora: Any) -> None:
        """The DPO adapter as it is now, as an adapter folder on the shared base (merged into
        the base with lora.merge, as the policy)."""
        if lora.merge:
            self.adapters.save_merged("dpo", out, tokenizer, accelerator)
        else:
            self.adapters.save("dpo", out, tokenizer, accelerator)

    def save(self, role: str, out: str | Path, tokenizer: Any, accelerator: Any, lora: Any) -> None:
        """The policy's adapter (merged into the base with lora.merge), or the critic's adapter
        with its value head, as an adapter folder on the shared base."""
        if role == "policy":
            if lora.merge:
                self.adapters.save_merged("policy", out, tokenizer, accelerator)
            else:
                self.adapters.save("policy", out, tokenizer, accelerator)
            return
        if lora.merge:
            accelerator.print(f"[rto] lora.merge: the critic is saved as an adapter folder with its "
                              f"value head ({out}); merge it with peft's merge_and_unload")  # fmt: skip
        head = self.trained_module("critic", accelerator).head
        self.adapters.save("critic", out, tokenizer, accelerator, head=head)


def adapter_roles(
    cfg: Any, *, use_dpo: bool, use_rm: bool, critic_from: str | None
) -> dict[str, str]:
    """{role: folder} of the frozen models a shared base would carry as adapters: the DPO model
    and the reward model, when in use (the reward model also when the critic starts from it)."""
    use_rm = use_rm or (critic_from is not None and critic_from == cfg.reward_model)
    frozen = {"DPO model": cfg.dpo_model if use_dpo else None,
              "reward model": cfg.reward_model if use_rm else None}  # fmt: skip
    return {role: path for role, path in frozen.items() if path}


def why_not_shared(cfg: Any, frozen: dict[str, str], *, sharded: bool) -> str | None:
    """None when the run can use one shared base: a LoRA policy whose reference is its base,
    and the `frozen` roles (`adapter_roles`) given as adapter folders (whether they sit on the
    policy's base is checked when it is loaded); else why not ('' when nothing would be
    shared)."""
    if not cfg.lora.enabled or not frozen:
        return ""
    full = [f"the {role} {path} is a full model" for role, path in frozen.items()
            if not lora.is_adapter(path)]  # fmt: skip
    if full:
        return "; ".join(full)
    if cfg.ref_model and cfg.ref_model != cfg.model.path:
        return f"the reference model {cfg.ref_model} is not the policy's base {cfg.model.path}"
    if cfg.critic_model:
        return f"the critic starts from its own model {cfg.critic_model}"
    if sharded:
        return "ZeRO-3 / FSDP shard the weights (the shared base runs on one process or DDP)"
    return None


def check_on_base(role: str, folder: str, found: str | None, base_path: str) -> None:
    """The adapter in `folder` was trained on the policy's base (weights fingerprint `found`)."""
    record = lora.locate_base(folder)
    if record.fingerprint and found:
        if record.fingerprint == found:
            return
    elif os.path.abspath(record.base_model) == os.path.abspath(base_path):
        return  # an adapter from elsewhere, without rto's fingerprint: its recorded base
    raise ModelError(
        f"the {role} {folder} is a LoRA adapter on a base with weights fingerprint "
        f"{record.fingerprint} ({record.base_model}), but the policy's base {base_path} has "
        f"fingerprint {found}: with --lora.r the DPO model and the reward model share the "
        "policy's base, so they must be adapters trained on it. Train them on "
        f"{base_path}, or give them as full models (--lora.merge true, or peft's "
        "merge_and_unload) to load them separately"
    )


def load_shared_base(cfg: Any, tokenizer: Any, *, use_dpo: bool, use_rm: bool,
                     critic_from: str | None, device: Any) -> SharedBase:  # fmt: skip
    """The five roles on one base: the policy's (cfg.model), with a new policy adapter, the DPO
    model's and the reward model's adapters (frozen), and the critic's adapter: a trainable copy
    of the reward model's (adapter and head) when `critic_from` is the reward model, new with
    cfg.lora and a new value head when it is the policy, none when None (no critic)."""
    passes = Layout.of(cfg.model)
    base = load_causal_lm(frozen_base(cfg.model, cfg.lora), role="policy")
    found = lora.fingerprint(base)
    for role, folder in adapter_roles(cfg, use_dpo=use_dpo, use_rm=use_rm, critic_from=critic_from).items():  # fmt: skip
        check_on_base(role, folder, found, cfg.model.path)
    adapters = lora.SharedAdapters(base, cfg.model, cfg.lora)
    if use_dpo:
        adapters.load("dpo", cfg.dpo_model, trainable=False)

    def with_head(name: str, folder: str, trainable: bool) -> nn.Linear:
        head = adapters.load(name, folder, trainable=trainable)
        if head is None:
            raise ModelError(
                f"the reward model {folder} is a LoRA adapter without a score head "
                "(lora_base.json score_head false): give the adapter folder `rto rm` wrote"
            )
        return head

    reward_model = None
    if use_rm:
        head = with_head("reward", cfg.reward_model, False)
        scorer = HeadScorer(adapters, "reward", head.to(device), passes)
        reward_model = RewardModel(scorer, tokenizer, same_tokenizer=True, path=cfg.reward_model,
                                   chat_prompts=cfg.data.chat_prompts)  # fmt: skip
    critic = None
    if critic_from is not None:
        if critic_from == cfg.reward_model:
            value_head = with_head("critic", critic_from, True)
        else:
            adapters.add("critic", lora.lora_config(cfg.lora, score_head=False), trainable=True)
            value_head = new_value_head(adapters)
        critic = HeadScorer(adapters, "critic", value_head.float().requires_grad_(True), passes)
    return SharedBase(adapters, reward_model=reward_model, critic=critic, passes=passes)
