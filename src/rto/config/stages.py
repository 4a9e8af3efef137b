"""One config per stage. Each field's help becomes `rto <stage> --help`.

Defaults follow the RTO paper (../docs/paper.md summarises it) where the paper gives a value;
the built-in task's demo config overrides the learning rates and sizes for its tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rto.config.core import option, section
from rto.config.rl import PRESETS, RLSection
from rto.config.sections import (
    DataSection,
    EvalSection,
    GenerateSection,
    LoadingSection,
    LogSection,
    LoraSection,
    ModelSection,
    PairsDataSection,
    ProgressSection,
    PromptDataSection,
    PromptRenderingSection,
    SamplingModelSection,
    TrainSection,
)
from rto.errors import ConfigError


def _out() -> str:
    return option(
        "",
        "Output folder: model, tokenizer, config.yaml, metrics.jsonl, summary.json, checkpoints (required).",
    )


def _resume() -> bool:
    return option(False, "Continue an interrupted run from the last checkpoint in `out`.")


def _overwrite() -> bool:
    return option(
        False, "Start over even though `out` already holds a run (its files are replaced)."
    )


def _push() -> str | None:
    return option(
        None,
        "After the run finishes, upload the output folder (not its checkpoints) to this hub repo id, "
        "e.g. me/my-rto-policy (needs `huggingface-cli login`).",
    )


def _seed() -> int:
    return option(0, "Random seed (data order, initialisation, sampling).", min=0)


def _require(value: str | None, key: str, what: str) -> None:
    if not value:
        raise ConfigError(f"config key '{key}' is required: {what}")


def _lora(help: str) -> LoraSection:
    return section(LoraSection, help)


def _no_lora_dropout(lora: LoraSection, stage: str) -> None:
    """Every role of the preference and RL stages runs without dropout (a model compared with
    itself must give the same numbers), the adapters' included."""
    if lora.enabled and lora.dropout > 0:
        raise ConfigError(
            f"config key 'lora.dropout' ({lora.dropout}) must be 0 in `rto {stage}`: every model "
            "of the preference and RL stages runs without dropout (DPO's chosen and rejected "
            "passes, the PPO ratio and the KL compare a model with itself)"
        )


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
    review_length: str = option(
        "short",
        "Sentences per review: short (1-3, responses of about 14 tokens), medium (3-6, about 37) or "
        "long (8-12, about 90); same grammar, gold reward and fluency rules (fluency judges "
        "sentiment, sentiment_medium, sentiment_long).",
        choices=["short", "medium", "long"],
    )
    max_positions: int | None = option(
        None,
        "Longest sequence the base model handles (null = 128, 160 or 256 for short, medium or "
        "long reviews).",
        min=32,
    )
    arch: str = option(
        "llama",
        "Architecture of the base model: llama (no dropout), gpt2 (dropout 0.1), qwen2.",
        choices=["llama", "gpt2", "qwen2"],
    )
    dropout: float | None = option(
        None,
        "Dropout probability of the base model (null = the architecture's default: gpt2 0.1, else 0).",
        min=0.0,
        max=0.9,
    )
    chat_template: str = option(
        "none",
        "Chat template of the tokenizer: none (a base model), simple, chatml (Qwen / SmolLM2 style, "
        "text after <|im_end|>) or llama3 (turns end with <|eot_id|>, EOS <|end_of_text|>).",
        choices=["none", "simple", "chatml", "llama3"],
    )
    overwrite: bool = _overwrite()

    POSITIONS: ClassVar[dict[str, int]] = {"short": 128, "medium": 160, "long": 256}

    def check(self) -> None:
        _require(self.out, "out", "the folder to write the task's data and base model to")
        if self.max_positions is None:
            self.max_positions = self.POSITIONS[self.review_length]
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
    push_to_hub: str | None = _push()
    completion_only_loss: bool = option(
        True, "Loss on response tokens only for {prompt, completion} and {messages} rows."
    )
    keep_dropout: bool = option(
        False,
        "Train with the model's own dropout. Off by default, as in every other stage, where "
        "dropout is always off (the RLHF stages compare a model with itself).",
    )
    model: ModelSection = section(ModelSection, "The model to fine-tune.")
    lora: LoraSection = _lora("LoRA adapters instead of full fine-tuning (lora.r > 0).")
    data: DataSection = section(
        DataSection, "SFT rows: {text}, {prompt, completion} or {messages}."
    )
    train: TrainSection = section(
        TrainSection, "Optimisation.", lr=2e-5, batch_size=64, micro_batch_size=8
    )
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
    gold_reward: str = option(
        "",
        "Gold reward that judges responses: a registered name (sentiment) or module:function (required).",
    )
    num_samples: int = option(2, "Responses sampled per prompt (k).", min=2)
    pairing: str = option(
        "best_worst",
        "Which pairs of the k responses to label (k > 2): best_worst by gold reward, random, or all.",
        choices=["best_worst", "random", "all"],
    )
    annotator: str = option(
        "bradley_terry",
        "bradley_terry: P(a preferred) = sigmoid((g_a - g_b) / temperature), noisy like people; "
        "deterministic: the higher gold reward wins.",
        choices=["bradley_terry", "deterministic"],
    )
    temperature: float = option(
        0.1,
        "Bradley-Terry annotator temperature (higher = noisier labels).",
        min=0.0,
        min_exclusive=True,
    )
    ties: str = option(
        "skip",
        "Equal gold rewards under the deterministic annotator: skip the pair or pick at random.",
        choices=["skip", "random"],
    )
    drop_truncated: bool = option(
        True, "Skip pairs where a response hit max_new_tokens without EOS (not a finished text)."
    )
    model: SamplingModelSection = section(
        SamplingModelSection, "The policy that samples responses (usually the SFT model)."
    )
    data: PairsDataSection = section(PairsDataSection, "Prompt rows {prompt}.", eval_fraction=0.1)
    generate: GenerateSection = section(GenerateSection, "Sampling.")
    log: ProgressSection = section(ProgressSection, "Logging.")

    def check(self) -> None:
        _require(self.out, "out", "the folder to write the preference data to")
        _require(self.model.path, "model.path", "the policy that samples responses")
        _require(self.data.path, "data.path", "the prompts (rows {prompt})")
        _require(
            self.gold_reward,
            "gold_reward",
            "a registered gold reward (sentiment) or module:function",
        )


