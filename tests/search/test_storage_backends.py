"""Every storage back-end the engine supports, against real servers: SQLite files, PostgreSQL, MariaDB.

Two ``open_storage`` handles on one URL stand for two machines: they share a study by name, number trials
uniquely, and fail and re-queue each other's dead trials through heartbeats. End to end, two ``search.run``
commands started at once on one study (as on two machines) finish it together with the exact trial count.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search.storage import fail_stale_trials, open_storage
from search.trial_writes import batched_writes, set_user_attrs
from search.worker import FAIL_REASON_ATTR
from tests.search.helpers import load, run_cli, tiny_study

BACKENDS = ["sqlite", "postgresql", "mysql"]


@pytest.mark.parametrize("storage_url", BACKENDS, indirect=True)
def test_open_storage_shares_study_between_machines(storage_url: str, study_name: str) -> None:
    first = open_storage(storage_url, heartbeat_interval=1, grace_period=2)
    second = open_storage(storage_url, heartbeat_interval=1, grace_period=2)
    created = optuna.create_study(study_name=study_name, storage=first, directions=["maximize", "minimize"])
    joined = optuna.load_study(study_name=study_name, storage=second)
    asked = []
    for study in (created, joined, created, joined):
        trial = study.ask()
        trial.suggest_categorical("placement", ["none", "standard"])
        asked.append((study, trial))
    for i, (study, trial) in enumerate(asked):
        study.tell(trial, [0.5 + i / 10, 1e6])
    assert sorted(t.number for t in created.trials) == [0, 1, 2, 3]
    assert len(joined.get_trials(states=(TrialState.COMPLETE,))) == 4


@pytest.mark.parametrize("storage_url", BACKENDS, indirect=True)
def test_set_user_attrs_writes_all_keys_at_once_and_nothing_on_a_finished_trial(storage_url: str,
                                                                                study_name: str) -> None:
    """The batched writer stores every key with Optuna's own encoding (read back through a second handle),
    overwrites existing keys, and refuses a finished trial as ``set_user_attr`` does, writing none of the
    batch."""
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage_url))
    trial = study.ask()
    trial.set_user_attr("seed", 1)
    attrs = {"seed": 7, "flops": 123456789012, "placements": ["none", "standard"], "note": "ü", "curve": [0.5]}
    set_user_attrs(trial, attrs)
    assert trial.user_attrs == attrs  # the trial's cached copy too, as set_user_attr keeps it
    reader = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    assert reader.trials[0].user_attrs == attrs
    study.tell(trial, 0.5)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs(trial, {"late": 1, "seed": 8})
    after = optuna.load_study(study_name=study_name, storage=open_storage(storage_url)).trials[0].user_attrs
    assert after == attrs


@pytest.mark.parametrize("storage_url", BACKENDS, indirect=True)
def test_set_user_attrs_costs_the_same_statements_for_any_number_of_keys(storage_url: str, study_name: str) -> None:
    """One trial lookup and one upsert per batch, whatever its size: the per-key cost of ``set_user_attr``
    (a lookup and an upsert per key) is what made storage a visible share of short trials."""
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name=study_name, storage=storage)
    trial = study.ask()
    statements: list[str] = []
    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    set_user_attrs(trial, {"a": 1, "b": 2})
    small = len(statements)
    statements.clear()
    set_user_attrs(trial, {f"key{i}": i for i in range(12)})
    assert len(statements) == small <= 3, statements
    assert len(study.trials[0].user_attrs) == 14


def _writes(sql: str) -> bool:
    """A write of a trial's parameters or user attributes (samplers may keep system attributes of their own)."""
    return sql.lstrip().upper().startswith(("INSERT", "UPDATE")) and ("trial_params" in sql
                                                                    or "trial_user_attributes" in sql)


def _suggest_stages(trial: optuna.Trial, stages: int) -> None:
    for i in range(stages):
        trial.suggest_categorical(f"stage{i}.placement", ["none", "standard", "pre"])
        trial.suggest_float(f"stage{i}.lr", 1e-3, 1.0, log=True)


@pytest.mark.parametrize("storage_url", BACKENDS, indirect=True)
def test_batched_writes_store_parameters_and_attributes_in_one_transaction(storage_url: str,
                                                                           study_name: str) -> None:
    """Inside the block a trial suggests as usual (TPE past its start-up trials reads the study); nothing
    reaches the database until the block ends, then everything in one commit, as Optuna would have
    written it (read back through a second handle)."""
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name=study_name, storage=storage,
                                sampler=optuna.samplers.TPESampler(n_startup_trials=2, seed=0))
    for _ in range(3):
        trial = study.ask()
        _suggest_stages(trial, 3)
        study.tell(trial, trial.params["stage0.lr"])
    trial = study.ask()
    transactions: list[list[str]] = [[]]  # the statements of each transaction on this handle, in order
    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", lambda *a: transactions[-1].append(a[2]))
    sqlalchemy.event.listen(storage.engine, "commit", lambda conn: transactions.append([]))
    reader = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    with batched_writes(trial):
        _suggest_stages(trial, 3)
        set_user_attrs(trial, {"seed": 3, "flops": 10})
        assert trial.user_attrs == {"seed": 3, "flops": 10} and len(trial.params) == 6
        assert reader.trials[3].params == {} and reader.trials[3].user_attrs == {}
        assert not [sql for statements in transactions for sql in statements if _writes(sql)]
    assert len([statements for statements in transactions if any(_writes(sql) for sql in statements)]) == 1
    stored = reader.trials[3]
    assert stored.params == trial.params and stored.distributions == trial.distributions
    assert stored.user_attrs == {"seed": 3, "flops": 10}


