"""Every storage back-end the engine supports, against real servers: SQLite files, PostgreSQL, MariaDB.

Two ``open_storage`` handles on one URL stand for two machines: they share a study by name, number trials
uniquely, and fail and re-queue each other's dead trials through heartbeats. End to end, two ``search.run``
commands started at once on one study (as on two machines) finish it together with the exact trial count.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search.storage import fail_stale_trials, open_storage, rdb_backend
from search.trial_writes import batched_writes, set_user_attrs
from search.worker import FAIL_REASON_ATTR, _run_one
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


class _PauseInsideTransaction:
    """Holds one storage's next state write between its read of the trial and its write, the window in
    which Optuna's read-check-write of a trial's state can interleave with another worker's."""

    def __init__(self, storage: optuna.storages.RDBStorage) -> None:
        self.reached, self.resume = threading.Event(), threading.Event()
        check = storage.check_trial_is_updatable

        def pausing(trial_id: int, state: TrialState) -> None:
            check(trial_id, state)
            if not self.reached.is_set():
                self.reached.set()
                self.resume.wait(30)

        storage.check_trial_is_updatable = pausing  # type: ignore[method-assign]  # this instance only


def _run_interleaved(paused: _PauseInsideTransaction, first, second) -> tuple:
    """``first`` is held inside its transaction while ``second`` runs for up to a second (on a backend with
    working locks it waits for the lock instead), then both finish; their results."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(first)
        assert paused.reached.wait(30), "the first operation never reached its state write"
        racing = pool.submit(second)
        time.sleep(1.0)
        paused.resume.set()
        return held.result(timeout=60), racing.result(timeout=60)


@pytest.mark.parametrize("storage_url", BACKENDS, indirect=True)
def test_tell_racing_a_stale_claim_never_completes_and_retries_the_same_trial(storage_url: str,
                                                                              study_name: str) -> None:
    """A worker whose heartbeat ran late records its result while another worker claims the trial as stale.
    One of them wins: the trial is COMPLETE and not retried, or FAIL and retried once with the result
    discarded. On SQLite without a write lock taken at the start of the transaction (Optuna's ``FOR UPDATE``
    does not exist there) both won: the trial ended COMPLETE and also ran again."""
    open_fast = lambda: open_storage(storage_url, heartbeat_interval=1, grace_period=2)  # noqa: E731
    live = optuna.create_study(study_name=study_name, storage=open_fast(), directions=["maximize"])
    trial = live.ask()
    live._storage.record_heartbeat(trial._trial_id)
    time.sleep(3)  # the heartbeat is now past the grace period
    claimer = optuna.load_study(study_name=study_name, storage=open_fast())
    paused = _PauseInsideTransaction(rdb_backend(live._storage))
    told, claimed = _run_interleaved(paused, lambda: _tell_or_refused(live, trial), lambda: fail_stale_trials(claimer))
    trials = load(storage_url, study_name).trials
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
    if told:
        assert (claimed, trials[0].state, retries) == ([], TrialState.COMPLETE, [])
    else:
        assert (claimed, trials[0].state, len(retries)) == ([trial._trial_id], TrialState.FAIL, 1)


def _tell_or_refused(study: optuna.Study, trial: optuna.Trial) -> bool:
    try:
        study.tell(trial, [0.9])
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


@pytest.mark.parametrize("storage_url", BACKENDS, indirect=True)
def test_two_workers_asking_at_once_never_both_start_the_same_queued_trial(storage_url: str,
                                                                           study_name: str) -> None:
    """A queued trial (a stale trial's retry) goes to exactly one of two workers that ask for work together.
    On SQLite without the write lock both read it WAITING, both set it RUNNING, and it ran twice."""
    first = optuna.create_study(study_name=study_name, storage=open_storage(storage_url))
    first.enqueue_trial({"lr": 0.1})
    second = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    paused = _PauseInsideTransaction(rdb_backend(first._storage))
    popped = _run_interleaved(paused, first._pop_waiting_trial_id, second._pop_waiting_trial_id)
    queued = load(storage_url, study_name).trials[0]
    assert sorted(popped, key=lambda p: p is None) == [queued._trial_id, None]
    assert queued.state == TrialState.RUNNING


@pytest.mark.parametrize("storage_url", BACKENDS, indirect=True)
@pytest.mark.parametrize("outcome", ["result", "error"])
def test_worker_whose_trial_was_failed_elsewhere_discards_its_outcome_and_goes_on(
        storage_url: str, study_name: str, outcome: str) -> None:
    """While a worker trains, another worker fails its trial as stale (its heartbeat ran late). The worker's
    result, or its error, is then discarded: the trial keeps the FAIL that queued its retry, and the worker
    carries on rather than dying on Optuna's "Cannot tell a FAIL trial." (which it did)."""
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage_url, heartbeat_interval=None),
                                directions=["maximize"])
    other = open_storage(storage_url, heartbeat_interval=None)
    trial = study.ask()

    def runner(trial: optuna.Trial) -> list[float]:
        other.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # what a stale claim leaves behind
        if outcome == "error":
            trial.report(0.5, step=1)  # the next per-epoch report of a claimed trial is refused
        return [0.9]

    assert _run_one(study, trial, runner) is (outcome == "result")
    stored = load(storage_url, study_name).trials[0]
    assert stored.state == TrialState.FAIL and stored.values is None
    assert FAIL_REASON_ATTR not in stored.user_attrs


def test_sqlite_storage_locks_state_changes_from_their_first_statement_and_reads_snapshots(tmp_path: Path) -> None:
    """How ``SQLiteStorage`` gets the races above right, checked on the statements it sends, also after a
    pickle round trip (which builds a new engine): a state change begins ``BEGIN IMMEDIATE`` (the write lock
    before the trial is read), a read-only method a deferred ``BEGIN`` (a snapshot that holds no writer up)."""
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}", heartbeat_interval=None)
    begins: list[str] = []

    def record_begin(_conn: object, _cursor: object, sql: str, *_: object) -> None:
        if sql.startswith("BEGIN"):
            begins.append(sql)

    for handle in (storage, pickle.loads(pickle.dumps(storage))):
        sqlalchemy.event.listen(handle.engine, "before_cursor_execute", record_begin)
        study_id = handle.create_new_study([optuna.study.StudyDirection.MAXIMIZE])
        trial_id = handle.create_new_trial(study_id, optuna.trial.create_trial(state=TrialState.WAITING))
        begins.clear()
        assert handle.set_trial_state_values(trial_id, TrialState.RUNNING)
        assert begins == ["BEGIN IMMEDIATE"]
        begins.clear()
        assert [t.state for t in handle.get_all_trials(study_id)] == [TrialState.RUNNING]
        assert handle.get_trial(trial_id).state == TrialState.RUNNING
        assert begins == ["BEGIN", "BEGIN"]
