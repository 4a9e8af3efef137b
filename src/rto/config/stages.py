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


# --------------------------------------------------------------------------- pairs


@dataclass
class PairsConfig:
    out: str = _out()
    seed: int = _seed()
    overwrite: bool = _overwrite()
    gold_reward: str = option("", "Gold reward that judges responses: a registered name (sentiment) or module:function (required).")
    num_samples: int = option(2, "Responses sampled per prompt (k).", min=2)
    pairing: str = option(
        "best_worst", "Which pairs of the k responses to label (k > 2): best_worst by gold reward, random, or all.",
        choices=["best_worst", "random", "all"],
    )
    annotator: str = option(
        "bradley_terry", "bradley_terry: P(a preferred) = sigmoid((g_a - g_b) / temperature), noisy like people; "
        "deterministic: the higher gold reward wins.", choices=["bradley_terry", "deterministic"],
    )
    temperature: float = option(0.1, "Bradley-Terry annotator temperature (higher = noisier labels).", min=0.0, min_exclusive=True)
    ties: str = option("skip", "Equal gold rewards under the deterministic annotator: skip the pair or pick at random.", choices=["skip", "random"])
    drop_truncated: bool = option(True, "Skip pairs where a response hit max_new_tokens without EOS (not a finished text).")
    model: ModelSection = section(ModelSection, "The policy that samples responses (usually the SFT model).")
    data: DataSection = section(DataSection, "Prompt rows {prompt}.", eval_fraction=0.1)
    generate: GenerateSection = section(GenerateSection, "Sampling.")
    log: LogSection = section(LogSection, "Logging.")

    def check(self) -> None:
        _require(self.out, "out", "the folder to write the preference data to")
        _require(self.model.path, "model.path", "the policy that samples responses")
        _require(self.data.path, "data.path", "the prompts (rows {prompt})")
        _require(self.gold_reward, "gold_reward", "a registered gold reward (sentiment) or module:function")


# --------------------------------------------------------------------------- reward model


@dataclass
class RMConfig:
    out: str = _out()
    seed: int = _seed()
    resume: bool = _resume()
    overwrite: bool = _overwrite()
    margin_column: str | None = option(None, "Column with a per-pair margin m: loss = -log sigmoid(r_w - r_l - m).")
    gold_columns: list[str] = option(
        ["chosen_gold", "rejected_gold"],
        "Columns with gold scores of chosen and rejected (from `rto pairs`); when present, the accuracy of the gold "
        "reward on the same held-out pairs is reported as the ceiling.",
    )
    model: ModelSection = section(ModelSection, "Initialisation: a causal LM (new score head) or a reward model.")
    data: DataSection = section(DataSection, "Preference rows {prompt, chosen, rejected}.")
    train: TrainSection = section(TrainSection, "Optimisation (paper: lr 1e-6, batch 128).", lr=1e-6, batch_size=128, micro_batch_size=8)
    log: LogSection = section(LogSection, "Logging.")

    def check(self) -> None:
        _require(self.out, "out", "the folder to write the reward model to")
        _require(self.model.path, "model.path", "the model to start from (a causal LM or a reward model)")
        _require(self.data.path, "data.path", "the preference data")
        if len(self.gold_columns) not in (0, 2):
            raise ConfigError("config key 'gold_columns' takes two column names (chosen, rejected) or none")


# --------------------------------------------------------------------------- DPO family


@dataclass
class DPOConfig:
    out: str = _out()
    seed: int = _seed()
    resume: bool = _resume()
    overwrite: bool = _overwrite()
    loss: str = option("dpo", "Preference loss.", choices=["dpo", "ipo", "rdpo", "simpo", "tdpo"])
    beta: float | None = option(
        None, "beta; default per loss from the paper: dpo/ipo/rdpo/tdpo 0.1, simpo 2.5.", min=0.0, min_exclusive=True,
        paper="beta 0.1",
    )
    alpha: float | None = option(None, "R-DPO length weight (default 0.001) or TDPO KL weight (default 0.2).", min=0.0)
    simpo_gamma: float = option(0.5, "SimPO target margin gamma.", min=0.0, paper="SimPO gamma 0.5")
    ref_model: str | None = option(None, "Reference model (default: model.path, the SFT model).")
    precompute_ref_logps: bool = option(
        False, "Score the data with the reference once before training, then free it (saves memory; not for tdpo)."
    )
    gold_columns: list[str] = option(
        ["chosen_gold", "rejected_gold"], "Gold score columns; when present the gold ceiling accuracy is reported."
    )
    model: ModelSection = section(ModelSection, "The policy to train (usually the SFT model).")
    data: DataSection = section(DataSection, "Preference rows {prompt, chosen, rejected}.")
    train: TrainSection = section(TrainSection, "Optimisation (paper: lr 5e-7, batch 256).", lr=5e-7, batch_size=256, micro_batch_size=8)
    generate: GenerateSection = section(GenerateSection, "Sampling for the held-out metrics.")
    eval: EvalSection = section(EvalSection, "Held-out prompts and judges for sampled metrics.")
    log: LogSection = section(LogSection, "Logging.")

    def check(self) -> None:
        _require(self.out, "out", "the folder to write the trained policy to")
        _require(self.model.path, "model.path", "the policy to start from (usually the SFT model)")
        _require(self.data.path, "data.path", "the preference data")
        if self.precompute_ref_logps and self.loss == "tdpo":
            raise ConfigError("config key 'precompute_ref_logps' cannot be used with loss 'tdpo', which needs the reference's full distributions")

    @property
    def resolved_beta(self) -> float:
        from rto.preference.losses import DEFAULT_BETA

        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]

    @property
    def resolved_alpha(self) -> float:
        from rto.preference.losses import DEFAULT_ALPHA

        return self.alpha if self.alpha is not None else DEFAULT_ALPHA.get(self.loss, 0.0)
