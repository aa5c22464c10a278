"""Every storage back-end the engine supports, against real servers: SQLite files, PostgreSQL, MariaDB.

Two ``open_storage`` handles on one URL stand for two machines: they share a study by name, number trials
uniquely, and fail and re-queue each other's dead trials through heartbeats. End to end, two ``search.run``
commands started at once on one study (as on two machines) finish it together with the exact trial count.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.storage import open_storage, set_user_attrs
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
    reader = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    assert reader.trials[0].user_attrs == attrs
    study.tell(trial, 0.5)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs(trial, {"late": 1, "seed": 8})
    after = optuna.load_study(study_name=study_name, storage=open_storage(storage_url)).trials[0].user_attrs
    assert after == attrs


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
    optuna.storages.fail_stale_trials(other)
    failed, retry = other.trials
    assert failed.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == failed.params and retry.system_attrs["failed_trial"] == failed.number


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
