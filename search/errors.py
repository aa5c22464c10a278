"""The one error type the command lines turn into a one-line message and exit code 2."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """Bad input from the user (flag, study file, storage URL, data): message is one line, exit code 2."""