# --------------------------------------------------------------------------- reward model


@dataclass
class RMConfig:
    out: str = _out()
    seed: int = _seed()
    resume: bool = _resume()
    overwrite: bool = _overwrite()
    push_to_hub: str | None = _push()
    margin_column: str | None = option(
        None, "Column with a per-pair margin m: loss = -log sigmoid(r_w - r_l - m)."
    )
    gold_columns: list[str] = option(
        ["chosen_gold", "rejected_gold"],
        "Columns with gold scores of chosen and rejected (from `rto pairs`); when present, the accuracy of the gold "
        "reward on the same held-out pairs is reported as the ceiling.",
    )
    model: ModelSection = section(
        ModelSection, "Initialisation: a causal LM (new score head) or a reward model."
    )
    lora: LoraSection = _lora(
        "LoRA adapters instead of full fine-tuning (lora.r > 0); the score head is trained whole."
    )
    data: DataSection = section(DataSection, "Preference rows {prompt, chosen, rejected}.")
    train: TrainSection = section(
        TrainSection,
        "Optimisation (paper: lr 1e-6, batch 128).",
        lr=1e-6,
        batch_size=128,
        micro_batch_size=8,
    )
    log: LogSection = section(LogSection, "Logging.")

    def check(self) -> None:
        _require(self.out, "out", "the folder to write the reward model to")
        _require(
            self.model.path, "model.path", "the model to start from (a causal LM or a reward model)"
        )
        _require(self.data.path, "data.path", "the preference data")
        if len(self.gold_columns) not in (0, 2):
            raise ConfigError(
                "config key 'gold_columns' takes two column names (chosen, rejected) or none"
            )
        _no_lora_dropout(self.lora, "rm")


# --------------------------------------------------------------------------- DPO family

# Paper settings (RTO paper, Table of hyperparameters): beta, alpha / gamma, per loss.
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "rdpo": 0.1, "simpo": 2.5, "tdpo": 0.1}
DEFAULT_ALPHA = {"rdpo": 0.001, "tdpo": 0.2}


