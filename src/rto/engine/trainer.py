"""The training engine every stage shares, in named parts:

    set-up          engine/setup.py: the Accelerator (one CPU, one GPU, DDP, DeepSpeed or FSDP,
                    chosen by `accelerate launch`), the split of a global batch into processes
                    and micro-batches
    optimisation    engine/optimise.py: `Optimised`, a trained module with its optimiser,
                    schedule, clipping and step health; its `step` is every training loop's step
    resume / health engine/resume.py: skipped-step counts, --resume, weights checks
    data order      engine/data_order.py: each step's examples, a pure function of the seed

`Engine` holds one stage run's parts (its folder, checkpoints, metrics and progress bar) and
`Engine.fit` is the supervised loop (SFT, reward model, DPO family); the RL stage steps its
modules through the same `Optimised.step` from its own loop.

One optimiser step is one global batch, whatever the micro-batch size and the number of
processes: a loss is summed over its items (tokens or pairs) in every micro-batch and divided by
the number of items in the whole step on all processes (what transformers calls
num_items_in_batch), so micro_batch_size and the process count change the arithmetic, not the
update. Logged metrics are the same global means.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from rto.engine import data_order
from rto.engine.checkpoint import Checkpoints
from rto.engine.distributed import init_distributed, max_over_processes, sum_over_processes
from rto.engine.faults import maybe_fault
from rto.engine.logger import MetricsLogger, write_summary
from rto.engine.optimise import Optimised, adamw
from rto.engine.resume import (
    StepHealth,
    check_finite_weights,
    identical_on_every_process,
    resume_state,
)
from rto.engine.run import RunFolder
from rto.engine.schedule import lr_at
from rto.engine.setup import batch_plan, make_accelerator


class Objective(Protocol):
    """A supervised loss as `Engine.fit` uses it: summed over items; the engine divides.

    unit:     what the loss is a mean over: "tokens" (SFT) or "pairs" (reward model, DPO family)
    count:    how many such items a collated micro-batch holds
    __call__: (the loss summed over the micro-batch's items, metrics summed over them); the
              engine divides both by the item count of the whole optimiser step"""

    unit: str

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | int: ...

    def __call__(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]: ...


class Engine:
    """One training stage run: its accelerator and batch plan, the modules it optimises, its
    folder, checkpoints, step health, metrics and progress bar."""

    def __init__(self, train: Any, log: Any, out_dir: Path, *, seed: int, run_config: dict[str, Any],
                 progress_keys: tuple[str, ...] = ("loss",)):  # fmt: skip
        self.train = train
        self.out = Path(out_dir)
        self.seed = seed
        # the process count before the Accelerator: one job, not N
        self.plan = batch_plan(train, init_distributed().num_processes)
        self.accelerator = make_accelerator(train, self.plan, seed)
        self.world = self.plan.world
        self.micro_batch_size = self.plan.micro_batch_size
        self.accumulation = self.plan.accumulation
        self.rank = self.accelerator.process_index
        self.checkpoints = Checkpoints(self.out, self.accelerator, train.keep_checkpoints)
        self.log_cfg = log
        self.run_config = run_config
        self.progress_keys = progress_keys
        self.logger: MetricsLogger | None = None
        self.folder: RunFolder | None = None
        # the stage's trained model's health, then any other optimised module's by name
        self.health = StepHealth(
            "model", "train.lr", train.max_nonfinite, self.say, self.checkpoints
        )
        self.other_health: dict[str, StepHealth] = {}

    @classmethod
    def for_stage(cls, cfg: Any, folder: RunFolder, progress_keys: tuple[str, ...]) -> Engine:
        """The engine of a training stage writing into `folder` (checked, not yet begun)."""
        engine = cls(cfg.train, cfg.log, folder.path, seed=cfg.seed, run_config=folder.config,
                     progress_keys=progress_keys)  # fmt: skip
        engine.folder = folder
        return engine

    def begin(self) -> Path:
        """Every input is validated and loaded: from here on the run writes into its folder (an
        old run there is replaced now, not earlier). Returns the folder."""
        self.folder.begin(is_main=self.is_main)
        self.accelerator.wait_for_everyone()  # no process writes before the folder is ready
        return self.out

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def micro_loss_factor(self) -> int:
        """The factor that turns a loss already divided by the step's global item count into
        what each micro-batch backpropagates (setup.BatchPlan.micro_loss_factor)."""
        return self.plan.micro_loss_factor

    def loss_scale(self, items_in_step: float) -> float:
        """The factor that turns a micro-batch's summed loss into its share of the step's mean."""
        return self.micro_loss_factor / max(items_in_step, 1.0)

    # ------------------------------------------------------------------ optimisation

    def optimised(self, module: Any, groups: Sequence[tuple[Any, float]], *, name: str | None = None,
                  what: str = "model", lr_key: str = "train.lr", weight_decay: float | None = None,
                  context: Callable[[], Any] | None = None) -> Optimised:  # fmt: skip
        """`module` with a new AdamW (a group per (part, peak learning rate)), prepared by
        accelerate together. The stage's trained model has no `name`; another optimised module
        (the online token-reward model) is named, and has its own step health (`what` and
        `lr_key` name it in errors), kept in the checkpoints under that name. `module` None:
        the groups are parameters inside a module prepared already (see engine/optimise.py)."""
        optimizer = adamw(self.train, groups, weight_decay)
        if module is not None:
            with _no_second_engine_note():
                module, optimizer = self.accelerator.prepare(module, optimizer)
        health = self.health
        if name is not None:
            health = StepHealth(what, lr_key, self.train.max_nonfinite, self.say, self.checkpoints)
            self.other_health[name] = health
        kwargs = {"context": context} if context is not None else {}
        return Optimised(self, module, optimizer, groups, health, **kwargs)

    def lr_at(self, step: int, total_steps: int, peak: float) -> float:
        t = self.train
        return lr_at(step, total_steps, peak, kind=t.schedule, warmup_ratio=t.warmup_ratio,
                     min_ratio=t.min_lr_ratio)  # fmt: skip

    # ------------------------------------------------------------------ logging

    def start_logging(self, total_steps: int) -> MetricsLogger:
        self.logger = MetricsLogger(self.out, self.log_cfg, enabled=self.is_main, total_steps=total_steps,
                                    run_config=self.run_config, progress_keys=self.progress_keys)  # fmt: skip
        return self.logger

    def say(self, message: str) -> None:
        if self.logger is not None:
            self.logger.write(message)
        elif self.is_main:
            import sys

            print(message, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ resume and health

    def resume_or_start(self, resume: bool) -> dict[str, Any]:
        """Load the latest complete checkpoint when resuming (every prepared module, optimiser
        and registered state, and each module's step health); return its trainer state."""
        state = resume_state(self.checkpoints, resume, self.say, self.out)
        self.health.load(state)
        for name, health in self.other_health.items():
            health.load(state.get("health", {}).get(name, {}))
        if resume and self.folder is not None:  # the continued run is now this config's run
            self.folder.write_config(is_main=self.is_main)
        return state

    def save_checkpoint(self, step: int, extra: dict[str, Any] | None = None) -> None:
        state: dict[str, Any] = {**self.health.state(), **(extra or {})}
        if self.other_health:
            state["health"] = {name: h.state() for name, h in self.other_health.items()}
        self.checkpoints.save(step, state)

    @property
    def skipped_steps(self) -> int:
        return self.health.skipped

    def check_finite_weights(self, model: Any, step: int, what: str = "model") -> None:
        """A model whose weights hold NaN or inf is never saved as a result: stop with an error."""
        check_finite_weights(model, step, what, self.health, self.any_true)

    def identical_on_every_process(self, *models: Any) -> dict[str, bool]:
        return identical_on_every_process(self.accelerator, models)

    def any_true(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def end_step(self, done: int, total: int, row: dict[str, Any], *,
                 evaluate: Callable[[], dict[str, float]] | None = None,
                 state: Callable[[], dict[str, Any]] | None = None) -> None:  # fmt: skip
        """After step `done` of `total` (counted from 1), in every training loop: held-out
        metrics every train.eval_every steps (added to `row`; the last step's are the caller's),
        the row logged every train.log_every steps and at the end, a checkpoint every
        train.save_every steps (with the loop's own `state()`), then the fault hook the kill
        tests use."""
        t = self.train
        if evaluate is not None and t.eval_every and done % t.eval_every == 0 and done < total:
            row.update(evaluate())
        if done % t.log_every == 0 or done == total:
            self.logger.log(done, row)
        self.logger.advance()
        if t.save_every and done % t.save_every == 0 and done < total:
            self.save_checkpoint(done, state() if state is not None else None)
        maybe_fault("kill_after_step", done)

    def finish(self, summary: dict[str, Any], *, keep_checkpoints: bool = False) -> None:
        if not keep_checkpoints:
            self.checkpoints.remove_all()
        if torch.cuda.is_available():  # the stage's peak, on the process that needed most
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            summary["peak_gpu_memory_gib"] = round(max_over_processes(peak), 2)
        if self.is_main:
            write_summary(self.out, summary)
        if self.logger is not None:
            self.logger.close()

    # ------------------------------------------------------------------ data order

    def steps_per_epoch(self, n_examples: int) -> int:
        return data_order.steps_per_epoch(n_examples, self.train.batch_size)

    def total_steps(self, n_examples: int) -> int:
        return data_order.total_steps(self.train, n_examples)

    def batch_indices(self, step: int, n_examples: int, batch_size: int | None = None) -> list[int]:
        """This process's share of global batch `step`, in a seeded per-epoch order."""
        return data_order.batch_indices(self.seed, step, n_examples, batch_size or self.train.batch_size,
                                        self.rank, self.world)  # fmt: skip

    def micro_batches(self, indices: Sequence[Any]) -> list[list[Any]]:
        return data_order.micro_batches(indices, self.micro_batch_size)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }

    # ------------------------------------------------------------------ supervised loop

    def fit(self, model: Any, examples: list[Any], collate: Callable[[list[Any]], dict[str, torch.Tensor]],
            objective: Objective, *, resume: bool,
            evaluate: Callable[[Any], dict[str, float]] | None = None) -> tuple[Any, dict[str, Any]]:  # fmt: skip
        """Train `model` on `examples`; returns the (prepared) model and the final metrics.

        Each step's loss is the mean over the objective's items (tokens or pairs) of the whole
        global batch; every logged number is that global mean, the same on every process."""
        total = self.total_steps(len(examples))
        trained = self.optimised(model, [(model, self.train.lr)])
        model = trained.module
        start = self.resume_or_start(resume)["step"]
        logger = self.start_logging(total)
        logger.start_at(start)

        def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
            batch = self.to_device(batch)
            loss_sum, metric_sums = objective(model, batch)
            # a skipped step logs its NaN, never 0; real (not padding) tokens counted for speed
            tokens = batch["attention_mask"].sum() if "attention_mask" in batch else 0.0
            return loss_sum, {"loss": loss_sum, **metric_sums, "_tokens": tokens}

        def held_out() -> dict[str, float]:
            metrics = {f"eval/{k}": v for k, v in evaluate(model).items()}
            model.train()
            return metrics

        last_metrics: dict[str, Any] = {}
        began, trained_tokens = time.time(), 0.0
        for step in range(start, total):
            micro = [collate([examples[i] for i in ids])
                     for ids in self.micro_batches(self.batch_indices(step, len(examples)))]  # fmt: skip
            local_items = sum(float(objective.count(b)) for b in micro)
            items = sum_over_processes({"items": local_items})["items"]
            model.train()
            # counted from 1, as metrics.jsonl's steps
            result = trained.step(
                step, total, micro, loss_fn, scale=self.loss_scale(items), label=step + 1
            )
            sums = sum_over_processes(result.sums)
            trained_tokens += sums.pop("_tokens")
            row: dict[str, Any] = {k: v / items for k, v in sums.items()}
            if objective.unit == "tokens":
                row["tokens"] = items
            if not result.finite:
                row["skipped"] = True
            row.update({"lr": result.lr, "grad_norm": float("nan") if result.grad_norm is None else result.grad_norm,
                        "epoch": (step + 1) / self.steps_per_epoch(len(examples))})  # fmt: skip
            self.end_step(step + 1, total, row, evaluate=held_out if evaluate else None)
            last_metrics = row
        seconds = time.time() - began
        self.check_finite_weights(model, total)
        final: dict[str, Any] = {f"train/{k}": v for k, v in last_metrics.items()}
        if evaluate is not None:
            final.update({f"eval/{k}": v for k, v in evaluate(model).items()})
            logger.log(total, {k: v for k, v in final.items() if k.startswith("eval/")})
        final.update({
            "steps": total, "skipped_steps": self.skipped_steps, "train_seconds": round(seconds, 1),
            # real (not padding) tokens through training forward passes, all processes
            "train_tokens_per_second": round(trained_tokens / max(seconds, 1e-9), 1),
            **self.identical_on_every_process(model),
        })  # fmt: skip
        return model, final


class _SecondEngineNote(logging.Filter):
    """accelerate warns, when it prepares a second model under DeepSpeed, that its `backward`
    will still drive the first one; rto steps each DeepSpeed engine itself (engine/optimise.py),
    so the note says nothing to an rto user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "wrapped DeepSpeed engine reference" not in record.getMessage()


@contextlib.contextmanager
def _no_second_engine_note() -> Iterator[None]:
    logger = logging.getLogger("accelerate.accelerator")
    note = _SecondEngineNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)
