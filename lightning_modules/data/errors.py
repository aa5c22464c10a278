"""The one exception type for data problems, so callers can stop a study before any training starts."""

from __future__ import annotations

from lightning_modules.config import ConfigError

__all__ = ["DataConfigError", "DataError"]


class DataError(ValueError):
    """A data problem (missing or corrupt files, mismatched classes, failed download, bad settings).

    The message is a single line that says what was wrong and how to fix it, so a CLI can print it as is.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class DataConfigError(DataError, ConfigError):
    """An invalid ``DataConfig`` value: both a ``DataError`` and the platform's ``ConfigError``."""
