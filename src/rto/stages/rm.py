"""`rto rm`: a sentence-level Bradley-Terry reward model (r_MLE in the paper).

    loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m)          (m = optional per-pair margin)

averaged over the pairs of each optimiser step's global batch.

r is a sequence-classification model with one output, read at the last real token of prompt +
response whatever the padding side. Saved in Hugging Face format with `reward_stats.json`: the
mean and standard deviation of its scores on the training responses, which the RL stage uses to
normalise the score.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F

from rto.config.stages import RMConfig
from rto.data.sources import load_train_eval
from rto.data.tokenize import build_pairs, collate_pairs
from rto.engine.run import RunFolder
from rto.engine.trainer import Engine
from rto.evaluation.preference import add_held_out_accuracy
from rto.files import write_json
from rto.models.forward import sequence_scores
from rto.models.load import load_tokenizer
from rto.models.trainable import load_trainable_scorer

STATS_FILE = "reward_stats.json"


def collate(
    examples: list[dict[str, Any]], pad_id: int, margin_column: str | None
) -> dict[str, torch.Tensor]:
    batch = collate_pairs(examples, pad_id)
    if margin_column:
        batch["margin"] = torch.tensor([float(e.get(margin_column, 0.0)) for e in examples])
    return batch


def pair_scores(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


class BradleyTerryObjective:
    """-log sigmoid(r_w - r_l - m) summed over a micro-batch's pairs; the engine divides by the
    pairs of the whole optimiser step, so the loss (and accuracy, margin) is the pair mean over
    the global batch."""

    unit = "pairs"

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def __call__(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r_w, r_l = pair_scores(model, batch)
        margin = batch.get("margin", torch.zeros_like(r_w))
        loss = -F.logsigmoid(r_w - r_l - margin).sum()
        return loss, {
            "accuracy": (r_w > r_l).float().sum(),
            "margin": (r_w - r_l).detach().sum(),
        }


@torch.no_grad()
def score_pairs(
    model: Any, examples: list[dict[str, Any]], pad_id: int, batch_size: int, device: Any
) -> tuple[list[float], list[float]]:
    model.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    for i in range(0, len(examples), batch_size):
        batch = {
            k: v.to(device) for k, v in collate_pairs(examples[i : i + batch_size], pad_id).items()
        }
        r_w, r_l = pair_scores(model, batch)
        chosen += r_w.tolist()
        rejected += r_l.tolist()
    model.train()
    return chosen, rejected


def run(cfg: RMConfig, folder: RunFolder) -> dict[str, Any]:
    """Run the stage into `folder` (checked by the caller, not yet begun: the folder changes at
    engine.begin())."""
    engine = Engine.for_stage(cfg, folder, progress_keys=("loss", "accuracy"))
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows = load_train_eval(cfg.data, cfg.seed)
    keep = tuple(c for c in [cfg.margin_column, *cfg.gold_columns] if c)
    build = dict(
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        source=cfg.model.path,
        keep=keep,
        chat_prompts=cfg.data.chat_prompts,
    )
    train, train_report = build_pairs(train_rows, tokenizer, **build)
    engine.say("[rto] " + train_report.describe())
    held_out, eval_report = (
        ([], None) if eval_rows is None else build_pairs(eval_rows, tokenizer, **build)
    )
    if eval_report:
        engine.say("[rto] held-out " + eval_report.describe())

    engine.steps_per_epoch(
        len(train)
    )  # too little data for one batch: say so before loading models
    trainable = load_trainable_scorer(cfg.model, cfg.lora, cfg.model.path, require_head=False,
                                      role="reward model", pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    pad_id = tokenizer.pad_token_id
    eval_bs = cfg.train.micro_batch_size * 4

    def evaluate(m: Any) -> dict[str, float]:
        c, r = score_pairs(m, held_out, pad_id, eval_bs, engine.device)
        return {"accuracy": statistics.fmean(float(a > b) for a, b in zip(c, r)),
                "margin": statistics.fmean(a - b for a, b in zip(c, r))}  # fmt: skip

    out = engine.begin()
    model, final = engine.fit(
        trainable.model, train, lambda ex: collate(ex, pad_id, cfg.margin_column), BradleyTerryObjective(),
        resume=cfg.resume, evaluate=evaluate if held_out else None,
    )  # fmt: skip
    c, r = score_pairs(model, train, pad_id, eval_bs, engine.device)
    scores = c + r
    stats = {
        "mean": statistics.fmean(scores),
        "std": statistics.pstdev(scores) or 1.0,
        "n": len(scores),
    }
    trainable.save(model, tokenizer, out, engine.accelerator, cfg.lora)
    summary: dict[str, Any] = {
        "stage": "rm",
        **final,
        "reward_stats": stats,
        "data": {"train": train_report.to_dict()},
    }
    if engine.is_main:
        write_json(out / STATS_FILE, stats)
    if eval_report is not None:
        summary["data"]["eval"] = eval_report.to_dict()
        add_held_out_accuracy(
            summary, engine, held_out, list(cfg.gold_columns), "reward model", "eval/accuracy"
        )
    engine.finish(summary)
    return summary
