"""Study storage: any SQLAlchemy URL, a shared SQLite file under the runs directory by default.

SQLite is set up for several local workers (WAL journal, so readers such as the dashboard never block the
writers, and a long busy timeout). RDB storages get Optuna heartbeats, so a trial whose worker died is
failed after the grace period and re-queued with the same parameters.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from search.errors import UsageError

__all__ = [
    "DEFAULT_RUNS_DIR",
    "STORAGE_ENV",
    "masked",
    "open_storage",
    "resolve_storage_url",
    "resolve_study_name",
    "runs_dir",
]

STORAGE_ENV = "SE_SEARCH_STORAGE"
RUNS_DIR_ENV = "SE_SEARCH_RUNS_DIR"
DEFAULT_RUNS_DIR = "runs"
SQLITE_BUSY_TIMEOUT_S = 120


def runs_dir(override: str | None = None) -> Path:
    return Path(override or os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR)


def resolve_storage_url(url: str | None, runs: str | None = None) -> str:
    """``--storage``, else ``$SE_SEARCH_STORAGE``, else ``sqlite:///<runs>/studies.db`` (all studies in
    one file, so one dashboard shows them all)."""
    url = url or os.environ.get(STORAGE_ENV)
    if not url:
        path = runs_dir(runs) / "studies.db"
        return f"sqlite:///{path}"
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UsageError(
            f"--storage: {masked(url)!r} is not a SQLAlchemy URL (e.g. sqlite:///runs/studies.db "
            "or postgresql+psycopg://user@host/db)"
        ) from None
    if parsed.drivername.startswith("sqlite") and parsed.database in (None, "", ":memory:"):
        raise UsageError("--storage: an in-memory SQLite database cannot be shared by workers; give a file path")
    return url


def masked(url: str) -> str:
    """The URL with its password hidden, for every message and log line."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        # Not parseable: hide anything between "://user:" and "@" by hand.
        scheme, sep, rest = url.partition("://")
        if sep and "@" in rest:
            creds, _, host = rest.rpartition("@")
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
        return url


def _prepare_sqlite(url: str) -> dict:
    database = make_url(url).database
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(database, timeout=SQLITE_BUSY_TIMEOUT_S) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent on the file: set once, holds for every process
    return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int = 3,
) -> optuna.storages.RDBStorage:
    """An ``RDBStorage`` on ``url`` with heartbeats and retry of stale trials (same parameters)."""
    engine_kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs.update(_prepare_sqlite(url))
    retry_cls = (
        getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    )
    callback_kwarg = (
        "heartbeat_stale_trial_callback"
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
        else "failed_trial_callback"
    )
    heartbeat: dict = {}
    if heartbeat_interval:
        heartbeat = {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": grace_period or 2 * heartbeat_interval,
            callback_kwarg: retry_cls(max_retry=max_retry),
        }
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except (sqlalchemy.exc.SQLAlchemyError, ModuleNotFoundError, ImportError, ValueError) as e:
        reason = " ".join(str(getattr(e, "orig", None) or e).split())[:300]
        raise UsageError(f"--storage: cannot open {masked(url)}: {reason}") from None


def resolve_study_name(storage: optuna.storages.BaseStorage, name: str) -> str:
    """An existing study: ``name`` itself, else the newest study named ``name-<overrides>``."""
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    names = [s.study_name for s in summaries]
    if name in names:
        return name
    candidates = [s for s in summaries if s.study_name.startswith(f"{name}-")]
    if not candidates:
        known = ", ".join(sorted(names)) or "none"
        raise UsageError(f"--study: no study named {name!r} in the storage; studies there: {known}")
    return max(candidates, key=lambda s: s._study_id).study_name
