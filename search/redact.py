"""Keeping storage passwords out of every message, log line and stored traceback.

Messages built by the engine show URLs through ``search.storage.masked``; this module is the safety net
for text the engine does not build (driver errors, tracebacks, library warnings): the command lines and
workers wrap their ``stdout``/``stderr`` in a ``RedactingStream`` that replaces each secret with ``***``
before anything reaches the terminal or a worker log, and trial failure reasons pass through ``redact``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import make_url

__all__ = ["RedactingStream", "install", "redact", "url_secrets"]

MASK = "***"
# A bare password is also replaced wherever it appears, when it is long enough that doing so cannot
# garble ordinary text; any password is always replaced inside "scheme://user:PASSWORD@" patterns.
MIN_BARE_SECRET = 4
_CREDENTIALS = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s]*:)([^@\s]+)(@)")

_secrets: set[str] = set()


def url_secrets(url: str | None) -> set[str]:
    """The password of ``url`` in the spellings it may be printed in (as given, decoded, quoted)."""
    if not url:
        return set()
    found: set[str] = set()
    match = _CREDENTIALS.search(url)
    if match:
        found.add(match.group(2))
    try:
        password = make_url(url).password
    except Exception:  # an unparseable URL: the regular expression above is all there is
        password = None
    if password:
        found |= {str(password), quote(str(password), safe=""), quote_plus(str(password))}
    return {s for s in found if s}


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with credentials in URLs and the known ``secrets`` replaced by ``***``."""
    text = _CREDENTIALS.sub(rf"\g<1>{MASK}\g<3>", text)
    for secret in sorted(set(secrets if secrets is not None else _secrets), key=len, reverse=True):
        if len(secret) >= MIN_BARE_SECRET:
            text = text.replace(secret, MASK)
    return text


class RedactingStream:
    """A text stream that redacts every write before passing it on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def install(url: str | None) -> None:
    """Register ``url``'s password and wrap ``sys.stdout``/``sys.stderr`` (once) so it is never printed.

    Logging handlers made at import time (Optuna's, Lightning's) hold the original streams, not
    ``sys.stderr``: they are pointed at the wrapped ones too."""
    _secrets.update(url_secrets(url))
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, RedactingStream):
            continue
        wrapped = RedactingStream(stream)
        setattr(sys, name, wrapped)
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", ()):
                if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
                    handler.setStream(wrapped)
