"""Data order: which examples each optimiser step trains on, as a pure function of the seed.

Each epoch is a seeded permutation of the examples (`models.seeded.stream_seed(seed,
"epoch_order", epoch)`), cut into global batches; a process takes its contiguous share of each
batch. A resumed run therefore sees exactly the batches the interrupted run would have seen, and
the same batches are trained on whatever the process count.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from rto.errors import RtoError
from rto.models.seeded import stream_seed


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Optimiser steps in one pass over `n_examples`, or an error when not one batch fits."""
    if n_examples < batch_size:
        raise RtoError(
            f"only {n_examples} training examples for train.batch_size {batch_size}; "
            "lower train.batch_size (and train.micro_batch_size) or add data"
        )
    return n_examples // batch_size


def total_steps(train: Any, n_examples: int) -> int:
    """train.max_steps, or train.epochs passes over the data (at least one step)."""
    if train.max_steps:
        return train.max_steps
    return max(1, int(math.floor(train.epochs * steps_per_epoch(n_examples, train.batch_size))))


def batch_indices(seed: int, step: int, n_examples: int, batch_size: int, rank: int,
                  world: int) -> list[int]:  # fmt: skip
    """Process `rank`'s share of global batch `step` (of `batch_size` examples), in the seeded
    order of that step's epoch."""
    if n_examples < batch_size:
        raise RtoError(
            f"only {n_examples} examples for a batch of {batch_size}; lower the batch size or add data"
        )
    epoch, within = divmod(step, max(1, n_examples // batch_size))
    order = list(range(n_examples))
    random.Random(stream_seed(seed, "epoch_order", epoch)).shuffle(order)
    batch = order[within * batch_size : (within + 1) * batch_size]
    share = batch_size // world
    return batch[rank * share : (rank + 1) * share]


def micro_batches(indices: Sequence[Any], size: int) -> list[list[Any]]:
    """`indices` in consecutive micro-batches of at most `size`."""
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]
