"""`rto sft`: supervised fine-tuning of a causal LM.

Loss: cross-entropy on the response tokens ({prompt, completion} and {messages} rows; all tokens
for {text} rows, or everywhere with completion_only_loss=false), a mean over every target token of
the optimiser step's global batch.
Summary: held-out perplexity next to the unigram perplexity of the same tokens (a model that
ignores context), and, when held-out prompts are given, the gold reward and fluency of sampled
responses.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from rto.config.stages import SFTConfig
from rto.data.sources import load_train_eval
from rto.data.tokenize import IGNORE, build_sft, collate_sft
from rto.engine.run import RunFolder
from rto.engine.trainer import Engine
from rto.evaluation.sampled import load_eval_inputs, report_samples
from rto.models.forward import Layout, Runner, run_op, token_logprobs
from rto.models.load import load_tokenizer
from rto.models.trainable import load_trainable_lm


def token_nll(
    model: Any, batch: dict[str, torch.Tensor], passes: Layout
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, number of target tokens) of the labelled tokens (labels aligned with the
    ids: a token is predicted from the one before it); `passes` lays out the forward pass."""
    targets = batch["labels"] != IGNORE
    logp, _ = run_op(
        model, token_logprobs, batch["input_ids"], batch["attention_mask"], targets, passes
    )
    return -logp.sum(), targets[:, 1:].sum()


class SFTObjective:
    """Cross-entropy summed over a micro-batch's target tokens; the engine divides by the target
    tokens of the whole optimiser step, so the loss is the token mean over the global batch."""

    unit = "tokens"

    def __init__(self, passes: Layout):
        self.passes = passes

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def __call__(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return token_nll(model, batch, self.passes)[0], {}


@torch.no_grad()
def held_out_perplexity(model: Any, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                        device: Any, passes: Layout) -> dict[str, float]:  # fmt: skip
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {
            k: v.to(device) for k, v in collate_sft(examples[i : i + batch_size], pad_id).items()
        }
        nll, n = token_nll(model, batch, passes)
        total += float(nll)
        count += int(n)
    model.train()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def unigram_perplexity(
    train: list[dict[str, Any]], held_out: list[dict[str, Any]], vocab_size: int
) -> float:
    """Perplexity of the held-out target tokens under add-one smoothed training token frequencies."""
    counts = Counter(t for e in train for t in e["labels"] if t != IGNORE)
    total = sum(counts.values()) + vocab_size
    nll, n = 0.0, 0
    for e in held_out:
        for t in e["labels"]:
            if t != IGNORE:
                nll -= math.log((counts.get(t, 0) + 1) / total)
                n += 1
    return math.exp(nll / max(n, 1))


def run(cfg: SFTConfig, folder: RunFolder) -> dict[str, Any]:
    """Run the stage into `folder` (checked by the caller, not yet begun: the folder changes at
    engine.begin())."""
    engine = Engine.for_stage(cfg, folder, progress_keys=("loss", "lr"))
    tokenizer = load_tokenizer(cfg.model)
    source = cfg.model.tokenizer or cfg.model.path
    eval_prompts = load_eval_inputs(cfg, tokenizer, source)  # checked now, used after training

    train_rows, eval_rows = load_train_eval(cfg.data, cfg.seed)
    build = dict(
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        completion_only=cfg.completion_only_loss,
        source=source,
        chat_prompts=cfg.data.chat_prompts,
    )
    train, train_report = build_sft(train_rows, tokenizer, **build)
    engine.say("[rto] " + train_report.describe())
    held_out, eval_report = [], None
    if eval_rows is not None:
        held_out, eval_report = build_sft(eval_rows, tokenizer, **build)
        engine.say("[rto] held-out " + eval_report.describe())

    engine.steps_per_epoch(
        len(train)
    )  # too little data for one batch: say so before loading models
    trainable = load_trainable_lm(cfg.model, cfg.lora, keep_dropout=cfg.keep_dropout)
    pad_id = tokenizer.pad_token_id
    passes = Layout.of(cfg.model)
    evaluate = None
    if held_out:

        def evaluate(m: Any) -> dict[str, float]:
            return held_out_perplexity(
                m, held_out, pad_id, cfg.train.micro_batch_size * 4, engine.device, passes
            )

    out = engine.begin()
    model, final = engine.fit(
        Runner(trainable.model),  # trained through ops (models/forward.run_op)
        train,
        lambda ex: collate_sft(ex, pad_id),
        SFTObjective(passes),
        resume=cfg.resume,
        evaluate=evaluate,
    )
    trainable.save(model, tokenizer, out, engine.accelerator, cfg.lora, part="model")

    summary: dict[str, Any] = {"stage": "sft", **final, "data": {"train": train_report.to_dict()}}
    if eval_report is not None:
        summary["data"]["eval"] = eval_report.to_dict()
        summary["eval/unigram_perplexity"] = unigram_perplexity(train, held_out, len(tokenizer))
    summary.update(report_samples(cfg, engine, model, tokenizer, source, eval_prompts))
    engine.finish(summary)
    return summary
