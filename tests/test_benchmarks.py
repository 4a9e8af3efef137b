"""The paper-in-miniature benchmark's bookkeeping: its recipe is a valid pipeline, and the report
reads per-seed results into the right verdicts (checked on made-up eval files, no training); the
benchmarks import one another one way only, and none patches sys.path."""

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


@pytest.fixture(scope="module")
def bench():
    return load_script("paper_miniature")


@pytest.fixture(scope="module")
def common():
    return load_script("bench_common")  # the helpers the benchmarks share


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
    assert graph["token_reward_study"], "no sibling import found: the parser misses imports"
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


def test_recipe_is_a_valid_pipeline_with_every_method(bench, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(bench.recipe_for(0, tmp_path / "seed0"), sort_keys=False))
    planned, _ = plan(str(recipe))
    names = [p.name for p in planned]
    assert names[:2] == ["task", "sft"] and names[-1] == "eval"
    policies = dict(s.split("=", 1) for s in planned[-1].config.policies)
    expected = set(bench.TABLE1) | set(bench.ABLATIONS) | set(bench.ppo_names())
    expected |= {f"rto_{t}" for t in bench.BUDGETS} | {f"rto_beta{b}" for b in bench.BETAS}
    assert expected <= set(policies)
    assert policies["rto_beta0.01"].endswith("rl_rto_beta_0p01")
    assert policies["ppo_kl0.05"].endswith("rl_ppo_kl_0p05")
    # the recipe's DPO model is the better-fit one (lr 1e-3); the earlier rate gets its own stage,
    # evaluated, and the token reward of one RTO run
    stages = {p.name: p for p in planned}
    assert stages["dpo"].config.train.lr == 1e-3
    assert stages["dpo_lr2e-4"].config.train.lr == bench.DPO_EARLIER_LR == 2e-4
    assert stages["rl_rto_dpo_lr2e-4"].config.dpo_model.endswith("dpo_lr2e-4")
    assert stages["rl_rto"].config.dpo_model.endswith("/dpo")
    assert policies["dpo_lr2e-4"].endswith("dpo_lr2e-4") and "rto_dpo_lr2e-4" in policies


def test_interpolation_and_sample_efficiency(common) -> None:
    assert common.interpolate([(0.0, 0.0), (2.0, 1.0)], 1.0) == 0.5
    assert common.interpolate([(0.0, 0.0), (2.0, 1.0)], 3.0) is None
    curve = {1 / 8: 0.1, 1 / 4: 0.2, 1 / 2: 0.4, 1.0: 0.6}
    assert common.efficiency(curve, 0.3) == pytest.approx(0.375)
    assert common.efficiency(curve, 0.05) == 1 / 8
    assert common.efficiency(curve, 0.7) is None


def test_verdicts_account_for_seed_noise(common) -> None:
    assert common.verdict(common.mean_sd([0.10, 0.11, 0.12])) == "yes"
    assert common.verdict(common.mean_sd([0.20, -0.05, 0.01])) == "weak"
    assert common.verdict(common.mean_sd([-0.1, -0.2, 0.0])) == "no"
    assert common.weakest("yes", "weak") == "weak"


