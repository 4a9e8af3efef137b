"""Experiment trackers (TensorBoard, Weights & Biases, trackio, MLflow) as mirrors of
`metrics.jsonl`, through accelerate's tracker classes (`accelerate.tracking`).

`metrics.jsonl` stays the source of truth: a tracker gets the same rows, at the same steps, only
after the row is on disk, and a tracker that fails cannot lose a logged number. Tags are
namespaced as the summary's are: a training number `loss` is `train/loss`; keys that carry their
own namespace (`eval/...`, `rollout/...`, `policy/...`) keep it. Trackers run on the main process
only (the rows are already global means over processes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tag(key: str) -> str:
    """The tracker's name for a metrics.jsonl key: `loss` -> `train/loss`; `eval/x` stays."""
    return key if "/" in key else f"train/{key}"


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The run's nested config as dotted keys with scalar values (what every tracker's
    hyper-parameter table takes): lists become text, None the text "none"."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = "none" if v is None else str(v)
    return out


def _build(name: str, out: Path, project: str, run_name: str) -> Any:
    from accelerate import tracking

    if name == "tensorboard":  # OUT/tensorboard/RUN_NAME
        return tracking.TensorBoardTracker(run_name, str(out / "tensorboard"))
    if name == "wandb":
        return tracking.WandBTracker(project, name=run_name, dir=str(out))
    if name == "trackio":
        return tracking.TrackioTracker(project, name=run_name)
    # MLflow: the tracking URI is the user's (MLFLOW_TRACKING_URI; mlflow's default ./mlruns)
    return tracking.MLflowTracker(experiment_name=project, run_name=run_name)


class Trackers:
    """The trackers of one training run (main process)."""

    def __init__(self, names: list[str], out: Path, project: str, run_name: str,
                 config: dict[str, Any]):  # fmt: skip
        self.names = names
        self.trackers = []
        for name in names:
            tracker = _build(name, Path(out), project, run_name)
            tracker.start()
            tracker.store_init_configuration(flat_config(config))
            self.trackers.append(tracker)

    def log(self, row: dict[str, Any], step: int) -> None:
        """One metrics.jsonl row: its numbers (NaN and inf included, as logged), tags namespaced."""
        values = {
            tag(k): float(v)
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