@pytest.mark.parametrize("storage_url", BACKENDS, indirect=True)
def test_batched_writes_keep_what_a_failing_trial_chose_and_refuse_a_changed_distribution(
        storage_url: str, study_name: str) -> None:
    """An error inside the block still stores the parameters chosen so far, then propagates. A parameter
    whose distribution differs from the one the study already holds is refused as Optuna refuses it, and
    nothing of that batch is written."""
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage_url))
    trial = study.ask()
    with pytest.raises(RuntimeError, match="cost count failed"), batched_writes(trial):
        trial.suggest_categorical("placement", ["none", "standard"])
        raise RuntimeError("cost count failed")
    assert study.trials[0].params == {"placement": trial.params["placement"]}
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    changed = study.ask()
    with pytest.raises(ValueError, match="dynamic value space"), batched_writes(changed):
        changed.suggest_float("lr", 0.1, 1.0)
        changed.suggest_categorical("placement", ["none", "pre"])
    assert study.trials[1].params == {}


@pytest.mark.parametrize("storage_url", BACKENDS, indirect=True)
def test_open_storage_heartbeat_fails_and_requeues_dead_trial(storage_url: str, study_name: str) -> None:
    """A trial whose worker stopped sending heartbeats is failed by another worker after the grace period
    and re-queued with the same parameters (Optuna's retry callback, as ``open_storage`` sets it up)."""
    alive = open_storage(storage_url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage_url, heartbeat_interval=1,
                                                                            grace_period=2))
    dead = study.ask()
    dead.suggest_float("lr", 0.01, 1.0, log=True)
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3)
    other = optuna.load_study(study_name=study_name, storage=alive)
    assert fail_stale_trials(other) == [dead._trial_id]
    failed, retry = other.trials
    assert failed.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == failed.params and retry.system_attrs["failed_trial"] == failed.number


@pytest.mark.parametrize("storage_url", BACKENDS, indirect=True)
def test_workers_racing_for_stale_trials_fail_and_retry_each_once(storage_url: str, study_name: str) -> None:
    """Four workers (each its own connection) look for stale trials at the same moment, as the workers of a
    restarted command do: every dead trial is failed by exactly one of them and retried exactly once.
    Optuna's own ``fail_stale_trials`` failed and retried trials twice here on SQLite."""
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage_url, heartbeat_interval=1,
                                                                            grace_period=2))
    dead = [study.ask() for _ in range(8)]
    for trial in dead:
        study._storage.record_heartbeat(trial._trial_id)
    time.sleep(3)
    workers = [optuna.load_study(study_name=study_name, storage=open_storage(storage_url, heartbeat_interval=1,
                                                                             grace_period=2)) for _ in range(4)]
    start = threading.Barrier(len(workers))

    def look(worker: optuna.Study) -> list[int]:
        start.wait()
        return fail_stale_trials(worker)

    with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
        claimed = [trial_id for ids in pool.map(look, workers) for trial_id in ids]
    assert sorted(claimed) == sorted(t._trial_id for t in dead)
    trials = load(storage_url, study_name).trials
    retried = Counter(t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs)
    assert retried == {t.number: 1 for t in dead}
    assert Counter(t.state for t in trials) == {TrialState.FAIL: len(dead), TrialState.WAITING: len(dead)}


@pytest.mark.slow
@pytest.mark.parametrize("storage_url", ["postgresql", "mysql"], indirect=True)
def test_run_two_commands_join_one_study(tmp_path: Path, storage_url: str, study_name: str) -> None:
    """Two machines, each running the same command with the same server: one study, exactly its trials."""
    study_file = tiny_study(tmp_path, trials=4)
    args = ["--study", str(study_file), "--study-name", study_name, "--storage", storage_url, "--workers", "1",
            "--poll", "0.2"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda m: run_cli("search.run", *args, "--runs-dir", str(tmp_path / m)), ["a", "b"]))
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
    trials = load(storage_url, study_name).trials
    assert len({t.number for t in trials}) == len(trials)
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    assert all(t.user_attrs[FAIL_REASON_ATTR].startswith("surplus") for t in others), others