def fake_seed(bench, runs: Path, seed: int, rto_gain: float, earlier_layout: bool = True) -> None:
    """A finished seed whose RTO runs beat PPO's by rto_gain at every budget. earlier_layout: as
    runs made before the recipe's DPO learning rate went from 2e-4 to 1e-3 (a `dpo_fit` stage at
    1e-3 beside the recipe's `dpo`); else today's (the recipe's `dpo` beside `dpo_lr2e-4`)."""
    methods = {}
    for name, gold, kl in [("sft", 0.0, 0.0), ("dpo", 0.8, 10.0), ("rdpo", 0.8, 10.0),
                           ("simpo", 0.6, 9.0), ("tdpo", 0.7, 3.0), ("semi_rto", 0.45, 1.4),
                           ("ddpo", 0.42, 1.3), ("rs_ppo", 0.48, 1.4), ("rpp", 0.3, 0.8),
                           ("rto_rpp", 0.35, 0.8), ("ppo_kl0.07", 0.45, 1.6),
                           ("ppo_kl0.05", 0.5, 2.2)]:  # fmt: skip
        methods[name] = {"gold_reward_mean": gold, "kl_mean": kl}
    for tag, gold, kl in [
        ("_b8", 0.1, 0.05),
        ("_b4", 0.15, 0.1),
        ("_b2", 0.25, 0.4),
        ("", 0.4, 1.2),
    ]:
        methods[f"ppo{tag}"] = {"gold_reward_mean": gold, "kl_mean": kl}
        methods[f"rto{tag}"] = {"gold_reward_mean": gold + rto_gain, "kl_mean": kl}
    if earlier_layout:
        methods["dpo_fit"] = {"gold_reward_mean": 0.9, "kl_mean": 13.0}
        methods["rto_dpo_fit"] = {"gold_reward_mean": 0.43 + rto_gain, "kl_mean": 1.2}
    else:  # the recipe's RTO has the better DPO model; the less-fit one's RTO is 0.03 lower
        methods["dpo_lr2e-4"] = {"gold_reward_mean": 0.85, "kl_mean": 10.0}
        methods["rto_dpo_lr2e-4"] = {"gold_reward_mean": 0.37 + rto_gain, "kl_mean": 1.2}
    for b in bench.BETAS:
        methods[f"rto_beta{b}"] = {"gold_reward_mean": 0.4, "kl_mean": 1.5}
    folder = runs / f"seed{seed}" / "eval"
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps({"methods": methods}))
    env = {
        "cpu": "Test CPU",
        "cpu_capability": "AVX2",
        "python": "3.11.7",
        "packages": {"torch": "2.13.0"},
    }
    (folder / "summary.json").write_text(json.dumps({"stage": "eval", "environment": env}))
    worse, better = ("dpo", "dpo_fit") if earlier_layout else ("dpo_lr2e-4", "dpo")
    for stage, summary in [("rm", {"eval/accuracy": 0.8, "eval/gold_accuracy": 0.95}),
                           (worse, {"eval/rewards/accuracies": 0.75 + seed / 100}),
                           (better, {"eval/rewards/accuracies": 0.85})]:  # fmt: skip
        (runs / f"seed{seed}" / stage).mkdir()
        (runs / f"seed{seed}" / stage / "summary.json").write_text(json.dumps(summary))
    for stage, lr in ((worse, 2e-4), (better, 1e-3)):
        (runs / f"seed{seed}" / stage / "config.yaml").write_text(
            yaml.safe_dump({"train": {"lr": lr}})
        )


def test_report_turns_seed_results_into_claims(bench, tmp_path: Path) -> None:
    for seed, gain in enumerate([0.05, 0.06, 0.07]):
        fake_seed(bench, tmp_path / "runs", seed, gain)
    bench.main(
        ["--report-only", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "out")]
    )
    res = json.loads((tmp_path / "out" / "paper_miniature.json").read_text())
    verdicts = {c["claim"]: c["verdict"] for c in res["claims"]}
    assert verdicts["RTO > PPO > SFT"] == "yes"
    assert verdicts["RTO-RPP > RPP"] == "yes"
    # RTO at 1/2 of the budget (0.25 + gain) never reaches PPO's 0.4 before the full budget
    assert verdicts["RTO needs about 1/8 of PPO's data to match PPO's final gold reward"] == "no"
    # at RTO's KL (1.2) PPO's frontier is 0.4, so RTO is ahead by the gain in every seed
    assert res["rto_minus_ppo_at_equal_kl"] == pytest.approx([0.05, 0.06, 0.07])
    md = (tmp_path / "out" / "paper_miniature.md").read_text()
    assert "| ppo_kl0.05 | 0.500 ± 0.000" in md and "paper_miniature_scaling_beta.png" in md
    # a better-fit DPO model: RTO gains 0.03 in every seed, and stays above PPO at equal KL
    assert verdicts["(our check) a DPO model fit closer to the ceiling makes RTO better"] == "yes"
    assert res["rto_dpo_fit_minus_ppo_at_equal_kl"] == pytest.approx([0.08, 0.09, 0.10])
    assert res["heldout_accuracy"]["dpo"]["values"] == pytest.approx([0.75, 0.76, 0.77])
    assert "DPO held-out accuracy 0.760 -> 0.850" in json.dumps(res["claims"])
    assert "gold reward (ceiling) 0.950 ± 0.000, reward model 0.800 ± 0.000" in md
    # the learning rates come from the runs, not from today's recipe
    assert "`dpo_fit` is DPO trained at learning rate 0.001, `dpo` at 0.0002" in md
    # the report says where the runs were made (read from the runs, not from this process)
    assert res["environment"]["cpu"] == "Test CPU" and "Made on: Test CPU (AVX2)" in md


