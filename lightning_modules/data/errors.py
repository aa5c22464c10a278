"""The one exception type for data problems, so callers can stop a study before any training starts."""

from __future__ import annotations

import re

from lightning_modules.config import ConfigError

__all__ = ["DataConfigError", "DataError"]


class DataError(ValueError):
    """A data problem (missing or corrupt files, mismatched classes, failed download, bad settings).

    The message is a single line that says what was wrong and how to fix it, so a CLI can print it as is.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(_unwrap_worker_error(str(message)).split()))


# How torch re-raises an exception from a DataLoader worker (``torch._utils.ExceptionWrapper.reraise``): the
# same type, built from "Caught <type> in DataLoader worker process <n>.\nOriginal Traceback ..." followed by
# the worker's whole traceback, whose last line is "<module>.<type>: <the original message>".
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _unwrap_worker_error(message: str) -> str:
    """The original one-line message of a ``DataError`` re-raised from a DataLoader worker (joined into one
    line, the traceback read as a 2,000-character message naming the file somewhere in its middle), else
    ``message``."""
    caught = _WORKER_ERROR.match(message)
    if caught is None:
        return message
    raised = re.findall(rf"^(?:[\w.]+\.)?{caught[1]}: (.*)$", message, re.MULTILINE)
    return f"{raised[-1]} (in a DataLoader worker)" if raised else message


class DataConfigError(DataError, ConfigError):
    """An invalid ``DataConfig`` value: both a ``DataError`` and the platform's ``ConfigError``."""
