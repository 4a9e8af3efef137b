"""`rto dpo`: the direct preference family (DPO, IPO, R-DPO, SimPO, TDPO), one loss per config
value (`loss`); the formulas live in rto.preference.losses.

The trained policy is both a baseline and, for RTO, pi_dpo: its log-ratio against the reference
is the token reward (rto.preference.token_reward). Metrics follow the field's names:
rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.
"""

from __future__ import annotations

from typing import Any

import torch

from rto.config.stages import DPOConfig
from rto.data.sources import load_train_eval
from rto.data.tokenize import build_pairs, collate_pairs
from rto.engine.run import RunFolder
from rto.engine.trainer import Engine
from rto.evaluation.preference import add_held_out_accuracy
from rto.evaluation.sampled import load_eval_inputs, report_samples
from rto.files import write_json
from rto.models import lora
from rto.models.forward import (
    Layout,
    Runner,
    causal_logits,
    gather_logprobs,
    hf_of,
    run_op,
    token_logprobs,
)
from rto.models.load import check_same_tokenizer, load_causal_lm, load_tokenizer
from rto.models.trainable import load_trainable_lm
from rto.preference.losses import REFERENCE_FREE, PairStats, preference_loss, sequential_kl

INFO_FILE = "dpo.json"


def sequence_logps(model: Any, batch: dict[str, torch.Tensor], passes: Layout,
                   with_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(summed response log-probs (2B,), response lengths (2B,), and with `with_logits` the
    (2B, L-1, V) logits of every position, else None). TDPO's sequential KL reads both models'
    whole distributions, so it asks for the logits: those come from the padded full-logit pass."""
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    lengths = mask[:, 1:].float().sum(-1)
    if with_logits:
        logits = run_op(model, _all_logits, ids, attention)
        logps = gather_logprobs(logits, ids[:, 1:]) * mask[:, 1:].float()
        return logps.sum(-1), lengths, logits
    logps, _ = run_op(model, token_logprobs, ids, attention, mask, passes)
    return logps.sum(-1), lengths, None


def _all_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """An op: (B, L-1, V) logits predicting every next token."""
    return causal_logits(hf_of(model), input_ids, attention_mask)[:, :-1]


class PreferenceObjective:
    """The loss of one DPO-family method over a collated pair batch (chosen rows, then rejected),
    summed over pairs; the engine divides by the pairs of the whole optimiser step, so the loss
    and every metric is the pair mean over the global batch, as in the papers."""

    unit = "pairs"

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def __init__(self, cfg: DPOConfig, ref: Any | None):
        self.kind = cfg.loss
        self.beta = cfg.resolved_beta
        self.alpha = cfg.resolved_alpha
        self.gamma = cfg.resolved_gamma
        self.ref = ref
        self.passes = Layout.of(cfg.model)

    def stats(self, model: Any, batch: dict[str, torch.Tensor]) -> PairStats:
        tdpo = self.kind == "tdpo"
        pi, n, logits = sequence_logps(model, batch, self.passes, with_logits=tdpo)
        half = pi.shape[0] // 2
        s = PairStats(
            pi_w=pi[:half], pi_l=pi[half:], n_w=n[:half].clamp(min=1), n_l=n[half:].clamp(min=1)
        )
        if self.kind in REFERENCE_FREE:
            return s
        if "ref_chosen_logps" in batch:
            s.ref_w, s.ref_l = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            return s
        with torch.no_grad():
            ref_pi, _, ref_logits = sequence_logps(self.ref, batch, self.passes, with_logits=tdpo)
        s.ref_w, s.ref_l = ref_pi[:half], ref_pi[half:]
        if tdpo:
            kl = sequential_kl(logits, ref_logits, batch["response_mask"][:, 1:].float())
            s.kl_w, s.kl_l = kl[:half], kl[half:]
        return s

    def __call__(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.stats(model, batch)
        losses, r_w, r_l = preference_loss(
            self.kind, s, beta=self.beta, alpha=self.alpha, gamma=self.gamma
        )
        return losses.sum(), {
            "rewards/chosen": r_w.sum(),
            "rewards/rejected": r_l.sum(),
            "rewards/accuracies": (r_w > r_l).float().sum(),
            "rewards/margins": (r_w - r_l).sum(),
            "logps/chosen": s.pi_w.detach().sum(),
            "logps/rejected": s.pi_l.detach().sum(),
        }


@torch.no_grad()
def precompute_reference(ref: Any, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                         device: Any, passes: Layout) -> None:  # fmt: skip
    """Store the reference's summed log-probs in each example, so training needs no reference."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        pi, _, _ = sequence_logps(ref, batch, passes)
        half = len(chunk)
        for e, w, l_ in zip(chunk, pi[:half].tolist(), pi[half:].tolist()):
            e["ref_chosen_logps"], e["ref_rejected_logps"] = w, l_


def ready_reference(
    cfg: DPOConfig, ref: Any, examples: list[dict[str, Any]], pad_id: int, bs: int, engine: Engine
) -> Any | None:
    """The reference for training: itself, or None once its log-probs are stored in `examples`
    (precompute_ref_logps)."""
    if not cfg.precompute_ref_logps:
        return ref
    precompute_reference(ref, examples, pad_id, bs, engine.device, Layout.of(cfg.model))
    engine.say("[rto] reference log-probs precomputed; training needs no reference pass")
    return None


@torch.no_grad()
def held_out(
    objective: PreferenceObjective,
    model: Any,
    examples: list[dict[str, Any]],
    pad_id: int,
    bs: int,
    device: Any,
) -> dict[str, float]:
    model.eval()
    totals: dict[str, float] = {}
    for i in range(0, len(examples), bs):
        batch = {k: v.to(device) for k, v in collate_pairs(examples[i : i + bs], pad_id).items()}
        loss, metrics = objective(model, batch)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    model.train()
    return {k: v / len(examples) for k, v in totals.items()}


def run(cfg: DPOConfig, folder: RunFolder) -> dict[str, Any]:
    """Run the stage into `folder` (checked by the caller, not yet begun: the folder changes at
    engine.begin())."""
    engine = Engine.for_stage(
        cfg, folder, progress_keys=("loss", "rewards/accuracies", "rewards/margins")
    )
    tokenizer = load_tokenizer(cfg.model)
    eval_prompts = load_eval_inputs(cfg, tokenizer, cfg.model.path)  # used after training
    ref_path = cfg.ref_model or cfg.model.path
    if ref_path != cfg.model.path:
        check_same_tokenizer(
            tokenizer,
            "policy",
            load_tokenizer(cfg.model, ref_path, "reference model"),
            "reference model",
        )
    train_rows, eval_rows = load_train_eval(cfg.data, cfg.seed)
    build = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length, source=cfg.model.path,
                 keep=tuple(cfg.gold_columns), chat_prompts=cfg.data.chat_prompts)  # fmt: skip
    train, train_report = build_pairs(train_rows, tokenizer, **build)
    engine.say("[rto] " + train_report.describe())
    evals, eval_report = (
        ([], None) if eval_rows is None else build_pairs(eval_rows, tokenizer, **build)
    )

    engine.steps_per_epoch(
        len(train)
    )  # too little data for one batch: say so before loading models
    pad_id = tokenizer.pad_token_id
    bs = cfg.train.micro_batch_size * 2
    # A LoRA policy trained from the reference holds it already: its base, adapter off.
    ref_is_base = cfg.lora.enabled and ref_path == cfg.model.path
    ref = None
    if cfg.loss not in REFERENCE_FREE and not ref_is_base:
        ref = load_causal_lm(cfg.model, path=ref_path, trainable=False, role="reference model")
        ref = ready_reference(cfg, ref.to(engine.device), train + evals, pad_id, bs, engine)
    trainable = load_trainable_lm(cfg.model, cfg.lora, role="policy")
    policy = trainable.model
    if cfg.loss not in REFERENCE_FREE and ref_is_base:
        ref = lora.AdapterOff(policy.to(engine.device))
        ref = ready_reference(cfg, ref, train + evals, pad_id, bs, engine)
    objective = PreferenceObjective(cfg, ref)

    def evaluate(m: Any) -> dict[str, float]:
        return held_out(objective, m, evals, pad_id, bs, engine.device)

    out = engine.begin()
    policy, final = engine.fit(
        Runner(policy),
        train,
        lambda ex: collate_pairs(ex, pad_id),
        objective,
        resume=cfg.resume,
        evaluate=evaluate if evals else None,
    )  # fmt: skip  (trained through ops: models/forward.run_op)
    trainable.save(policy, tokenizer, out, engine.accelerator, cfg.lora, part="model")
    info = {
        "loss": cfg.loss,
        "beta": objective.beta,
        "alpha": objective.alpha,
        "simpo_gamma": objective.gamma,
        "ref_model": ref_path,
        "reference": "the policy's base (LoRA adapter off)" if ref_is_base else "separate model",
    }
    summary: dict[str, Any] = {
        "stage": "dpo",
        **info,
        **final,
        "data": {"train": train_report.to_dict()},
    }
    if eval_report is not None:
        summary["data"]["eval"] = eval_report.to_dict()
        add_held_out_accuracy(
            summary,
            engine,
            evals,
            list(cfg.gold_columns),
            f"{cfg.loss} implicit-reward",
            "eval/rewards/accuracies",
        )
    summary.update(report_samples(cfg, engine, policy, tokenizer, cfg.model.path, eval_prompts))
    if engine.is_main:
        write_json(out / INFO_FILE, info)
    engine.finish(summary)
    return summary
