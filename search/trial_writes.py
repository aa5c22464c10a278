"""A running trial's writes in as few transactions as Optuna allows: its attributes in one upsert, and its
parameters together with the attributes known before training in one transaction.

Optuna writes every suggestion and every ``set_user_attr`` key in a transaction of its own, each of which
looks the trial up again: a trial of the flagship study did about twenty before it trained, several
milliseconds each on PostgreSQL, which made storage a visible share of short trials (benchmarks/README.md,
``storage_share``). Optuna has no batch call, so this module writes the same rows Optuna would (its own
tables and JSON encodings, the same "trial still running" and "same distribution across the study" checks)
through its ``RDBStorage`` session, with a multi-row statement per table. Storages other than SQL, and SQL
dialects without an upsert, get Optuna's own per-key calls.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Mapping
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.dialects.mysql
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from optuna.distributions import BaseDistribution, check_distribution_compatibility, distribution_to_json
from optuna.storages._rdb import models as rdb_models
from optuna.storages._rdb.storage import _create_scoped_session

from search.storage import rdb_backend

__all__ = ["batched_writes", "set_user_attrs"]


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """Set all of ``attrs`` on a running ``trial``: one transaction, one upsert statement on SQL storages;
    inside ``batched_writes``, at the end of the block. Refuses a finished trial as ``set_user_attr`` does
    (``UpdateFinishedTrialError``), writing none of the keys. ``trial.user_attrs`` shows them at once."""
    if isinstance(trial.storage, _Batch):
        trial.storage.attrs.update(attrs)
        trial._cached_frozen_trial.user_attrs.update(attrs)
    elif _sql_backend(trial) is not None and len(attrs) > 1:
        _write(trial, [], attrs)
        trial._cached_frozen_trial.user_attrs.update(attrs)
    else:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)


@contextlib.contextmanager
def batched_writes(trial: optuna.Trial) -> Iterator[None]:
    """The trial's suggestions and ``set_user_attrs`` calls inside the block are written in one transaction
    when it ends, also when it ends with an error (so a trial that fails still records what it was).

    Suggestions work as usual inside: Optuna keeps them on the trial object (``trial.params``) and its
    samplers read other trials through the study, not through this trial's storage handle, which is the
    only thing swapped here.
    """
    if _sql_backend(trial) is None or isinstance(trial.storage, _Batch):
        yield
        return
    batch = _Batch(trial.storage)
    trial.storage = batch
    try:
        yield
    finally:
        trial.storage = batch.storage
        if batch.params or batch.attrs:
            _write(trial, batch.params, batch.attrs)


class _Batch:
    """Stands in for a trial's storage handle in ``batched_writes``: keeps the parameter writes, and
    passes every other call (reads included) to the storage."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.storage = storage
        self.params: list[tuple[str, float, BaseDistribution]] = []
        self.attrs: dict[str, Any] = {}

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: BaseDistribution) -> None:
        self.params.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def _sql_backend(trial: optuna.Trial) -> optuna.storages.RDBStorage | None:
    backend = rdb_backend(trial.study._storage)
    return backend if backend is not None and backend.engine.name in _UPSERTS else None


def _write(trial: optuna.Trial, params: list[tuple[str, float, BaseDistribution]], attrs: Mapping[str, Any]) -> None:
    backend = _sql_backend(trial)
    assert backend is not None
    trial_id = trial._trial_id
    with _create_scoped_session(backend.scoped_session) as session:
        stored = rdb_models.TrialModel.find_or_raise_by_id(trial_id, session)
        backend.check_trial_is_updatable(trial_id, stored.state)
        if params:
            for name, _, distribution in params:
                _check_distribution(session, backend, stored.study_id, name, distribution)
            session.execute(sqlalchemy.insert(rdb_models.TrialParamModel), [
                {"trial_id": trial_id, "param_name": name, "param_value": value,
                 "distribution_json": distribution_to_json(distribution)} for name, value, distribution in params])
        if attrs:
            session.execute(_UPSERTS[backend.engine.name](rdb_models.TrialUserAttributeModel), [
                {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()])


# The first distribution of each parameter name seen in a study, per process: a parameter keeps one
# distribution across a study (Optuna's rule), so after the first look-up the check needs no query.
_KNOWN_DISTRIBUTIONS: dict[tuple[str, int, str], BaseDistribution] = {}


def _check_distribution(session: Any, backend: optuna.storages.RDBStorage, study_id: int, name: str,
                        distribution: BaseDistribution) -> None:
    key = (str(backend.engine.url), study_id, name)
    if key not in _KNOWN_DISTRIBUTIONS:
        previous = (session.query(rdb_models.TrialParamModel.distribution_json)
                    .join(rdb_models.TrialModel)
                    .filter(rdb_models.TrialModel.study_id == study_id)
                    .filter(rdb_models.TrialParamModel.param_name == name)
                    .first())
        _KNOWN_DISTRIBUTIONS[key] = (optuna.distributions.json_to_distribution(previous[0]) if previous
                                     else distribution)
    check_distribution_compatibility(_KNOWN_DISTRIBUTIONS[key], distribution)


def _pg_upsert(model: Any) -> Any:
    stmt = sqlalchemy.dialects.postgresql.insert(model)
    return stmt.on_conflict_do_update(index_elements=[model.trial_id, model.key],
                                      set_={"value_json": stmt.excluded.value_json})


def _sqlite_upsert(model: Any) -> Any:
    stmt = sqlalchemy.dialects.sqlite.insert(model)
    return stmt.on_conflict_do_update(index_elements=[model.trial_id, model.key],
                                      set_={"value_json": stmt.excluded.value_json})


def _mysql_upsert(model: Any) -> Any:
    stmt = sqlalchemy.dialects.mysql.insert(model)
    return stmt.on_duplicate_key_update(value_json=stmt.inserted.value_json)


# The upserts Optuna itself issues per key (``RDBStorage._set_trial_attr_without_commit``). SQLite has them
# from 3.24 (2018); below that, and on other dialects, Optuna reads then writes, and so do we (per key).
_UPSERTS = {"postgresql": _pg_upsert, "mysql": _mysql_upsert,
            **({"sqlite": _sqlite_upsert} if sqlite3.sqlite_version_info >= (3, 24, 0) else {})}
