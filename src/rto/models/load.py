"""Loading and saving models and tokenizers, from the hub, a local folder or a GGUF file.

Whatever the source, a model goes through `from_pretrained`, and everything rto writes is a
plain Hugging Face folder that transformers alone can load.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rto.errors import ModelError, loading

_QUIET = False


def quiet_transformers() -> None:
    """Silence load reports and progress bars (rto prints its own, shorter, messages)."""
    global _QUIET
    if _QUIET:
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    except Exception:  # pragma: no cover - optional behaviour of the hub client
        pass
    _QUIET = True


def resolve_dtype(name: str, *, trainable: bool) -> torch.dtype:
    """auto: float32 for weights that are trained (autocast gives the speed), bfloat16 for frozen
    models on a GPU that supports it, float32 on CPU."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float16":
        return torch.float16
    if not trainable and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


_PROGRESS = True


def show_load_progress(enabled: bool) -> None:
    """Whether loading may draw progress bars (the GGUF de-quantisation bar); log.progress."""
    global _PROGRESS
    _PROGRESS = enabled


@contextlib.contextmanager
def _gguf_progress() -> Iterator[None]:
    """transformers draws its GGUF de-quantisation bar with plain tqdm; disable it unless
    progress bars are wanted."""
    if _PROGRESS:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _locate(section: Any, path: str | None = None) -> tuple[str, dict[str, Any]]:
    """(folder or hub id, from_pretrained kwargs) of a model: `path` (a role's own model, which
    may itself be a .gguf file) or the section's."""
    source = path or section.path
    kwargs: dict[str, Any] = {"trust_remote_code": section.trust_remote_code}
    if section.revision and source == section.path:  # the section's model's revision, not a role's
        kwargs["revision"] = section.revision
    if source.endswith(".gguf"):
        folder, name = os.path.split(source)
        source, kwargs["gguf_file"] = folder or ".", name
    elif section.gguf_file and source == section.path:
        kwargs["gguf_file"] = section.gguf_file
    return source, kwargs


# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone does not).
VOCAB_FILES = {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model", "tiktoken.model"}  # fmt: skip


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def check_source(source: str, kwargs: dict[str, Any], what: str, *, tokenizer: bool) -> None:
    """Explain a local path that cannot hold the `what` before transformers fails on it in its
    own words (an empty folder makes it ask for sentencepiece)."""
    path = Path(source).expanduser()
    if kwargs.get("gguf_file"):
        if path.is_dir() and not (path / kwargs["gguf_file"]).is_file():
            raise ModelError(f"the {what} file {path / kwargs['gguf_file']} does not exist")
        return
    if not path.exists():
        if _looks_local(source):
            raise ModelError(
                f"the {what} path {source} does not exist (it is neither a local folder nor a hub id)"
            )
        return  # a hub id: transformers looks it up
    if not path.is_dir():
        raise ModelError(
            f"the {what} path {source} is a file; give the model's folder (or a .gguf file)"
        )
    names = {p.name for p in path.iterdir()}
    if not names:
        raise ModelError(
            f"the {what} folder {source} is empty; give a folder holding a Hugging Face model "
            "(config.json, weights, tokenizer files), such as the output folder of an rto stage"
        )
    if tokenizer:
        custom = kwargs.get("trust_remote_code") and "tokenizer_config.json" in names
        if (
            not custom
            and not names & VOCAB_FILES
            and not any(n.endswith(".tiktoken") for n in names)
        ):
            raise ModelError(
                f"the folder {source} has no tokenizer files (none of {', '.join(sorted(VOCAB_FILES))}); "
                "save the tokenizer there too (tokenizer.save_pretrained), or name the folder that "
                "holds it with --model.tokenizer"
            )
    elif "config.json" not in names:
        raise ModelError(
            f"the {what} folder {source} has no config.json, so it is not a Hugging Face model "
            f"folder (it holds {', '.join(sorted(names)[:6])}{' ...' if len(names) > 6 else ''})"
        )


def check_not_classifier(source: str, what: str) -> None:
    """A sequence classifier (a reward model, a critic) given where a causal LM is needed would
    load with a new, random LM head: refuse it."""
    config_file = Path(source).expanduser() / "config.json"
    if not config_file.is_file():
        return
    try:
        archs = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return  # transformers will say what is wrong with it
    if archs and all(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelError(
            f"the {what} at {source} is a sequence classifier ({', '.join(archs)}: a reward model "
            "or a critic), not a causal language model; give a policy here (from `rto sft`, "
            "`rto dpo` or `rto rl`), and the reward model as --reward_model"
        )


def _hub_hint(path: str) -> str:
    """What to check when a path that is not a local folder failed to load from the hub."""
    if Path(path).exists():
        return ""
    return (
        " It is not a local folder, so it was looked up on the Hugging Face hub: check the id, "
        "your network, and `huggingface-cli login` for gated models."
    )


def load_tokenizer(section: Any, path: str | None = None, role: str | None = None) -> Any:
    """The tokenizer of `section` (or of `path`, the folder of the `role` model), with a pad
    token guaranteed."""
    from transformers import AutoTokenizer

    from rto.models import lora

    quiet_transformers()
    source, kwargs = _locate(section, path or section.tokenizer)
    if lora.is_adapter(source) and not (Path(source) / "tokenizer_config.json").is_file():
        base = lora.locate_base(source)  # an adapter folder without a tokenizer: its base's
        return load_tokenizer(lora.base_section(section, base), base.base_model)
    what = "tokenizer" if section.tokenizer and not path else (role or "model")
    check_source(source, kwargs, what, tokenizer=True)
    with loading("tokenizer", source, _hub_hint(source)):
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise ModelError(
                f"tokenizer {source} has neither a pad, an EOS nor an UNK token to pad with"
            )
    return tok


def load_causal_lm(
    section: Any, path: str | None = None, *, trainable: bool = True, keep_dropout: bool = False,
    role: str = "causal language model",
) -> Any:  # fmt: skip
    """A causal LM with dropout off (unless `keep_dropout`; see `disable_dropout`); `role`
    names it in error messages (policy, reference model ...). A peft adapter folder loads as its
    base with the adapter merged in (rto.models.lora)."""
    return _load(_CausalLM(), section, path or section.path, trainable=trainable, role=role,
                 keep_dropout=keep_dropout)  # fmt: skip


def _detach_gguf_quantizer(model: Any, source: str) -> None:
    """A GGUF checkpoint that transformers de-quantized at load time holds plain float weights,
    but keeps a GGUF quantizer attached that refuses training and saving. Drop it, so the model
    trains and saves as an ordinary Hugging Face model."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    if not all(p.dtype.is_floating_point for p in model.parameters()):
        raise ModelError(
            f"the GGUF model at {source} kept quantized weights; rto can fine-tune GGUF models only when "
            "transformers de-quantizes them (convert it to a Hugging Face folder first)"
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_sequence_scorer(
    section: Any, path: str, *, trainable: bool, require_head: bool, role: str
) -> Any:
    """A sequence-classification model with one output (a reward model or a critic).

    From a causal LM checkpoint the score head is new (small random weights); from a reward model
    checkpoint it is kept. `require_head=True` refuses a checkpoint without a trained score head
    (e.g. a plain causal LM given as the reward model), which transformers would otherwise fill
    with random weights silently.

    A peft adapter folder loads as its base with the adapter merged in; a reward model's or
    critic's adapter carries its score head (rto.models.lora).
    """
    return _load(_Scorer(require_head), section, path, trainable=trainable, role=role)


def _load(kind: Any, section: Any, path: str, *, trainable: bool, role: str,
          keep_dropout: bool = False) -> Any:  # fmt: skip
    """The one loading path of both kinds of model (`_CausalLM`, `_Scorer`): an adapter folder
    loads its base this same way and merges the adapter in; a model folder, hub id or GGUF
    file is located, checked, loaded by the kind's Auto class with the section's options, and
    prepared (dropout off; trained, or frozen in eval mode). Failures keep their cause."""
    from rto.models import lora

    if lora.is_adapter(path):
        kind.check_adapter(path, role)
        model = lora.load_adapter_folder(section, path, lambda base: _load(
            kind.for_base(), base, base.path, trainable=trainable, role=role, keep_dropout=keep_dropout))  # fmt: skip
        model.requires_grad_(trainable)  # peft froze the base it merged into
    else:
        quiet_transformers()
        source, kwargs = _locate(section, path)
        check_source(source, kwargs, role, tokenizer=False)
        kwargs["dtype"] = resolve_dtype(section.dtype, trainable=trainable)
        if section.attn_implementation:
            kwargs["attn_implementation"] = section.attn_implementation
        with loading(role, source, _hub_hint(source)):
            model = kind.load(source, kwargs, role)
        if kwargs.get("gguf_file"):
            _detach_gguf_quantizer(model, source)
        kind.check_loaded(model, source, role)
    _prepare(model, section, trainable, keep_dropout=keep_dropout)
    return model


class _CausalLM:
    """A causal language model (policy, reference, DPO model)."""

    def check_adapter(self, path: str, role: str) -> None:
        pass

    def for_base(self) -> _CausalLM:
        return self

    def load(self, source: str, kwargs: dict[str, Any], role: str) -> Any:
        from transformers import AutoModelForCausalLM

        check_not_classifier(source, role)
        with _gguf_progress():
            return AutoModelForCausalLM.from_pretrained(source, **kwargs)

    def check_loaded(self, model: Any, source: str, role: str) -> None:
        pass


class _Scorer:
    """A sequence classifier with one output (reward model, critic), its head kept from a reward
    model's checkpoint or made new on a causal LM's (or refused, with `require_head`)."""

    def __init__(self, require_head: bool):
        self.require_head = require_head
        self.fresh_head = False

    def check_adapter(self, path: str, role: str) -> None:
        from rto.models import lora

        if self.require_head and not lora.locate_base(path).score_head:
            raise ModelError(
                f"the {role} at {path} is a LoRA adapter without a score head (a language model's "
                "adapter); train a reward model with `rto rm`"
            )

    def for_base(self) -> _Scorer:
        return _Scorer(require_head=False)  # the adapter carries the head

    def load(self, source: str, kwargs: dict[str, Any], role: str) -> Any:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("dtype", "attn_implementation")
        }
        config = AutoConfig.from_pretrained(source, **config_kwargs)
        if self.require_head:
            archs = getattr(config, "architectures", None) or []
            if not any(a.endswith("ForSequenceClassification") for a in archs):
                raise ModelError(
                    f"the {role} at {source} has no score head (its architecture is {', '.join(archs) or 'unknown'}); "
                    "train one with `rto rm`, or give a reward model saved as AutoModelForSequenceClassification"
                )
            if getattr(config, "num_labels", 1) != 1:
                raise ModelError(
                    f"the {role} at {source} has {config.num_labels} outputs; rto needs a scalar score (num_labels=1)"
                )
        config.num_labels = 1
        if getattr(config, "pad_token_id", None) is None:  # transformers' own pooling needs one
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = eos[0] if isinstance(eos, list) else eos
        with _gguf_progress():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, config=config, output_loading_info=True, **kwargs
            )
        missing = {k for k in info.get("missing_keys", set()) if "score" in k}
        if self.require_head and missing:
            raise ModelError(
                f"the {role} at {source} is missing its score head weights ({', '.join(sorted(missing))}); "
                "train one with `rto rm`"
            )
        self.fresh_head = bool(missing)
        return model

    def check_loaded(self, model: Any, source: str, role: str) -> None:
        if not hasattr(model, "score"):
            raise ModelError(
                f"the {role} at {source} ({type(model).__name__}) has no linear `score` head; rto supports decoder "
                "models whose sequence-classification head is called `score` (Llama, Mistral, Qwen, Gemma, GPT-2 ...)"
            )
        if (
            self.fresh_head
        ):  # a new head: start from small weights so that initial scores are near zero
            with torch.no_grad():
                torch.nn.init.normal_(
                    model.score.weight, std=0.1 / model.score.weight.shape[1] ** 0.5
                )
                if getattr(model.score, "bias", None) is not None:
                    model.score.bias.zero_()


def disable_dropout(model: Any) -> int:
    """Set every dropout probability inside `model` to 0; return how many were not 0 already.

    RLHF compares a model with itself: the PPO ratio pi_theta / pi_theta_old of an unchanged
    policy must be exactly 1, the KL of the policy against an identical reference exactly 0, and
    DPO's chosen and rejected passes must see the same function. Dropout breaks all three, so
    every role runs without it, in training as in scoring (as TRL and OpenRLHF do). Models stay
    in train mode (gradient checkpointing needs it); the dropout layers (`nn.Dropout` modules,
    and the float `*dropout*` attributes attention layers pass to their kernels) are zeroed.
    The saved config keeps the model's own dropout settings."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p != 0
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and value != 0.0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def _prepare(model: Any, section: Any, trainable: bool, *, keep_dropout: bool = False) -> None:
    if not keep_dropout:
        disable_dropout(model)
    if trainable:
        model.train()
        if section.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            model.config.use_cache = False
    else:
        model.eval()
        model.requires_grad_(False)


def _strip_prefix(state: dict[str, Any] | None, prefix: str) -> dict[str, Any] | None:
    if not state:
        return state
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def save_pretrained(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    accelerator: Any = None,
    part: str | None = None,
) -> None:
    """Save model + tokenizer as a plain Hugging Face folder (safetensors); `part` saves one
    submodule of a prepared wrapper (the policy or the critic of the RL stage's actor-critic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator is None:
        target = getattr(model, "hf", model)  # a TokenScorer saves its Hugging Face model
        target.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards
    if part:
        unwrapped = getattr(unwrapped, part)
        state = _strip_prefix(state, part + ".")
    target = unwrapped
    if hasattr(unwrapped, "hf"):
        target = unwrapped.hf
        state = _strip_prefix(state, "hf.")
    if accelerator.is_main_process:
        state = _without_tied_copies(target, state)
        target.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()


def _without_tied_copies(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """`state` without the second name of a tied parameter (the LM head tied to the embeddings):
    a gathered ZeRO-3 / FSDP state holds separate copies, which would otherwise be saved twice
    and make the folder differ from a one-process run's."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    extra = {n for group in names.values() for n in group[1:]}
    return {k: v for k, v in state.items() if k not in extra}


# --------------------------------------------------------------------------- tokenizer identity


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of what maps text to ids: the vocabulary, added tokens and special tokens."""
    payload = {
        "vocab": sorted(tok.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_same_tokenizer(
    tok_a: Any, name_a: str, tok_b: Any, name_b: str, reason: str | None = None
) -> None:
    """Token ids go from one model to another unchanged, so the tokenizers must be the same."""
    if tokenizer_fingerprint(tok_a) == tokenizer_fingerprint(tok_b):
        return
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    diff = f"vocabulary sizes {len(va)} and {len(vb)}"
    if len(va) == len(vb):
        n = sum(1 for k, v in va.items() if vb.get(k) != v)
        diff = f"{n} tokens with different ids" if n else "different special tokens"
    reason = (
        reason
        or "token ids are passed between these models unchanged, so they must share one tokenizer"
    )
    raise ModelError(
        f"the {name_a} ({getattr(tok_a, 'name_or_path', '?')}) and the {name_b} ({getattr(tok_b, 'name_or_path', '?')}) "
        f"use different tokenizers ({diff}); {reason}: train both from the same base model"
    )
