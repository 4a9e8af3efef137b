"""LoRA adapters on peft: add them to a model, save them as adapter folders, load a folder back.

With `lora.r > 0` a stage freezes the model it starts from (the *base*) and trains low-rank
adapters on its linear layers, plus, for a reward model or critic, the whole score head (a peft
`modules_to_save` module, saved with the adapter). Its output is an adapter folder:

    adapter_config.json, adapter_model.safetensors    what peft writes and reads
    tokenizer files                                   as in every rto output
    lora_base.json                                    rto's record of the base (below)

peft's `base_model_name_or_path` holds the base as an absolute folder (a hub id stays a hub id),
so peft + transformers load the folder alone from any working directory. `lora_base.json` adds
what peft does not keep:

    base_model   the same absolute folder, .gguf file or hub id
    relative     the base's folder relative to the adapter folder: rto looks there first, so a
                 run folder moved or copied as a whole (runs/demo -> elsewhere) still loads
    revision     hub revision of the base
    fingerprint  a hash of the base's weights (`weights_fingerprint`): loading checks it, so an
                 adapter never silently lands on a base that was retrained or replaced
    score_head   whether the adapter carries a score head (reward model, critic)

Wherever rto takes a model path (a stage's model.path, rto pairs, rto eval, rl's reference, DPO
model, reward model and critic start), an adapter folder is loaded as its base with the adapter
merged in (`load_adapter_folder`). Its base may itself be an adapter folder (LoRA DPO on a LoRA
SFT); the fingerprint of such a chain hashes the base's fingerprint with the adapter's weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from rto.errors import ConfigError, ModelError
from rto.files import write_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "lora_base.json"
ALL_LINEAR = "all-linear"
_SAMPLES_PER_TENSOR = 1024
# What the other kind of output leaves in a folder (a full model, an adapter): a stage that
# writes one removes the other, so that nobody loads a stale model from an overwritten run.
FULL_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors*",
    "model-*.safetensors",
)
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FILE)


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft's notes that say nothing to an rto user: GPT-2's Conv1D layers get fan_in_fan_out
    set; its check of gradient checkpointing reads a property transformers renamed; saving an
    adapter whose base is itself an adapter folder finds no config.json there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
        yield


def import_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ModelError(
            "LoRA (lora.r > 0, or a model given as a peft adapter folder) needs the peft "
            "package: pip install 'rto[peft]'"
        ) from None
    return peft


def is_adapter(path: str | Path | None) -> bool:
    """A local folder that holds a peft adapter (adapter_config.json)."""
    return bool(path) and (Path(path) / ADAPTER_CONFIG).is_file()


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def hf_model(model: Any) -> Any:
    """The Hugging Face model inside a peft model (its adapters injected), or `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


# --------------------------------------------------------------------------- fingerprints


def weights_fingerprint(model: Any) -> str | None:
    """A hash of a model's body (all but its output layer or score head, so a causal LM and the
    reward model built on it agree), read at up to 1024 evenly spaced entries of every tensor,
    rounded to bfloat16: the same for a base loaded in float32 or bfloat16, different for a
    retrained one (fine-tuning moves essentially every entry). None under ZeRO-3, whose
    parameters are shards."""
    body = getattr(model, model.base_model_prefix, model)
    digest = hashlib.sha256()
    for name, tensor in sorted(body.named_parameters()):
        if hasattr(tensor, "ds_id"):
            return None
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].float().to(torch.bfloat16)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(model: Any) -> str | None:
    """The fingerprint of a loaded model: its weights', or, when it came from an adapter folder,
    the chain's (set by `load_adapter_folder`)."""
    return getattr(model, "rto_fingerprint", None) or weights_fingerprint(model)


def _chain_fingerprint(base_fingerprint: str | None, folder: Path) -> str | None:
    if base_fingerprint is None:
        return None
    weights = folder / ADAPTER_WEIGHTS
    adapter = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else "none"
    return hashlib.sha256(f"{base_fingerprint}+{adapter}".encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the base record


@dataclasses.dataclass
class AdapterBase:
    """The model an adapter was trained on."""

    base_model: str  # absolute folder or .gguf file, or a hub id
    revision: str | None = None
    fingerprint: str | None = None
    score_head: bool = False

    @property
    def is_local(self) -> bool:
        return os.path.isabs(self.base_model)

    @property
    def peft_path(self) -> str:
        """What peft's base_model_name_or_path can hold: a folder or hub id (a GGUF base is its
        folder; pass gguf_file=... to from_pretrained yourself)."""
        if self.base_model.endswith(".gguf"):
            return os.path.dirname(self.base_model)
        return self.base_model

    def record(self, adapter_folder: Path) -> dict[str, Any]:
        relative = None
        if self.is_local:
            relative = os.path.relpath(self.base_model, os.path.abspath(adapter_folder))
        return {"base_model": self.base_model, "relative": relative, "revision": self.revision,
                "fingerprint": self.fingerprint, "score_head": self.score_head}  # fmt: skip


def describe_base(section: Any, source: str, model: Any, *, score_head: bool) -> AdapterBase:
    """The record of `model`, loaded from `source` with `section`'s options, as an adapter's base."""
    location = source
    if source == section.path and section.gguf_file:
        location = os.path.join(source, section.gguf_file)
    if os.path.exists(location):
        location = os.path.abspath(location)
    revision = section.revision if source == section.path else None
    return AdapterBase(location, revision, fingerprint(model), score_head)


def locate_base(folder: str | Path) -> AdapterBase:
    """The base of the adapter in `folder`, found where it is now: beside the adapter as
    recorded (a moved run folder), at its absolute path, or on the hub; an error says what is
    missing otherwise."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    record: dict[str, Any] = {}
    if (folder / BASE_FILE).is_file():
        record = json.loads((folder / BASE_FILE).read_text())
    named = record.get("base_model") or config.get("base_model_name_or_path")
    if not named:
        raise ModelError(
            f"the LoRA adapter at {folder} does not say which model it was trained on "
            f"(no base_model_name_or_path in {folder / ADAPTER_CONFIG}); set it to the base "
            "model's folder or hub id"
        )
    candidates = []
    if record.get("relative"):
        candidates.append(
            os.path.normpath(os.path.join(os.path.abspath(folder), record["relative"]))
        )
    candidates.append(named)
    found = next((c for c in candidates if os.path.exists(c)), None)
    looks_local = os.path.isabs(named) or named.startswith(".") or named.endswith(".gguf")
    if found is None and looks_local:
        where = " or ".join(candidates)
        raise ModelError(
            f"the LoRA adapter at {folder} was trained on the base model {named}, which is not "
            f"there any more (looked for {where}); put the base model back, or set "
            f"base_model_name_or_path in {folder / ADAPTER_CONFIG} (and base_model in "
            f"{folder / BASE_FILE}) to where it is now"
        )
    head = record.get("score_head")
    if head is None:  # an adapter from elsewhere: a peft sequence-classification adapter
        head = config.get("task_type") == "SEQ_CLS" or "score" in (
            config.get("modules_to_save") or []
        )
    return AdapterBase(
        found or named,
        record.get("revision", config.get("revision")),
        record.get("fingerprint"),
        bool(head),
    )


# --------------------------------------------------------------------------- adding and saving


def lora_config(lora: Any, *, score_head: bool) -> Any:
    peft = import_peft()
    targets = lora.target_modules
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha if lora.alpha is not None else 2.0 * lora.r,
        lora_dropout=lora.dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
        task_type="SEQ_CLS" if score_head else "CAUSAL_LM",
        modules_to_save=["score"] if score_head else None,
    )


def _linear_layer_names(model: Any) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
    }
    return sorted(names)


def add_adapter(
    model: Any, section: Any, lora: Any, *, score_head: bool = False, source: str | None = None
) -> tuple[Any, AdapterBase]:
    """(`model` (loaded from `source`, default section.path) frozen, with new LoRA adapters to
    train; the record of its base). The adapters start at zero (peft's B = 0), so the new model
    computes exactly what the base did."""
    peft = import_peft()
    base = describe_base(section, source or section.path, model, score_head=score_head)
    config = lora_config(lora, score_head=score_head)
    with quiet_peft():
        wrapped = _wrap(model, config, lora, base, peft.get_peft_model)
    if score_head:  # trained whole: keep it in float32 even on a bfloat16 base
        head = wrapped.get_base_model().score
        for p in head.parameters():
            p.data = p.data.float()
    return wrapped, base


def _wrap(model: Any, config: Any, lora: Any, base: AdapterBase, get_peft_model: Callable) -> Any:
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(
            f"config key 'lora.target_modules' ({', '.join(lora.target_modules)}) does not fit "
            f"the model at {base.base_model}: {exc}. Its linear layers are named "
            f"{', '.join(_linear_layer_names(model))}; or use all-linear"
        ) from None


def remove_files(out: Path, patterns: tuple[str, ...], accelerator: Any) -> None:
    if accelerator.is_main_process and out.is_dir():
        for pattern in patterns:
            for stale in out.glob(pattern):
                stale.unlink()


def sharded(accelerator: Any) -> bool:
    state = accelerator.state
    if str(state.distributed_type).endswith("FSDP"):
        return True
    plugin = getattr(state, "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", 0) == 3


# --------------------------------------------------------------------------- loading


def base_section(section: Any, base: AdapterBase) -> Any:
    """`section`'s loading options (dtype, attention kernel ...) pointed at an adapter's base."""
    return dataclasses.replace(
        section, path=base.base_model, gguf_file=None, revision=base.revision, tokenizer=None
    )


def load_adapter_folder(section: Any, folder: str | Path, load_base: Callable[[Any], Any]) -> Any:
    """Base + the adapter in `folder`, merged into a plain model (requires_grad and train / eval
    mode are the caller's to set). `load_base(section)` loads the base given by section.path, so
    a base that is itself an adapter folder loads the same way."""
    peft = import_peft()
    folder = Path(folder)
    base = locate_base(folder)
    model = load_base(base_section(section, base))
    found = fingerprint(model)
    if base.fingerprint and found and found != base.fingerprint:
        raise ModelError(
            f"the LoRA adapter at {folder} was trained on a different model than the one now at "
            f"{base.base_model} (weights fingerprint {found}, recorded {base.fingerprint}): the "
            "base was retrained or replaced since; retrain the adapter on it, or put the "
            "original base back"
        )
    config = peft.PeftConfig.from_pretrained(str(folder))
    config.task_type = None  # any model class: a causal LM's adapter also fits its reward model
    config.inference_mode = True
    try:
        with quiet_peft():
            wrapped = peft.PeftModel.from_pretrained(model, str(folder), config=config)
    except Exception as exc:
        raise ModelError(
            f"could not load the LoRA adapter at {folder} onto its base {base.base_model}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    merged = wrapped.merge_and_unload()
    merged.rto_fingerprint = _chain_fingerprint(found or base.fingerprint, folder)
    return merged


# --------------------------------------------------------------------------- the reference


class AdapterOff:
    """pi_ref of a LoRA policy trained from the reference: the same model with its adapter
    disabled, which computes exactly the frozen base. Called like a model (no_grad is the
    caller's)."""

    def __init__(self, peft_model: Any):
        self.model = peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)


# --------------------------------------------------------------------------- one base, named adapters


class SharedAdapters:
    """One frozen base with named LoRA adapters that take turns on it (the RL stage's shared
    base: policy, critic, dpo, reward). `using(name)` runs a block with one adapter active,
    `using(None)` with every adapter off (the base alone); nothing is copied, only which adapter
    each LoRA layer adds changes.

    peft's own switches (set_adapter, disable_adapter) also mark the adapter they activate as
    trainable and every other one as frozen; here two adapters train at once (policy and
    critic), so which adapters train is fixed when they are added and every switch puts it back.
    Between turns the policy's adapter is active, so the peft model generates and trains as the
    policy when called directly."""

    def __init__(self, base: Any, section: Any, lora: Any, default: str = "policy"):
        peft = import_peft()
        self.record = describe_base(section, section.path, base, score_head=False)
        with quiet_peft():
            self.model = _wrap(base, lora_config(lora, score_head=False), lora, self.record,
                               lambda m, c: peft.get_peft_model(m, c, adapter_name=default))  # fmt: skip
        self.trains: dict[str, bool] = {default: True}
        self.active: str | None = default
        self._layers = [m for m in self.model.modules() if _is_tuner_layer(m)]
        self._restore_requires_grad()
        if section.gradient_checkpointing:  # recomputation must see the adapter the pass used
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False, "context_fn": self._checkpoint_contexts})  # fmt: skip

    @property
    def hf(self) -> Any:
        """The Hugging Face causal LM, its LoRA layers injected."""
        return self.model.get_base_model()

    def add(self, name: str, config: Any, *, trainable: bool) -> None:
        """A new adapter (B = 0: it starts as the base)."""
        config = dataclasses.replace(config, task_type="CAUSAL_LM", modules_to_save=None,
                                     inference_mode=not trainable)  # fmt: skip
        with quiet_peft():
            self.model.add_adapter(name, config)
        self.trains[name] = trainable
        self._layers = [m for m in self.model.modules() if _is_tuner_layer(m)]
        self._restore_requires_grad()

    def load(self, name: str, folder: str | Path, *, trainable: bool) -> torch.nn.Linear | None:
        """The adapter in `folder` as adapter `name`; returns its score head (a reward model's),
        as a separate module, or None."""
        from safetensors.torch import load_file

        peft = import_peft()
        folder = Path(folder)
        self.add(name, peft.PeftConfig.from_pretrained(str(folder)), trainable=trainable)
        saved = load_file(str(folder / ADAPTER_WEIGHTS))
        head_state = {k.rsplit(".", 1)[-1]: v for k, v in saved.items() if _is_head_key(k)}
        state = {k: v for k, v in saved.items() if not _is_head_key(k)}
        expected = set(peft.get_peft_model_state_dict(self.model, adapter_name=name))
        if set(state) != expected:
            odd = sorted(set(state) ^ expected)[:3]
            raise ModelError(
                f"the LoRA adapter at {folder} does not fit the shared base {self.record.base_model} "
                f"(weights that differ: {', '.join(odd)}): was it trained on another architecture?"
            )
        peft.set_peft_model_state_dict(self.model, state, adapter_name=name)
        self._restore_requires_grad()
        if not head_state:
            return None
        weight = head_state["weight"]
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_state)
        head.load_state_dict(head_state)
        return head.to(weight.device).requires_grad_(trainable)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters of adapter `name`."""
        found = []
        for layer in self._layers:
            for attribute in layer.adapter_layer_names:
                part = getattr(layer, attribute)
                if name in part:
                    item = part[name]
                    found.extend(
                        [item] if isinstance(item, torch.nn.Parameter) else item.parameters()
                    )
        return found

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """A block run with adapter `name` active (None: every adapter off)."""
        before = self.active
        if name == before:
            yield
            return
        self._activate(name)
        try:
            yield
        finally:
            self._activate(before)

    @contextlib.contextmanager
    def training(self, name: str) -> Iterator[None]:
        """A block in which frozen adapter `name` trains too (the DPO adapter's online update):
        its parameters require gradients through every switch inside, and are frozen again
        after, so that whatever wraps the base for the policy (DDP, the checkpoints) sees it
        frozen."""
        before = self.trains[name]
        self.trains[name] = True
        self._restore_requires_grad()
        try:
            yield
        finally:
            self.trains[name] = before
            self._restore_requires_grad()

    def _activate(self, name: str | None) -> None:
        for layer in self._layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(name)
                layer.enable_adapters(True)
        self.active = name
        self._restore_requires_grad()

    def _restore_requires_grad(self) -> None:
        for name, trainable in self.trains.items():
            for p in self.parameters(name):
                p.requires_grad_(trainable)

    def _checkpoint_contexts(self) -> tuple[Any, Any]:
        """torch.utils.checkpoint's context_fn: a layer's forward is recomputed during backward,
        when the policy's adapter is active again; recompute it with the adapter it ran with."""
        return contextlib.nullcontext(), self.using(self.active)

    def save(self, name: str, out: str | Path, tokenizer: Any, accelerator: Any,
             head: torch.nn.Module | None = None) -> None:  # fmt: skip
        """Adapter `name` (with `head` as its score head) as an adapter folder on the shared
        base, as `models.trainable.Trainable.save` writes one: peft + transformers load it alone."""
        from safetensors.torch import save_file

        peft = import_peft()
        out = Path(out)
        remove_files(out, FULL_MODEL_FILES, accelerator)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            state = peft.get_peft_model_state_dict(self.model, adapter_name=name)
            if head is not None:  # where peft keeps a modules_to_save score head
                state.update(
                    {f"base_model.model.score.{k}": v for k, v in head.state_dict().items()}
                )
            state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            config = dataclasses.replace(
                self.model.peft_config[name], base_model_name_or_path=self.record.peft_path,
                revision=self.record.revision, inference_mode=True,
                task_type="SEQ_CLS" if head is not None else "CAUSAL_LM",
                modules_to_save=["score"] if head is not None else None,
            )  # fmt: skip
            config.save_pretrained(str(out))
            save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            tokenizer.save_pretrained(out)
            record = dataclasses.replace(self.record, score_head=head is not None)
            write_json(out / BASE_FILE, record.record(out))
        accelerator.wait_for_everyone()

    def save_merged(self, name: str, out: str | Path, tokenizer: Any, accelerator: Any) -> None:
        """The base with adapter `name` merged in, as a plain Hugging Face folder: the merged
        weights are computed beside the shared base, which stays as it is (merging in place and
        unmerging would not give back the same bits)."""
        remove_files(out, ADAPTER_FILES, accelerator)
        if accelerator.is_main_process:
            state = merged_state_dict(self.model, name)
            self.hf.save_pretrained(Path(out), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out)
        accelerator.wait_for_everyone()


@torch.no_grad()
def merged_state_dict(model: Any, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The plain Hugging Face state dict of `model` (a plain model, or a peft model with its
    adapter `adapter` merged in; default: the active adapter), computed beside the model, which
    stays as it is. What a vLLM engine or a plain folder loads."""
    hf = hf_model(model)
    if not is_peft_model(model) and not any(".base_layer." in k for k in hf.state_dict()):
        return {k: v.detach() for k, v in hf.state_dict().items()}
    name = adapter or getattr(model, "active_adapter", None)
    deltas = {f"{module_name}.base_layer.weight": module.get_delta_weight(name)
              for module_name, module in hf.named_modules()
              if _is_tuner_layer(module) and name in module.lora_A}  # fmt: skip
    state = {}
    for key, value in hf.state_dict().items():
        if ".lora_" in key:
            continue
        delta = deltas.get(key)
        value = value.detach()
        state[_plain_name(key)] = value if delta is None else value + delta.to(value)
    return state


def _plain_name(key: str) -> str:
    return key.replace(".base_layer.", ".")


def _is_head_key(key: str) -> bool:
    return key.startswith("base_model.model.score.")


def _is_tuner_layer(module: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)
