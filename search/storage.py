"""Study storage: any SQLAlchemy URL, a shared SQLite file under the runs directory by default.

SQLite is set up for several local workers: WAL journal, a long busy timeout, and transactions that change
trials holding the write lock from their first statement (``SQLiteStorage``), which is what makes Optuna's
state changes atomic there. PostgreSQL and MySQL/MariaDB serve workers on any number of machines:
each joins the study by name. RDB storages get Optuna heartbeats, so a trial whose worker died (kill -9,
power loss) is failed after the grace period and re-queued with the same parameters (Optuna's
``RetryHeartbeatStaleTrialCallback``), and the retry reuses the original trial's seed
(``search.objective.trial_seed``). Passwords never appear in messages: see ``masked`` and ``search.redact``.
"""

from __future__ import annotations

import copy
import functools
import os
import sqlite3
import threading
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages._rdb import models as rdb_models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.errors import UsageError
from search.redact import redact, url_secrets

__all__ = [
    "DEFAULT_RUNS_DIR",
    "STORAGE_ENV",
    "RetryWithoutResults",
    "SQLiteStorage",
    "check_heartbeat",
    "fail_stale_trials",
    "masked",
    "open_storage",
    "rdb_backend",
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
    except (sqlalchemy.exc.ArgumentError, ValueError):
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
    except (sqlalchemy.exc.ArgumentError, ValueError):
        # Not parseable: hide anything between "://user:" and "@" by hand.
        scheme, sep, rest = url.partition("://")
        if sep and "@" in rest:
            creds, _, host = rest.rpartition("@")
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
        return url


def _sqlite_engine_kwargs() -> dict:
    return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}


def _prepare_sqlite(url: str) -> dict:
    database = make_url(url).database
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(database, timeout=SQLITE_BUSY_TIMEOUT_S) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent on the file: set once, holds for every process
    return _sqlite_engine_kwargs()


def _check_holds_studies(url: str, engine_kwargs: dict) -> None:
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        holds = sqlalchemy.inspect(engine).has_table("studies")
    finally:
        engine.dispose()
    if not holds:
        raise UsageError(f"--storage: {masked(url)} holds no Optuna studies (it has no 'studies' table); check "
                         "--storage, or run `python -m search.run` first")


# Set while one of Optuna's read-only storage methods runs in this thread: its transaction begins deferred.
_snapshot_read = threading.local()


class SQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's ``RDBStorage`` on a SQLite file, with its trial state changes atomic across processes.

    Optuna changes a trial's state by reading it, checking it, then writing it (``set_trial_state_values``),
    atomic on PostgreSQL and MySQL through ``SELECT ... FOR UPDATE``. SQLite has no ``FOR UPDATE``, and the
    sqlite3 module opens a transaction only at the first write, so two workers could both read a queued
    trial as WAITING and both start it (a retry ran twice), and a late worker's ``tell`` could overwrite the
    FAIL of another worker's stale claim (the trial ended COMPLETE and was also retried). Here every
    transaction begins with ``BEGIN IMMEDIATE``: it holds SQLite's write lock from its first read, and other
    processes' writers wait for it (busy timeout) instead of interleaving, as a row lock makes them do
    elsewhere. Optuna's methods that only read (``SNAPSHOT_READS``) begin deferred instead: in WAL mode
    such a transaction reads one consistent snapshot and neither waits for a writer nor holds one up. Any
    other method, including one a later Optuna adds, takes the lock. No library offers this for Optuna's
    storage; the subclass is the smallest place to say it, and it survives pickling (``__setstate__``
    builds a new engine).
    """

    SNAPSHOT_READS = (
        "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
        "get_study_system_attrs", "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
        "get_trial_param", "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials",
        "_get_trials", "get_best_trial", "_get_best_trial_id", "_get_stale_trial_ids",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # Optuna's set-up (tables, schema version) as Optuna runs it
        self._begin_transactions_locked()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._begin_transactions_locked()

    def _begin_transactions_locked(self) -> None:
        sqlalchemy.event.listen(self.engine, "begin", _begin)


def _begin(connection: sqlalchemy.engine.Connection) -> None:
    # The sqlite3 module sees a transaction already open and adds no BEGIN of its own before the writes.
    connection.exec_driver_sql("BEGIN" if getattr(_snapshot_read, "active", False) else "BEGIN IMMEDIATE")


def _as_snapshot_read(name: str) -> Callable[..., Any]:
    read = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(read)
    def method(self: SQLiteStorage, *args: Any, **kwargs: Any) -> Any:
        outer = getattr(_snapshot_read, "active", False)
        _snapshot_read.active = True
        try:
            return read(self, *args, **kwargs)
        finally:
            _snapshot_read.active = outer

    return method


for _name in SQLiteStorage.SNAPSHOT_READS:
    if hasattr(optuna.storages.RDBStorage, _name):  # a name a later Optuna drops simply takes the lock
        setattr(SQLiteStorage, _name, _as_snapshot_read(_name))


def check_heartbeat(heartbeat_interval: int | None, grace_period: int | None) -> None:
    """A grace period at or below the heartbeat interval would fail trials whose worker is alive."""
    if heartbeat_interval and grace_period is not None and grace_period <= heartbeat_interval:
        raise UsageError(f"--grace-period: must be longer than --heartbeat-interval ({heartbeat_interval} s), "
                         f"got {grace_period}")


class RetryWithoutResults(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a stale trial (same parameters; ``failed_trial`` and ``retry_history`` system
    attributes), without the dead trial's user attributes. Those hold what the dead run had measured (its
    accuracy curve so far, or its final accuracies and a pruned reason if it died just before reporting);
    Optuna copies them, so a retry that failed early or was pruned showed them as its own in exports. The
    retry's run writes its seed, cost and design attributes again before training."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {}
        super().__call__(study, trial)


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int = 3,
    existing: bool = False,
) -> optuna.storages.RDBStorage:
    """An ``RDBStorage`` on ``url`` with heartbeats and retry of stale trials (same parameters).

    Creates Optuna's tables in an empty database (as Optuna does), never a study; ``existing`` (the readers:
    export, report, dashboard) refuses a database without them instead, and changes nothing in it, so a
    mistyped ``--storage`` leaves another application's database as it was. Connection and driver problems,
    and a database of an older Optuna, become one ``UsageError`` line, with the password masked.
    """
    check_heartbeat(heartbeat_interval, grace_period)
    engine_kwargs: dict = {"pool_pre_ping": True}
    heartbeat: dict = {}
    try:
        if url.startswith("sqlite"):
            engine_kwargs.update(_sqlite_engine_kwargs() if existing else _prepare_sqlite(url))
        if existing:
            _check_holds_studies(url, engine_kwargs)
        with warnings.catch_warnings():
            # Heartbeats and the retry callback are marked experimental; they are what crash recovery is.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat_interval:
                heartbeat = {
                    "heartbeat_interval": heartbeat_interval,
                    "grace_period": grace_period or 2 * heartbeat_interval,
                    "heartbeat_stale_trial_callback": RetryWithoutResults(max_retry=max_retry),
                }
            storage_class = SQLiteStorage if url.startswith("sqlite") else optuna.storages.RDBStorage
            return storage_class(url, engine_kwargs=engine_kwargs, skip_table_creation=existing, **heartbeat)
    except RuntimeError as e:  # Optuna's schema check: the tables are of another Optuna version
        reason = " ".join(str(e).split())
        raise UsageError(f"--storage: {masked(url)}: {redact(reason, url_secrets(url))}") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ModuleNotFoundError,
            ImportError, ValueError, OSError, sqlite3.Error) as e:
        reason = " ".join(str(getattr(e, "orig", None) or e).split())[:300]
        raise UsageError(f"--storage: cannot open {masked(url)}: {redact(reason, url_secrets(url))}") from None


def rdb_backend(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage | None:
    """The SQL storage behind ``study._storage`` (Optuna wraps an ``RDBStorage`` in its ``_CachedStorage``),
    or None for other storages."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the study's trials whose heartbeat stopped and queue their retries, as Optuna's
    ``fail_stale_trials`` does, but claim each trial in one conditional statement (RUNNING -> FAIL). The ids
    of the trials this call failed.

    Optuna reads the trial's state and writes FAIL in two statements. On SQLite the read takes no lock
    (``FOR UPDATE`` does not exist there, and the transaction begins only at the write), so two workers that
    found the same stale trial at once both failed it and both queued a retry: the trial ran twice. Seen when
    a killed command was restarted under load, both new workers checking at start. One ``UPDATE ... WHERE
    state = RUNNING`` is atomic on every backend: only the worker whose statement changed the row retries it.
    """
    storage = rdb_backend(study._storage)
    if storage is None or not is_heartbeat_enabled(storage):
        return []
    trials = rdb_models.TrialModel
    claimed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        with _create_scoped_session(storage.scoped_session) as session:
            changed = session.execute(
                sqlalchemy.update(trials)
                .where(trials.trial_id == trial_id, trials.state == TrialState.RUNNING)
                .values({trials.state: TrialState.FAIL})
                .execution_options(synchronize_session=False)
            ).rowcount
            if changed == 1:  # the row is this transaction's now; Optuna's own setter stores the time
                trials.find_or_raise_by_id(trial_id, session).datetime_complete = datetime.now()
                claimed.append(trial_id)
    retry = storage.get_heartbeat_stale_trial_callback()
    if retry is not None:
        for trial_id in claimed:
            retry(study, copy.deepcopy(storage.get_trial(trial_id)))
    return claimed


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
