"""Errors a user sees.

Every error raised for bad input is an `RtoError`: the CLI prints its message (no traceback) and
exits with status 2. A message says what was wrong, where (file, row, key) and what to do.
"""

from __future__ import annotations


class RtoError(Exception):
    """A problem with the user's input or environment, explained for the user."""


class ConfigError(RtoError):
    """A config key that is unknown, of the wrong type or out of range."""


class DataError(RtoError):
    """A dataset file, row or column that cannot be used."""


class ModelError(RtoError):
    """A model or tokenizer that cannot be loaded or used together with another."""


class TrainingError(RtoError):
    """Training cannot continue (for example, losses keep coming out non-finite)."""
