"""The stages rto can run, and the one rule for running one, shared by `rto <stage>` and
`rto pipeline` (cli.py and pipeline.py sit above this module and import it).

A stage is named by its config class and its run function ("module:name" strings), so that this
registry, and `rto --help` built from it, import neither torch nor transformers; a stage's module
is imported only when it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Stage:
    name: str
    config: str  # "module:Class"
    runner: str  # "module:function"
    help: str

    def config_class(self) -> type:
        module, cls = self.config.split(":")
        return getattr(importlib.import_module(module), cls)

    def run_function(self) -> Callable[..., Any]:
        module, fn = self.runner.split(":")
        return getattr(importlib.import_module(module), fn)


STAGES = [
    Stage("sft", "rto.config.stages:SFTConfig", "rto.stages.sft:run", "Supervised fine-tuning of a causal LM."),
    Stage("pairs", "rto.config.stages:PairsConfig", "rto.stages.pairs:run",
          "Preference pairs: sample k responses per prompt, judge with a gold reward, label with a simulated annotator."),
    Stage("rm", "rto.config.stages:RMConfig", "rto.stages.rm:run", "Train a Bradley-Terry reward model (sequence classifier)."),
    Stage("dpo", "rto.config.stages:DPOConfig", "rto.stages.dpo:run", "Train the DPO family: dpo, ipo, rdpo, simpo, tdpo."),
    Stage("rl", "rto.config.stages:RLConfig", "rto.stages.rl:run",
          "Online RL with token-level rewards: RTO, PPO and the paper's variants (--preset)."),
    Stage("eval", "rto.config.stages:EvalConfig", "rto.stages.eval:run",
          "Compare policies: gold reward, RM score, KL, fluency, length, distinct-n, win rates; exports."),
    Stage("report", "rto.config.stages:ReportConfig", "rto.stages.report:run",
          "results.json, results.md and plots from an eval run and RL curves."),
]  # fmt: skip
# Built-in tasks (`rto task <name>`, pipeline `stage: task, task: <name>`); a task stage's run
# function takes (config, task name).
TASK_STAGES = {
    "sentiment": Stage(
        "sentiment",
        "rto.config.stages:SentimentTaskConfig",
        "rto.stages.task:run",
        "Short reviews from a grammar; gold reward = VADER compound score; tiny Llama base model.",
    )
}
# report reads files and draws plots: one process is enough. Task stages also run on the main
# process only; every other stage runs on every process and splits its work.
MAIN_PROCESS_ONLY = {"report"}


def find_stage(kind: str, task: str | None = None) -> Stage:
    """The stage of a kind ("sft", ..., or "task" with the task's name)."""
    if kind == "task":
        return TASK_STAGES[task or ""]
    return next(s for s in STAGES if s.name == kind)


def quiet_loading(cfg: Any) -> None:
    """Model loading draws progress bars (GGUF de-quantisation) only when log.progress is on."""
    log = getattr(cfg, "log", None)
    if log is not None:
        from rto.models.load import show_load_progress

        show_load_progress(log.progress)


def publish(cfg: Any) -> None:
    """--push_to_hub: upload the finished output folder (main process only), once every process
    has finished the stage."""
    repo = getattr(cfg, "push_to_hub", None)
    if not repo:
        return
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        from rto.engine.card import push_to_hub

        print(f"[rto] uploaded {cfg.out} to {push_to_hub(cfg.out, repo)}", flush=True)


def run_stage(kind: str, cfg: Any, task: str | None = None, *,
              on_begin: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Run one stage with its validated config, on the processes it runs on: a task stage and
    the MAIN_PROCESS_ONLY stages on the main process while the others wait, every other stage on
    every process. Its output folder is checked first (`RunFolder.check`: nothing is written
    yet); `on_begin` is called when the stage begins writing into it. Model loading is
    quietened before, and the output is published after."""
    from rto.engine.run import RunFolder

    quiet_loading(cfg)
    folder = RunFolder.check(cfg, f"task {task}" if kind == "task" else kind)
    folder.on_begin = on_begin
    if folder.done:  # --resume of a run that finished with this config
        folder.finished_summary()
        return
    fn = find_stage(kind, task).run_function()
    if kind == "task" or kind in MAIN_PROCESS_ONLY:
        from rto.engine.distributed import on_main_process

        on_main_process(fn, cfg, folder, *([task] if kind == "task" else []))
    else:
        fn(cfg, folder)
    publish(cfg)
