"""Resume and health: what a run counts about its steps, keeps in its checkpoints and checks
before it saves a model.

    StepHealth          each trained module's skipped steps (a non-finite loss or gradient):
                        counted, said, and fatal after train.max_nonfinite in a row
    resume_state        the latest complete checkpoint loaded on --resume (weights, optimisers,
                        random generators, and each module's health), or a fresh start
    check_finite_weights   a model holding NaN or inf is never saved as a result
    identical_on_every_process   the weights fingerprint compared across processes
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rto.errors import TrainingError
from rto.models.placement import shards_weights

Say = Callable[[str], None]


class StepHealth:
    """Skipped steps of one trained module (`what`: "model" for a stage's trained model). A step whose loss or gradient is not finite on any
    process is skipped (no update); `max_nonfinite` of them in a row stop the run with an error
    that says what to lower (`lr_key`) and where the last checkpoint is."""

    def __init__(self, what: str, lr_key: str, max_nonfinite: int, say: Say, checkpoints: Any):
        self.what, self.lr_key, self.max_nonfinite = what, lr_key, max_nonfinite
        self.say, self.checkpoints = say, checkpoints
        self.in_a_row = 0
        self.skipped = 0

    def record(self, finite: bool, label: int) -> None:
        """Count step `label` (as metrics.jsonl numbers it) as taken or skipped."""
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        where = "" if self.what == "model" else f" in the {self.what}"
        self.say(
            f"[rto] step {label}: non-finite loss or gradient{where}; update skipped "
            f"({self.in_a_row} in a row)"
        )
        if self.in_a_row >= self.max_nonfinite:
            raise TrainingError(
                f"{self.in_a_row} steps in a row (up to step {label}) had a non-finite loss or gradient{where}, "
                f"so training stopped; lower {self.lr_key}, check the data for extreme rows, or use "
                "float32 (model.dtype float32, train.mixed_precision no). The last checkpoint is in "
                f"{self.checkpoints.root} and resumes with --resume"
            )

    def state(self) -> dict[str, int]:
        return {"nonfinite_in_a_row": self.in_a_row, "skipped_steps": self.skipped}

    def load(self, state: dict[str, Any]) -> None:
        self.in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.skipped = int(state.get("skipped_steps", 0))


def resume_state(checkpoints: Any, resume: bool, say: Say, out: Any) -> dict[str, Any]:
    """The trainer state of the latest complete checkpoint, loaded (weights, optimisers and
    random generators into what accelerate prepared), on --resume; {"step": 0} otherwise. A
    checkpoint that another model or config made is refused, naming --overwrite."""
    checkpoints.clean_partial()
    if not resume:
        return {"step": 0}
    latest = checkpoints.latest()
    if latest is None:
        say(f"[rto] --resume: no checkpoint in {checkpoints.root}; starting from the beginning")
        return {"step": 0}
    try:
        state = checkpoints.load(latest)
    except Exception as exc:  # saved by another model: say so; config.yaml stays as made
        raise TrainingError(
            f"the checkpoint {latest} does not fit this run ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); --resume continues a run with the model "
            f"and config it was made with ({out / 'config.yaml'}). Pass --overwrite "
            "to start again instead"
        ) from exc
    say(f"[rto] resumed from {latest} (step {state['step']})")
    return state


def check_finite_weights(model: Any, step: int, what: str, health: StepHealth,
                         any_true: Callable[[bool], bool]) -> None:  # fmt: skip
    """Stop with an error when `model`'s weights hold NaN or inf after step `step`: a broken
    model is never saved as a result. `any_true` tells whether any process found one."""
    params = [(n, p) for n, p in model.named_parameters() if p.numel()]
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]) if params else None
    bad = [] if finite is None else [n for (n, _), ok in zip(params, finite.tolist()) if not ok]
    if not any_true(bool(bad)):
        return
    shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
    if health.in_a_row >= step:  # not one update applied: they came in broken
        why = (
            "No update was applied (every step was skipped), so the weights were broken when "
            "loaded: check model.path"
        )
    else:
        why = f"Lower {health.lr_key} (or check the data for extreme rows), then rerun with --overwrite"
    raise TrainingError(
        f"after step {step} the {what}'s weights hold NaN or inf ({shown or 'on another process'}), "
        f"so it was not saved. {why}"
    )


def identical_on_every_process(accelerator: Any, models: Sequence[Any]) -> dict[str, bool]:
    """{"weights_identical_across_processes": ...} when several processes each hold whole
    weights (DDP, ZeRO-1/2): a fingerprint of every parameter, compared exactly."""
    if accelerator.num_processes == 1 or shards_weights(accelerator):
        return {}
    params = [p for m in models for p in m.parameters()]
    fingerprint = torch.stack(
        [t for p in params for t in (p.detach().double().sum(), p.detach().double().square().sum())]
    ).to(accelerator.device)
    everyone = accelerator.gather(fingerprint.unsqueeze(0))
    return {"weights_identical_across_processes": bool((everyone == everyone[0]).all())}
