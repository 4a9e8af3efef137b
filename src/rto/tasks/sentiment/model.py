"""The task's tokenizer (BPE trained here with `tokenizers`) and its tiny base model (random
initialisation), saved in Hugging Face format.

The model comes in three architectures and the tokenizer with four chat templates, so that
every stage can be exercised on the shapes real models have, offline:

    arch           llama (default; no dropout), gpt2 (dropout 0.1, as GPT-2 ships), qwen2
    chat_template  none (default: a base model), simple (<|user|>...</s>), chatml (Qwen,
                   SmolLM2: "<|im_start|>assistant\\n...<|im_end|>\\n", text after the
                   end-of-turn token; EOS <|im_end|>), llama3 (Llama-3: turns end with
                   <|eot_id|>, while the tokenizer's EOS is <|end_of_text|>)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TemplateSpec:
    special_tokens: tuple[str, ...]
    pad: str
    eos: str
    bos: str | None
    template: str | None
    # extra ids (besides the EOS) that end generation, as a model's generation_config lists them
    generation_stop: tuple[str, ...] = ()
    add_bos: bool = False  # put the BOS in front of plain text, as Llama-3's tokenizer does


SIMPLE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_PLAIN_SPECIALS = ("<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>")
TEMPLATES = {
    "none": TemplateSpec(_PLAIN_SPECIALS, "<pad>", "</s>", "<s>", None),
    "simple": TemplateSpec(_PLAIN_SPECIALS, "<pad>", "</s>", "<s>", SIMPLE),
    "chatml": TemplateSpec(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|endoftext|>", "<|im_end|>", None, CHATML, generation_stop=("<|endoftext|>",),
    ),
    "llama3": TemplateSpec(
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|finetune_right_pad_id|>"),
        "<|finetune_right_pad_id|>", "<|end_of_text|>", "<|begin_of_text|>", LLAMA3,
        generation_stop=("<|eot_id|>",), add_bos=True,
    ),
}  # fmt: skip


def train_tokenizer(corpus: list[str], vocab_size: int, chat_template: str = "none") -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TEMPLATES[chat_template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if spec.add_bos:
        from tokenizers import processors

        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A $B", special_tokens=[(spec.bos, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=spec.pad,
        bos_token=spec.bos,
        eos_token=spec.eos,
        clean_up_tokenization_spaces=False,
    )
    if spec.template is not None:
        fast.chat_template = spec.template
    return fast


def _model_config(arch: str, tokenizer: Any, cfg: Any, dropout: float | None) -> Any:
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    if arch == "gpt2":
        from transformers import GPT2Config

        p = 0.1 if dropout is None else dropout  # GPT-2's own default
        return GPT2Config(
            vocab_size=len(tokenizer), n_positions=cfg.max_positions, n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, resid_pdrop=p, embd_pdrop=p,
            attn_pdrop=p, initializer_range=0.02, **ids,
        )  # fmt: skip
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 8 // 3,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        attention_dropout=dropout or 0.0,
        initializer_range=0.02,
        **ids,
    )
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def _check_positions(tokenizer: Any, corpus: list[str], max_positions: int) -> None:
    """Refuse a base model that cannot hold the corpus' longest text (with BOS and EOS)."""
    from rto.errors import ConfigError

    longest = max(len(ids) for ids in tokenizer(corpus).input_ids) + 2
    if longest > max_positions:
        raise ConfigError(
            f"config key 'max_positions' ({max_positions}) is shorter than the task's longest text "
            f"({longest} tokens with BOS and EOS); raise it (at least {longest}, plus room for "
            "sampling longer responses), or leave it unset for the review length's default"
        )


def build_base_model(corpus: list[str], out: Path, cfg: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from rto.models.load import quiet_transformers

    quiet_transformers()
    template = getattr(cfg, "chat_template", "none")
    arch = getattr(cfg, "arch", "llama")
    tokenizer = train_tokenizer(corpus, cfg.vocab_size, template)
    _check_positions(tokenizer, corpus, cfg.max_positions)
    config = _model_config(arch, tokenizer, cfg, getattr(cfg, "dropout", None))
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    stops = [tokenizer.eos_token_id] + [
        tokenizer.convert_tokens_to_ids(t) for t in TEMPLATES[template].generation_stop
    ]
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_layers,
        "chat_template": template,
    }