@dataclass
class DPOConfig:
    out: str = _out()
    seed: int = _seed()
    resume: bool = _resume()
    overwrite: bool = _overwrite()
    push_to_hub: str | None = _push()
    loss: str = option("dpo", "Preference loss.", choices=["dpo", "ipo", "rdpo", "simpo", "tdpo"])
    beta: float | None = option(
        None,
        "beta; default per loss from the paper: dpo/ipo/rdpo/tdpo 0.1, simpo 2.5.",
        min=0.0,
        min_exclusive=True,
        paper="beta 0.1",
    )
    alpha: float | None = option(
        None, "R-DPO length weight (default 0.001) or TDPO KL weight (default 0.2).", min=0.0
    )
    simpo_gamma: float = option(
        0.5,
        "SimPO target margin gamma, as in the loss -log sigmoid(beta*(logp_w/|y_w| - logp_l/|y_l|) - gamma).",
        min=0.0,
        paper="SimPO gamma 0.5",
    )
    simpo_gamma_beta_ratio: float | None = option(
        None,
        "SimPO's margin as its own code and recipes give it, gamma / beta (e.g. 0.55); when set, "
        "gamma = ratio * beta and simpo_gamma is not used.",
        min=0.0,
    )
    ref_model: str | None = option(None, "Reference model (default: model.path, the SFT model).")
    precompute_ref_logps: bool = option(
        False,
        "Score the data with the reference once before training, then free it (saves memory; not for tdpo).",
    )
    gold_columns: list[str] = option(
        ["chosen_gold", "rejected_gold"],
        "Gold score columns; when present the gold ceiling accuracy is reported.",
    )
    model: ModelSection = section(ModelSection, "The policy to train (usually the SFT model).")
    lora: LoraSection = _lora(
        "LoRA adapters instead of full fine-tuning (lora.r > 0); with the default ref_model the "
        "reference is the policy with its adapter off, no second copy."
    )
    data: DataSection = section(DataSection, "Preference rows {prompt, chosen, rejected}.")
    train: TrainSection = section(
        TrainSection,
        "Optimisation (paper: lr 5e-7, batch 256).",
        lr=5e-7,
        batch_size=256,
        micro_batch_size=8,
    )
    generate: GenerateSection = section(GenerateSection, "Sampling for the held-out metrics.")
    eval: EvalSection = section(EvalSection, "Held-out prompts and judges for sampled metrics.")
    log: LogSection = section(LogSection, "Logging.")

    def check(self) -> None:
        _require(self.out, "out", "the folder to write the trained policy to")
        _require(self.model.path, "model.path", "the policy to start from (usually the SFT model)")
        _require(self.data.path, "data.path", "the preference data")
        if self.precompute_ref_logps and self.loss == "tdpo":
            raise ConfigError(
                "config key 'precompute_ref_logps' cannot be used with loss 'tdpo', which needs the reference's full distributions"
            )
        _no_lora_dropout(self.lora, "dpo")

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]

    @property
    def resolved_gamma(self) -> float:
        """SimPO's gamma in the loss: simpo_gamma, or simpo_gamma_beta_ratio * beta."""
        if self.simpo_gamma_beta_ratio is not None:
            return self.simpo_gamma_beta_ratio * self.resolved_beta
        return self.simpo_gamma

    @property
    def resolved_alpha(self) -> float:
        return self.alpha if self.alpha is not None else DEFAULT_ALPHA.get(self.loss, 0.0)


# --------------------------------------------------------------------------- RL (PPO / RTO and variants)


