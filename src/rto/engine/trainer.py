"""The training engine every stage shares.

`Engine` owns the accelerate set-up (one CPU, one GPU, DDP, DeepSpeed or FSDP, chosen by
`accelerate launch` and its config), optimisers, the learning-rate schedule, checkpoints and
`--resume`, metrics and the progress bar. `Engine.fit` is the supervised loop (SFT, reward
model, DPO family); the RL stage drives the same pieces from its own loop.

Data order is a pure function of (seed, epoch): each epoch is a seeded permutation, so a resumed
run sees exactly the batches the interrupted run would have seen.

One optimiser step is one global batch, whatever the micro-batch size and the number of
processes: a loss is summed over its items (tokens or pairs) in every micro-batch and divided by
the number of items in the whole step on all processes (what transformers calls
num_items_in_batch), so micro_batch_size and the process count change the arithmetic, not the
update. Logged metrics are the same global means.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from rto.engine.checkpoint import Checkpoints
from rto.engine.distributed import (
    init_distributed,
    load_models_whole,
    max_over_processes,
    shards_weights,
    sum_over_processes,
)
from rto.engine.faults import maybe_fault
from rto.engine.logger import MetricsLogger, write_summary
from rto.engine.run import RunFolder
from rto.engine.schedule import lr_at
from rto.engine.step import OptimizerStep
from rto.engine.trainable_state import checkpoint_trainable_only
from rto.errors import ConfigError, RtoError, TrainingError


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


def mixed_precision_mode(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


class Engine:
    def __init__(
        self,
        train: Any,
        log: Any,
        out_dir: Path,
        *,
        seed: int,
        run_config: dict[str, Any],
        progress_keys: tuple[str, ...] = ("loss",),
    ):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.train = train
        self.out = Path(out_dir)
        self.seed = seed
        world = init_distributed().num_processes  # before the Accelerator: one job, not N
        if train.batch_size % world:
            raise ConfigError(
                f"config key 'train.batch_size' ({train.batch_size}) must be a multiple of the number of "
                f"processes ({world}): each process takes an equal share of every batch"
            )
        share = train.batch_size // world
        # a recipe written for one process runs unchanged on several: a micro-batch larger than
        # a process's share shrinks to it (the update does not depend on the micro-batch size)
        self.micro_batch_size = min(train.micro_batch_size, share)
        if share % self.micro_batch_size:
            raise ConfigError(
                f"config key 'train.batch_size' ({train.batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size}) x processes ({world}) = "
                f"{self.micro_batch_size * world}"
            )
        self.accumulation = share // self.micro_batch_size
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision_mode(train.mixed_precision),
            gradient_accumulation_steps=self.accumulation,
            step_scheduler_with_optimizer=False,
        )
        checkpoint_trainable_only(self.accelerator)  # a LoRA checkpoint leaves out the base
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None:  # rto feeds batches itself: DeepSpeed learns their size here
            deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = self.micro_batch_size
            deepspeed.deepspeed_config["gradient_accumulation_steps"] = self.accumulation
            deepspeed.deepspeed_config["train_batch_size"] = train.batch_size
            load_models_whole(self.accelerator)
        set_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(self.accelerator.device)
        self.world = world
        self.rank = self.accelerator.process_index
        self.checkpoints = Checkpoints(self.out, self.accelerator, train.keep_checkpoints)
        self.log_cfg = log
        self.run_config = run_config
        self.progress_keys = progress_keys
        self.logger: MetricsLogger | None = None
        self.folder: RunFolder | None = None
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0

    @classmethod
    def for_stage(cls, cfg: Any, folder: RunFolder, progress_keys: tuple[str, ...]) -> Engine:
        """The engine of a training stage writing into `folder` (checked, not yet begun)."""
        engine = cls(
            cfg.train,
            cfg.log,
            folder.path,
            seed=cfg.seed,
            run_config=folder.config,
            progress_keys=progress_keys,
        )
        engine.folder = folder
        return engine

    def begin(self) -> Path:
        """Every input is validated and loaded: from here on the run writes into its folder (an
        old run there is replaced now, not earlier). Returns the folder."""
        self.folder.begin(is_main=self.is_main)
        self.accelerator.wait_for_everyone()  # no process writes before the folder is ready
        return self.out

    # ------------------------------------------------------------------ set-up helpers

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def optimizer(self, model: Any, lr: float | None = None) -> torch.optim.Optimizer:
        return self.optimizer_for_groups([(model, lr if lr is not None else self.train.lr)])

    def optimizer_for_groups(self, groups: list[tuple[Any, float]]) -> torch.optim.Optimizer:
        """AdamW with one parameter group per (model or list of parameters, learning rate)."""
        t = self.train
        param_groups = [
            {"params": [p for p in _parameters(model) if p.requires_grad], "lr": lr}
            for model, lr in groups
        ]
        return torch.optim.AdamW(
            param_groups,
            lr=groups[0][1],
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )

    def start_logging(self, total_steps: int) -> MetricsLogger:
        self.logger = MetricsLogger(
            self.out,
            self.log_cfg,
            enabled=self.is_main,
            total_steps=total_steps,
            run_config=self.run_config,
            progress_keys=self.progress_keys,
        )
        return self.logger

    def say(self, message: str) -> None:
        if self.logger is not None:
            self.logger.write(message)
        elif self.is_main:
            import sys

            print(message, file=sys.stderr, flush=True)

    def lr_at(self, step: int, total_steps: int, peak: float) -> float:
        t = self.train
        return lr_at(
            step,
            total_steps,
            peak,
            kind=t.schedule,
            warmup_ratio=t.warmup_ratio,
            min_ratio=t.min_lr_ratio,
        )

    def resume_or_start(self, resume: bool) -> dict[str, Any]:
        """Load the latest complete checkpoint when resuming; return its trainer state."""
        self.checkpoints.clean_partial()
        if not resume:
            return {"step": 0}
        latest = self.checkpoints.latest()
        state: dict[str, Any] = {"step": 0}
        if latest is None:
            self.say(
                f"[rto] --resume: no checkpoint in {self.checkpoints.root}; starting from the beginning"
            )
        else:
            try:
                state = self.checkpoints.load(latest)
            except Exception as exc:  # saved by another model: say so; config.yaml stays as made
                raise TrainingError(
                    f"the checkpoint {latest} does not fit this run ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200]}); --resume continues a run with the model "
                    f"and config it was made with ({self.out / 'config.yaml'}). Pass --overwrite "
                    "to start again instead"
                ) from None
            self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
            self.skipped_steps = state.get("skipped_steps", 0)
            self.say(f"[rto] resumed from {latest} (step {state['step']})")
        if self.folder is not None:  # the continued run is now this config's run
            self.folder.write_config(is_main=self.is_main)
        return state

    def save_checkpoint(self, step: int, extra: dict[str, Any] | None = None) -> None:
        state = {
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "skipped_steps": self.skipped_steps,
            **(extra or {}),
        }
        self.checkpoints.save(step, state)

    def record_step_health(self, finite: bool, step: int) -> None:
        """Count non-finite steps; stop with a clear error when they keep coming."""
        if finite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.skipped_steps += 1
        self.say(
            f"[rto] step {step}: non-finite loss or gradient; update skipped ({self.nonfinite_in_a_row} in a row)"
        )
        if self.nonfinite_in_a_row >= self.train.max_nonfinite:
            raise TrainingError(
                f"{self.nonfinite_in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient, so "
                "training stopped; lower train.lr, check the data for extreme rows, or use float32 "
                "(model.dtype float32, train.mixed_precision no). The last checkpoint is in "
                f"{self.checkpoints.root} and resumes with --resume"
            )

    def identical_on_every_process(self, *models: Any) -> dict[str, bool]:
        """{"weights_identical_across_processes": ...} when several processes each hold whole
        weights (DDP, ZeRO-1/2): a fingerprint of every parameter, compared exactly."""
        if self.world == 1 or shards_weights(self.accelerator):
            return {}
        params = [p for m in models for p in m.parameters()]
        fingerprint = torch.stack(
            [
                t
                for p in params
                for t in (p.detach().double().sum(), p.detach().double().square().sum())
            ]
        ).to(self.device)
        everyone = self.accelerator.gather(fingerprint.unsqueeze(0))
        return {"weights_identical_across_processes": bool((everyone == everyone[0]).all())}

    def clip_gradients(self, models: Sequence[Any], whole: Any = None) -> list[float | None]:
        """Clip each model's (or list of parameters') gradient norm to train.grad_clip; return
        the norms before clipping.

        Under FSDP the norm of a sharded gradient is the prepared model's (`whole`) business, so
        parts are clipped together; DeepSpeed clips inside its own step (gradient_clipping in its
        config, over all parameters) and reports the norm (None until its first step)."""
        from accelerate.utils import DistributedType

        max_norm = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        if whole is not None and self.accelerator.distributed_type == DistributedType.FSDP:
            models = [whole]
        norms = [self.accelerator.clip_grad_norm_(list(_parameters(m)), max_norm) for m in models]
        return [None if n is None else float(n) for n in norms]

    def check_finite_weights(self, model: Any, step: int, what: str = "model") -> None:
        """A model whose weights hold NaN or inf is never saved as a result: stop with an error."""
        params = [(n, p) for n, p in model.named_parameters() if p.numel()]
        finite = (
            torch.stack([torch.isfinite(p.detach()).all() for _, p in params]) if params else None
        )
        bad = [] if finite is None else [n for (n, _), ok in zip(params, finite.tolist()) if not ok]
        if self.any_true(bool(bad)):
            shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
            if self.nonfinite_in_a_row >= step:  # not one update applied: they came in broken
                why = (
                    "No update was applied (every step was skipped), so the weights were broken "
                    "when loaded: check model.path"
                )
            else:
                why = "Lower train.lr (or check the data for extreme rows), then rerun with --overwrite"
            raise TrainingError(
                f"after step {step} the {what}'s weights hold NaN or inf ({shown or 'on another process'}), "
                f"so it was not saved. {why}"
            )

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

    def any_true(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

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
        if n_examples < self.train.batch_size:
            raise RtoError(
                f"only {n_examples} training examples for train.batch_size {self.train.batch_size}; "
                "lower train.batch_size (and train.micro_batch_size) or add data"
            )
        return n_examples // self.train.batch_size

    def total_steps(self, n_examples: int) -> int:
        if self.train.max_steps:
            return self.train.max_steps
        return max(1, int(math.floor(self.train.epochs * self.steps_per_epoch(n_examples))))

    def batch_indices(self, step: int, n_examples: int, batch_size: int | None = None) -> list[int]:
        """This process's share of global batch `step`, in a seeded per-epoch order."""
        b = batch_size or self.train.batch_size
        spe = max(1, n_examples // b)
        if n_examples < b:
            raise RtoError(
                f"only {n_examples} examples for a batch of {b}; lower the batch size or add data"
            )
        epoch, within = divmod(step, spe)
        order = list(range(n_examples))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        batch = order[within * b : (within + 1) * b]
        share = b // self.world
        return batch[self.rank * share : (self.rank + 1) * share]

    def micro_batches(self, indices: Sequence[int]) -> list[list[int]]:
        m = self.micro_batch_size
        return [list(indices[i : i + m]) for i in range(0, len(indices), m)]

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }

    @property
    def micro_loss_factor(self) -> int:
        """accelerate divides each micro-batch loss by the accumulation steps, and DDP / DeepSpeed
        / FSDP average gradients over processes. A micro-batch loss that is already its share of
        the step's global mean (summed over its items, divided by the items of the whole step on
        all processes) is multiplied by this, so that the gradient is that of the global mean."""
        return self.accumulation * self.world

    def loss_scale(self, items_in_step: float) -> float:
        """The factor that turns a micro-batch's summed loss into its share of the step's mean."""
        return self.micro_loss_factor / max(items_in_step, 1.0)

    # ------------------------------------------------------------------ supervised loop

    def fit(
        self,
        model: Any,
        examples: list[Any],
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        objective: Objective,
        *,
        resume: bool,
        evaluate: Callable[[Any], dict[str, float]] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Train `model` on `examples`; returns the (prepared) model and the final metrics.

        Each step's loss is the mean over the objective's items (tokens or pairs) of the whole
        global batch; every logged number is that global mean, the same on every process."""
        t = self.train
        total = self.total_steps(len(examples))
        optimizer = self.optimizer(model)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        step_taker = OptimizerStep(self, optimizer, [(model, t.lr)])
        state = self.resume_or_start(resume)
        start = state["step"]
        logger = self.start_logging(total)
        logger.start_at(start)
        last_metrics: dict[str, Any] = {}
        began = time.time()
        trained_tokens = 0.0
        for step in range(start, total):
            lr = step_taker.start(step, total)
            sums: dict[str, float] = defaultdict(float)
            micro = [
                collate([examples[i] for i in ids])
                for ids in self.micro_batches(self.batch_indices(step, len(examples)))
            ]
            local_items = sum(float(objective.count(b)) for b in micro)
            items = sum_over_processes({"items": local_items})["items"]
            scale = self.loss_scale(items)
            model.train()
            for batch in micro:
                batch = self.to_device(batch)
                with self.accelerator.accumulate(model):
                    with self.accelerator.autocast():
                        loss_sum, metric_sums = objective(model, batch)
                    step_taker.backward(loss_sum * scale)
                sums["loss"] += float(loss_sum.detach())  # a skipped step logs its NaN, never 0
                for k, v in metric_sums.items():
                    sums[k] += float(v)
                if "attention_mask" in batch:
                    sums["_tokens"] += float(batch["attention_mask"].sum())
            finite = step_taker.finish(step + 1)  # counted from 1, as metrics.jsonl's steps
            sums = sum_over_processes(sums)
            trained_tokens += sums.pop("_tokens")
            row: dict[str, Any] = {k: v / items for k, v in sums.items()}
            if objective.unit == "tokens":
                row["tokens"] = items
            if not finite:
                row["skipped"] = True
            grad_norm = step_taker.grad_norm
            row.update(
                {
                    "lr": lr,
                    "grad_norm": float("nan") if grad_norm is None else grad_norm,
                    "epoch": (step + 1) / self.steps_per_epoch(len(examples)),
                }
            )

            def held_out(model: Any = model) -> dict[str, float]:
                metrics = {f"eval/{k}": v for k, v in evaluate(model).items()}
                model.train()
                return metrics

            self.end_step(step + 1, total, row, evaluate=held_out if evaluate else None)
            last_metrics = row
        seconds = time.time() - began
        self.check_finite_weights(model, total)
        final: dict[str, Any] = {f"train/{k}": v for k, v in last_metrics.items()}
        if evaluate is not None:
            final.update({f"eval/{k}": v for k, v in evaluate(model).items()})
            logger.log(total, {k: v for k, v in final.items() if k.startswith("eval/")})
        final.update(
            {
                "steps": total,
                "skipped_steps": self.skipped_steps,
                "train_seconds": round(seconds, 1),
                # real (not padding) tokens through training forward passes, all processes
                "train_tokens_per_second": round(trained_tokens / max(seconds, 1e-9), 1),
                **self.identical_on_every_process(model),
            }
        )
        return model, final


def _parameters(model_or_parameters: Any) -> Any:
    """A module's parameters, or a list of parameters as it is."""
    if isinstance(model_or_parameters, torch.nn.Module):
        return model_or_parameters.parameters()
    return model_or_parameters
