"""What a run ran on: Python, the key packages, the CPU or GPU.

Runs are bit-for-bit repeatable with the same seed on the same machine and package versions, but
float rounding inside the math kernels differs between CPU generations (AVX2 vs AVX-512), GPUs and
library versions, and small differences grow through sampling. Every summary.json records this
block so that two results can be told apart by where they were made."""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from typing import Any

PACKAGES = ("rto", "torch", "transformers", "accelerate", "datasets", "tokenizers", "numpy", "peft")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def environment() -> dict[str, Any]:
    """A JSON-ready description of the software and hardware of this process."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "packages": {p: _version(p) for p in PACKAGES},
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["cuda"] = torch.version.cuda
    return env
