"""One config per stage. Each field's help becomes `rto <stage> --help`.

Defaults follow the RTO paper (../docs/paper.md summarises it) where the paper gives a value;
the built-in task's demo config overrides the learning rates and sizes for its tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass

from rto.config.core import option, section
from rto.config.sections import (
    DataSection,
    EvalSection,
    GenerateSection,
    LogSection,
    ModelSection,
    TrainSection,
)
from rto.errors import ConfigError


def _out() -> str:
    return option("", "Output folder: model, tokenizer, config.yaml, metrics.jsonl, summary.json, checkpoints (required).")


def _resume() -> bool:
    return option(False, "Continue an interrupted run from the last checkpoint in `out`.")


def _overwrite() -> bool:
    return option(False, "Start over even though `out` already holds a run (its files are replaced).")


def _seed() -> int:
    return option(0, "Random seed (data order, initialisation, sampling).", min=0)


def _require(value: str | None, key: str, what: str) -> None:
    if not value:
        raise ConfigError(f"config key '{key}' is required: {what}")


# --------------------------------------------------------------------------- task


@dataclass
class SentimentTaskConfig:
    out: str = _out()
    seed: int = _seed()
    num_sft: int = option(6000, "Texts in the SFT training set.", min=10)
    num_sft_eval: int = option(400, "Texts in the held-out SFT set.", min=10)
    num_train_prompts: int = option(4000, "Prompts for preference data and RL.", min=10)
    num_eval_prompts: int = option(400, "Held-out prompts for evaluation.", min=10)
    vocab_size: int = option(512, "Size of the BPE tokenizer's vocabulary.", min=300)
    hidden_size: int = option(128, "Hidden size of the tiny Llama-style base model.", min=8)
    num_layers: int = option(3, "Transformer layers of the base model.", min=1)
    num_heads: int = option(4, "Attention heads of the base model.", min=1)
    max_positions: int = option(128, "Longest sequence the base model handles.", min=32)
    overwrite: bool = _overwrite()

    def check(self) -> None:
        _require(self.out, "out", "the folder to write the task's data and base model to")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"config key 'hidden_size' ({self.hidden_size}) must be divisible by 'num_heads' ({self.num_heads})"
            )


# --------------------------------------------------------------------------- sft


@dataclass
class SFTConfig:
    out: str = _out()
    seed: int = _seed()
    resume: bool = _resume()
    overwrite: bool = _overwrite()
    completion_only_loss: bool = option(
        True, "Loss on response tokens only for {prompt, completion} and {messages} rows."
    )
    model: ModelSection = section(ModelSection, "The model to fine-tune.")
    data: DataSection = section(DataSection, "SFT rows: {text}, {prompt, completion} or {messages}.")
    train: TrainSection = section(TrainSection, "Optimisation.", lr=2e-5, batch_size=64, micro_batch_size=8)
    generate: GenerateSection = section(GenerateSection, "Sampling for the held-out metrics.")
    eval: EvalSection = section(EvalSection, "Held-out prompts and judges for sampled metrics.")
    log: LogSection = section(LogSection, "Logging.")

    def check(self) -> None:
        _require(self.out, "out", "the folder to write the fine-tuned model to")
        _require(self.model.path, "model.path", "the model to fine-tune (hub id or folder)")
        _require(self.data.path, "data.path", "the SFT data (hub id, folder or files)")