@dataclass
class RLConfig:
    PRESETS: ClassVar[dict[str, dict[str, object]]] = PRESETS

    out: str = _out()
    seed: int = _seed()
    resume: bool = _resume()
    overwrite: bool = _overwrite()
    push_to_hub: str | None = _push()
    preset: str | None = option(
        None,
        "Method preset, applied before the file and the command line: " + ", ".join(PRESETS) + ".",
        choices=list(PRESETS),
    )
    ref_model: str | None = option(
        None,
        "Reference policy pi_ref (default: model.path, the SFT model); also the DPO reward's reference.",
    )
    reward_model: str | None = option(
        None,
        "Reward model (from `rto rm`, or any sequence classifier with one output): the score on the last token, "
        "and the critic's start. With another tokenizer than the policy's, prompts and responses are "
        "re-rendered with its own tokenizer and chat template.",
    )
    reward_fn: str | None = option(
        None,
        "Sentence reward function f(prompts, responses) -> list[float], as module:function or a registered name "
        "(sentiment), added to (or instead of) the reward model's score on the last token (rl.reward_fn.coef).",
    )
    dpo_model: str | None = option(
        None,
        "DPO policy pi_dpo (from `rto dpo`, with the policy's tokenizer); needed when rl.dpo_reward.scale > 0.",
    )
    token_reward_fn: str | None = option(
        None,
        "Token reward function f(prompts, responses, tokens) as module:function: the `function` token-reward "
        "source; tokens[i] holds (text, start, end) per response token; it returns per response a reward per "
        "token or (start, end, reward) character spans (rl.token_reward_fn.*).",
    )
    critic_model: str | None = option(
        None,
        "Start the critic from this model (a causal LM gets a new value head), instead of rl.critic_init's; "
        "it must use the policy's tokenizer.",
    )
    save_critic: bool = option(False, "Also save the trained critic to OUT/critic.")
    rl: RLSection = section(RLSection, "The RL algorithm: rewards, advantages, PPO.")
    model: ModelSection = section(ModelSection, "The policy to train (usually the SFT model).")
    lora: LoraSection = _lora(
        "LoRA adapters for the trained roles, policy and critic (lora.r > 0); the critic's "
        "score head is trained whole."
    )
    data: PromptDataSection = section(PromptDataSection, "Prompt rows {prompt}.")
    train: TrainSection = section(
        TrainSection,
        "Optimisation of the actor; batch_size = responses per update (paper: 128); a step is one rollout.",
        lr=5e-7,
        batch_size=128,
        micro_batch_size=8,
    )
    generate: GenerateSection = section(
        GenerateSection,
        "Rollout sampling (paper: temperature 1, 1024 new tokens).",
        max_new_tokens=1024,
    )
    eval: EvalSection = section(
        EvalSection,
        "Held-out prompts and judges for periodic evaluation; gold_reward also logged on rollouts.",
    )
    log: LogSection = section(LogSection, "Logging.")

    def reward_sources(self) -> list[str]:
        """The rewards this run uses: token sources, then sentence rewards."""
        rl = self.rl
        used = {"dpo": rl.dpo_reward.scale > 0, "function": bool(self.token_reward_fn) and rl.token_reward_fn.scale > 0,
                "score": bool(self.reward_model) and rl.score.coef > 0, "reward_fn": bool(self.reward_fn) and rl.reward_fn.coef > 0}  # fmt: skip
        return [name for name, on in used.items() if on]

    def check(self) -> None:
        _require(self.out, "out", "the folder to write the trained policy to")
        _require(self.model.path, "model.path", "the policy to start from (usually the SFT model)")
        _require(self.data.path, "data.path", "the RL prompts (rows {prompt})")
        rl = self.rl
        if rl.dpo_reward.scale > 0 and not self.dpo_model:
            raise ConfigError(
                "config key 'dpo_model' is required when rl.dpo_reward.scale > 0 (RTO's token reward needs pi_dpo)"
            )
        if rl.score.coef > 0 and not self.reward_model and not self.reward_fn:
            raise ConfigError(
                "config key 'reward_model' is required when rl.score.coef > 0 (give reward_fn for a programmatic "
                "sentence reward, or set rl.score.coef 0 to train on token rewards only)"
            )
        if not self.reward_sources():
            raise ConfigError(
                "no reward to learn from: give reward_model (with rl.score.coef > 0), reward_fn, dpo_model (with "
                "rl.dpo_reward.scale > 0) or token_reward_fn"
            )
        _no_lora_dropout(self.lora, "rl")
        group = rl.advantage_estimator in ("rloo", "grpo", "reinforce_pp_baseline")
        if group and rl.samples_per_prompt < 2:
            raise ConfigError(
                f"config key 'rl.samples_per_prompt' must be at least 2 for rl.advantage_estimator "
                f"{rl.advantage_estimator} (a group estimator compares each prompt's responses with each other); "
                "set rl.samples_per_prompt 4, say, or use gae / reinforce_pp"
            )
        if rl.online_dpo.enabled:
            if rl.dpo_reward.scale == 0:
                raise ConfigError(
                    "config key 'rl.online_dpo.enabled' is true but rl.dpo_reward.scale is 0: there is no DPO "
                    "token reward to keep learning (set rl.dpo_reward.scale > 0 and dpo_model)"
                )
            if rl.online_dpo.label == "group_mean" and rl.samples_per_prompt < 2:
                raise ConfigError(
                    "config key 'rl.samples_per_prompt' must be at least 2 for rl.online_dpo.enabled with "
                    "rl.online_dpo.label group_mean (the label compares a response with its group); or set "
                    "rl.online_dpo.label value for a sentence reward in [0, 1]"
                )
        if rl.sampler.correction != "none" and self.generate.backend != "vllm":
            raise ConfigError(
                f"config key 'rl.sampler.correction' is {rl.sampler.correction}, which corrects for vLLM's sampler; "
                f"generate.backend is {self.generate.backend}, whose samples come from the policy itself: set "
                "generate.backend vllm, or rl.sampler.correction none"
            )
        n = rl.rollout_batch_size * rl.samples_per_prompt
        if n % self.train.batch_size:
            raise ConfigError(
                f"rollout of {n} responses (rl.rollout_batch_size x rl.samples_per_prompt) must be a multiple of "
                f"train.batch_size ({self.train.batch_size})"
            )


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalConfig:
    out: str = _out()
    seed: int = _seed()
    overwrite: bool = _overwrite()
    policies: list[str] = option(
        [],
        "Policies to evaluate as NAME=PATH (comma-separated on the command line), e.g. sft=runs/sft,rto=runs/rto (required).",
    )
    ref_model: str | None = option(
        None, "Reference policy for KL (usually the SFT model); no KL without it."
    )
    reward_model: str | None = option(None, "Reward model for rm_score and reward-model win rates.")
    baseline: str | None = option(
        None, "Policy the win rates are against (default: the first one)."
    )
    win_rate_by: str = option("auto", "Judge of win rates: gold reward, reward model, or auto (gold when available).",
                              choices=["auto", "gold", "reward_model"])  # fmt: skip
    export: list[str] = option(
        [],
        "Also write generations for external judges: alpaca_eval, arena_hard.",
        choices=["alpaca_eval", "arena_hard"],
    )
    model: LoadingSection = section(
        LoadingSection, "How every policy, the reference and the reward model are loaded."
    )
    data: PromptRenderingSection = section(
        PromptRenderingSection, "How the held-out prompts are rendered and cut."
    )
    generate: GenerateSection = section(GenerateSection, "Sampling (the same for every policy).")
    eval: EvalSection = section(EvalSection, "Held-out prompts and judges.")
    log: ProgressSection = section(ProgressSection, "Logging.")

    def check(self) -> None:
        _require(self.out, "out", "the folder to write eval.json to")
        if not self.policies:
            raise ConfigError(
                "config key 'policies' is required: give NAME=PATH entries, e.g. sft=runs/sft,rto=runs/rto"
            )
        names = []
        for entry in self.policies:
            if "=" not in entry or not entry.split("=", 1)[0] or not entry.split("=", 1)[1]:
                raise ConfigError(
                    f"config key 'policies': entry {entry!r} must look like NAME=PATH"
                )
            names.append(entry.split("=", 1)[0])
        if len(set(names)) != len(names):
            raise ConfigError(
                f"config key 'policies': names must be unique, got {', '.join(names)}"
            )
        if self.baseline and self.baseline not in names:
            raise ConfigError(
                f"config key 'baseline' = {self.baseline!r} is not one of the policies ({', '.join(names)})"
            )
        _require(self.eval.prompts, "eval.prompts", "the held-out prompts to sample responses for")

    def named_policies(self) -> list[tuple[str, str]]:
        return [tuple(e.split("=", 1)) for e in self.policies]  # type: ignore[misc]


# --------------------------------------------------------------------------- report


@dataclass
class ReportConfig:
    out: str = _out()
    overwrite: bool = _overwrite()
    eval: str = option("", "Folder of an `rto eval` run (its eval.json) (required).")
    curves: list[str] = option(
        [], "RL runs to plot as NAME=PATH (their metrics.jsonl), e.g. ppo=runs/ppo,rto=runs/rto."
    )
    baseline: str = option("sft", "Method the win rates are against.")
    title: str = option("rto results", "Title of results.md and the plots.")
    pipeline_config: str | None = option(
        None, "Resolved pipeline config to embed in results.json (default: OUT/../pipeline.yaml)."
    )

    def check(self) -> None:
        _require(self.out, "out", "the folder to write results.json, results.md and the plots to")
        _require(self.eval, "eval", "the folder of an `rto eval` run")
        for entry in self.curves:
            if "=" not in entry:
                raise ConfigError(f"config key 'curves': entry {entry!r} must look like NAME=PATH")
