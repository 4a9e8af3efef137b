"""Errors a user sees.

Every error raised for bad input is an `RtoError`: the CLI prints its message (no traceback) and
exits with status 2. A message says what was wrong, where (file, row, key) and what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    """The message for a user's file (data, config) that is not UTF-8: the line and byte where
    it stops being UTF-8, and the encoding it probably is instead."""
    start = exc.start
    line = data.count(b"\n", 0, start) + 1
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    bad = data[start : start + 4].hex(" ")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        guess, iconv = "UTF-16 (it starts with a UTF-16 byte-order mark)", "UTF-16"
    else:
        try:
            data.decode("cp1252")
            guess, iconv = "Windows-1252 or Latin-1", "CP1252"
        except UnicodeDecodeError:
            guess, iconv = "not a text encoding rto can guess", "ENCODING"
    return (
        f"file {path}, line {line}, byte {column} (offset {start}): not UTF-8 (bytes {bad}); the "
        f"file looks like {guess}. Save it as UTF-8, e.g. `iconv -f {iconv} -t UTF-8 {path} > "
        f"{path.with_name(path.stem + '.utf8' + path.suffix)}`"
    )


# Words the allocators use when memory runs out (torch.OutOfMemoryError on GPUs; a RuntimeError
# "DefaultCPUAllocator: can't allocate memory" on CPUs; MemoryError from Python itself).
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says that memory ran out (on a GPU or on the host)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _OUT_OF_MEMORY)


@contextmanager
def loading(what: str, source: str, hint: str = "") -> Iterator[None]:
    """Explain a failure to load `what` (a model, a tokenizer, an adapter) from `source`,
    keeping its cause: a file-system refusal (permissions, a full disk) stays the OSError it is,
    which the command line reports as such; running out of memory says so, with what to change;
    anything else says that `what` could not be loaded, in the cause's own words (+ `hint`)."""
    try:
        yield
    except RtoError:
        raise
    except OSError as exc:
        if isinstance(exc.errno, int) and not isinstance(exc, FileNotFoundError):
            raise
        raise ModelError(
            f"could not load the {what} from {source}: {type(exc).__name__}: {exc}.{hint}"
        ) from exc
    except Exception as exc:
        if out_of_memory(exc):
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise ModelError(
                f"out of memory while loading the {what} from {source} ({type(exc).__name__}: "
                f"{first}); free memory, load it in a smaller dtype (model.dtype bfloat16), train "
                "adapters (lora.r 16), or use a machine with more memory"
            ) from exc
        raise ModelError(
            f"could not load the {what} from {source}: {type(exc).__name__}: {exc}.{hint}"
        ) from exc
