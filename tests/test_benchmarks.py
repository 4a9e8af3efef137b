"""The measurement scripts' bookkeeping: they import one another one way only and none patches
sys.path; the memory report, the GPU check at tiny size and the before/after comparison of two
runs do what their pages say."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from rto.pipeline import plan

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def load_script(name: str):
    """benchmarks/NAME.py as a module, with benchmarks/ on sys.path while it loads, as it is when
    the script runs as `python benchmarks/NAME.py` (it imports its siblings by name)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        spec.loader.exec_module(module)
    return module


def imported_modules(tree: ast.AST) -> set[str]:
    """Top-level names of every module `tree` imports, at any depth (inside functions too),
    including importlib.import_module("x") and __import__("x") with a literal name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.split(".")[0])
    return names


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports in `graph` (module -> the modules it imports) as [a, b, ..., a], or
    None when the imports point one way."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_benchmark_imports_form_no_circle_and_never_patch_sys_path() -> None:
    """The scripts in benchmarks/ import their siblings by name (Python puts a script's folder
    first on sys.path), downward only: shared helpers below the scripts that use them."""
    trees = {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(BENCHMARKS.glob("*.py"))}
    graph = {name: imported_modules(tree) & set(trees) - {name} for name, tree in trees.items()}
    assert graph["padding_free"], "no sibling import found: the parser misses imports"
    assert find_cycle(graph) is None, f"benchmarks import in a circle: {find_cycle(graph)}"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]

    patches = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            sys_path = (
                isinstance(node, ast.Attribute)
                and node.attr == "path"
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            )
            from_sys = isinstance(node, ast.ImportFrom) and node.module == "sys"
            from_sys = from_sys and any(a.name == "path" for a in node.names)
            site = getattr(node, "attr", getattr(node, "id", None)) == "addsitedir"
            if sys_path or from_sys or site:
                patches.append(f"benchmarks/{name}.py:{node.lineno}")
    assert not patches, f"sys.path touched in {patches}: import siblings by name instead"


def test_memory_report_compares_memory_above_the_process_baseline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """benchmarks/memory.py's table on made-up measurements: ratios to full-model RTO and to
    LoRA PPO use the memory above what Python and the libraries take before any model is
    loaded."""
    spec = importlib.util.spec_from_file_location("memory", BENCHMARKS / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "memory", memory)  # its dataclasses look their module up
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its sibling measure.py by name
    spec.loader.exec_module(memory)
    run = {"rss_before_models_mb": 500.0, "rss_models_loaded_mb": 2000.0}
    results = {
        "full_rto": {**run, "rss_peak_mb": 4500.0},
        "lora_ppo": {**run, "rss_peak_mb": 1500.0},
    }
    rows = {
        r.split(" | ")[0].lstrip("| "): r for r in memory.table(results, "m", "cpu").splitlines()
    }
    assert rows["full-model RTO"].endswith("| 4500 | 4000 | 2000 | 1.00 | 4.00 |")
    assert rows[memory.CONFIGS["lora_ppo"].title].endswith("| 1500 | 1000 | 2000 | 0.25 | 1.00 |")
    assert "not measured" in rows["shared-base LoRA RTO"]  # not run here
    # the page opens with its command and the environment it was measured in
    env = {"cpu": "Test CPU", "cpu_capability": "AVX2", "python": "3.11",
           "packages": {"torch": "2.13.0", "transformers": "5.25.0", "peft": "0.21.2"}}  # fmt: skip
    page = memory.page({"command": "python benchmarks/memory.py", "base": "m", "results": results,
                        "threads": "2", "environment": env})  # fmt: skip
    assert page.splitlines()[2] == "Command: `python benchmarks/memory.py`"
    assert "Made on: Test CPU (AVX2), 2 threads; Python 3.11, torch 2.13.0" in page


def test_gpu_check_runs_at_tiny_size(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh at test size on the CPU, so the GPU check cannot rot; and its 1B
    recipe is a valid pipeline of about a billion parameters."""
    import os
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    recipe = tmp_path / "1b.yaml"
    recipe.write_text(yaml.safe_dump(gpu_check.recipe("1b", tmp_path / "1b"), sort_keys=False))
    planned, _ = plan(str(recipe))
    assert [p.name for p in planned] == ["task", "sft", "pairs", "rm", "dpo", "ppo", "rto", "rto_padded"]
    assert not planned[-1].config.model.padding_free and not planned[-1].config.model.logit_chunk
    task = planned[0].config
    mlp = task.hidden_size * 8 // 3
    per_layer = 4 * task.hidden_size**2 + 3 * task.hidden_size * mlp
    assert 0.9e9 < task.num_layers * per_layer < 1.1e9  # Llama-shaped, about 1B parameters

    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"  # this venv's python
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--size", "tiny", "--out",
                           str(tmp_path / "tiny")], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "tiny" / "gpu_check.json").read_text())
    for stage in ("ppo", "rto", "rto_padded"):  # RTO padding-free (the default) and padded
        assert result["stages"][stage]["generated_tokens_per_second"] > 0
        assert result["stages"][stage]["train_tokens_per_second"] > 0
    assert all(result["stages"][s]["train_tokens_per_second"] > 0 for s in ("sft", "rm", "dpo"))
    table = (tmp_path / "tiny" / "gpu_check.md").read_text()
    assert "| rto |" in table and "generated tokens/s" in table


def test_same_results_tells_a_changed_number_from_a_changed_time(tmp_path: Path) -> None:
    """tools/same_results.py (the before/after check of a refactor): runs that differ only
    in times and in their own folder agree; a changed metric, weight or text is a difference."""
    import torch
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("same_results", ROOT / "tools" / "same_results.py")
    same_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(same_results)

    def run(root: Path, loss: float, weight: float, seconds: float, text: str) -> Path:
        (root / "sft").mkdir(parents=True)
        rows = [{"step": 1, "loss": loss, "time/step": seconds}, {"step": 2, "loss": 0.5}]
        (root / "sft" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        summary = {"out": str(root / "sft"), "train_seconds": seconds, "final": loss}
        (root / "sft" / "summary.json").write_text(json.dumps(summary))
        save_file({"w": torch.full((2, 2), weight)}, str(root / "sft" / "model.safetensors"))
        (root / "sft" / "config.yaml").write_text(f"out: {root / 'sft'}\nnote: {text}\n")
        return root

    a = run(tmp_path / "a", 0.25, 1.0, 3.0, "x")
    assert same_results.compare(a, run(tmp_path / "b", 0.25, 1.0, 9.0, "x")) == []
    for name, args in {"loss": (0.2500001, 1.0, 3.0, "x"), "weight": (0.25, 1.0001, 3.0, "x"),
                       "text": (0.25, 1.0, 3.0, "y")}.items():  # fmt: skip
        diffs = same_results.compare(a, run(tmp_path / name, *args))
        assert len(diffs) >= 1, name
    assert same_results.main([str(a), str(tmp_path / "loss")]) == 1
    assert same_results.main([str(a), str(tmp_path / "b")]) == 0
