"""Bad user input: one error type, the argparse parser that raises it, and the ``main`` wrapper that turns it
into one ``error: ...`` line on stderr and exit code 2 (argparse itself would print the whole usage)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = ["UsageError", "UsageParser", "at_least", "check_at_least", "cli_main"]


class UsageError(Exception):
    """Bad input from the user (flag, study file, storage URL, data): message is one line, exit code 2."""


class UsageParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def check_at_least(flag: str, value: float | None, minimum: float) -> None:
    """The one rule for counts and durations: ``--flag: must be >= minimum, got value``."""
    if value is not None and value < minimum:
        raise UsageError(f"--{flag.replace('_', '-')}: must be >= {minimum}, got {value}")


def at_least(minimum: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type`` for a number flag with a lower bound; argparse names the flag in the message
    (``argument --trials: must be >= 1, got 0``), which ``UsageParser`` turns into a ``UsageError``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def cli_main(run: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and call ``run``; a ``UsageError`` becomes one stderr line and exit code 2."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats, retries and metric names are "experimental" in Optuna; the warning says nothing to a user.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return run(parser.parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
