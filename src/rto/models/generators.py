"""What generates responses, behind one interface, so that no stage branches on the backend.

    generator = make_generator(cfg.generate, tokenizer=..., eos=..., device=..., model_path=...)
    generator.load_weights(policy)          # before each rollout: the policy as it is now
    samples = generator.sample(prompts, seeds)   # -> models.generate.Samples

The interface (`models.generate.Generator`) and the hf backend live beside `sample`; this module
only chooses, so that vLLM is imported only when it is chosen.

Two backends, chosen by `generate.backend`:

    hf     transformers' generate on the model given to `load_weights` (models/generate.sample,
           the seeded Gumbel-max sampler of models/seeded.py)
    vllm   an in-process vLLM engine made once per stage from the model folder
           (models/vllm_engine.py, imported only when chosen: vLLM is an optional extra)

A response means the same in both: the same stop ids (EOS and the chat template's end of turn),
`max_new_tokens`, temperature / top_p / top_k, the truncated flag, and one seed per response, so
that within a backend a response is a function of its seed whatever the batch size. The two
backends' samplers differ (vLLM cannot run rto's counter-based sampler), so the same seed gives
different responses in hf and vllm; greedy responses (temperature 0) agree.
"""

from __future__ import annotations

from typing import Any

from rto.models.generate import Generator, HFGenerator


def make_generator(
    settings: Any,
    *,
    tokenizer: Any,
    eos: list[int],
    device: Any,
    model: Any | None = None,
    model_cfg: Any | None = None,
    model_path: str | None = None,
    max_prompt_length: int = 0,
) -> Generator:
    """The generator `settings.backend` names. `model` (hf) generates as it is; vLLM builds its
    engine from `model_path` (a model folder, or an adapter folder's base with `model`'s merged
    weights put in; `model_cfg`, a ModelSection, gives its dtype and trust_remote_code) and the
    tokenizer, serving prompts of up to `max_prompt_length` tokens."""
    if settings.backend == "vllm":
        from rto.models.vllm_engine import VLLMGenerator

        return VLLMGenerator(
            settings, tokenizer=tokenizer, eos=eos, device=device, model_path=model_path,
            model_cfg=model_cfg, max_prompt_length=max_prompt_length, model=model,
        )  # fmt: skip
    return HFGenerator(settings, tokenizer=tokenizer, eos=eos, device=device, model=model)