def test_report_reads_todays_layout_where_the_recipe_has_the_better_fit_dpo(
    bench, tmp_path: Path
) -> None:
    for seed, gain in enumerate([0.05, 0.06, 0.07]):
        fake_seed(bench, tmp_path / "runs", seed, gain, earlier_layout=False)
    bench.main(
        ["--report-only", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "out")]
    )
    res = json.loads((tmp_path / "out" / "paper_miniature.json").read_text())
    verdicts = {c["claim"]: c["verdict"] for c in res["claims"]}
    assert verdicts["(our check) a DPO model fit closer to the ceiling makes RTO better"] == "yes"
    assert "rto - rto_dpo_lr2e-4 +0.030" in json.dumps(res["claims"], ensure_ascii=False)
    # RTO with the less-fit model: 0.37 + gain at KL 1.2, where PPO's frontier is 0.4
    assert res["rto_dpo_lr2e-4_minus_ppo_at_equal_kl"] == pytest.approx([0.02, 0.03, 0.04])
    assert verdicts["(our check) RTO with the less-fit DPO model > PPO at equal KL"] == "yes"
    md = (tmp_path / "out" / "paper_miniature.md").read_text()
    assert "`dpo` is DPO trained at learning rate 0.001, `dpo_lr2e-4` at 0.0002" in md
    assert "| rto_dpo_lr2e-4 | 0.430 ± 0.010" in md


def test_report_only_rebuilds_the_published_report_from_its_json(bench, tmp_path: Path) -> None:
    """The runs behind benchmarks/results/ need not be kept: --report-only rebuilds the report
    from the saved JSON, and today's rules give the published verdicts."""
    published = ROOT / "benchmarks" / "results" / "paper_miniature.json"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "paper_miniature.json").write_text(published.read_text())
    bench.main(
        ["--report-only", "--runs", str(tmp_path / "none"), "--results", str(tmp_path / "out")]
    )
    before = {c["claim"]: c["verdict"] for c in json.loads(published.read_text())["claims"]}
    res = json.loads((tmp_path / "out" / "paper_miniature.json").read_text())
    assert {c["claim"]: c["verdict"] for c in res["claims"]} == before
    assert res["command"] == "python benchmarks/paper_miniature.py --seeds 0 1 2"
    md = (tmp_path / "out" / "paper_miniature.md").read_text()
    assert "`dpo` is DPO trained at learning rate 0.001, `dpo_lr2e-4` at 0.0002" in md
    assert md == (ROOT / "benchmarks" / "results" / "paper_miniature.md").read_text()
    assert (tmp_path / "out" / "paper_miniature_methods.png").stat().st_size > 10_000


def test_memory_report_compares_memory_above_the_process_baseline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """benchmarks/memory.py's table on made-up measurements: ratios to full-model RTO and to
    LoRA PPO use the memory above what Python and the libraries take before any model is
    loaded."""
    spec = importlib.util.spec_from_file_location("memory", ROOT / "benchmarks" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "memory", memory)  # its dataclasses look their module up
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
    assert [p.name for p in planned] == ["task", "sft", "pairs", "rm", "dpo", "ppo", "rto"]
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
    for stage in ("ppo", "rto"):
        assert result["stages"][stage]["generated_tokens_per_second"] > 0
        assert result["stages"][stage]["train_tokens_per_second"] > 0
    assert all(result["stages"][s]["train_tokens_per_second"] > 0 for s in ("sft", "rm", "dpo"))
    table = (tmp_path / "tiny" / "gpu_check.md").read_text()
    assert "| rto |" in table and "generated tokens/s" in table


def test_same_results_tells_a_changed_number_from_a_changed_time(tmp_path: Path) -> None:
    """benchmarks/same_results.py (the before/after check of a refactor): runs that differ only
    in times and in their own folder agree; a changed metric, weight or text is a difference."""
    import torch
    from safetensors.torch import save_file

    same_results = load_script("same_results")

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
