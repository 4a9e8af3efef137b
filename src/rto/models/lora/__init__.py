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

The package, by job:

    peft_api     importing peft, quieting its notes, telling adapters and peft models apart
    fingerprint  a hash of a model's weights, and of a base + adapter chain
    record       the adapter folder's files and `lora_base.json`: where the base is, and checks
    wrap         a new adapter on a model, an adapter folder loaded merged, the adapter-off
                 reference
    shared       one frozen base with named adapters that take turns (the RL shared base)
    merge        a model's plain state dict with an adapter merged in (vLLM, plain folders)
"""

from rto.models.lora.fingerprint import fingerprint, weights_fingerprint
from rto.models.lora.merge import merged_state_dict
from rto.models.lora.peft_api import hf_model, import_peft, is_adapter, is_peft_model, quiet_peft
from rto.models.lora.record import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    BASE_FILE,
    FULL_MODEL_FILES,
    AdapterBase,
    base_section,
    locate_base,
    remove_files,
)
from rto.models.lora.shared import SharedAdapters
from rto.models.lora.wrap import (
    AdapterOff,
    add_adapter,
    describe_base,
    load_adapter_folder,
    lora_config,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "ADAPTER_WEIGHTS",
    "BASE_FILE",
    "FULL_MODEL_FILES",
    "AdapterBase",
    "AdapterOff",
    "SharedAdapters",
    "add_adapter",
    "base_section",
    "describe_base",
    "fingerprint",
    "hf_model",
    "import_peft",
    "is_adapter",
    "is_peft_model",
    "load_adapter_folder",
    "locate_base",
    "lora_config",
    "merged_state_dict",
    "quiet_peft",
    "remove_files",
    "weights_fingerprint",
]
