"""Crash recovery: a trial whose worker died is failed after the grace period and retried with the same
parameters and seed; the study still ends with exactly the requested number of finished trials.

Real crashes: workers are killed with SIGKILL (no handler runs, as on power loss) in the middle of a real
training trial, on the real PostgreSQL server and on SQLite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.data import prepare_datamodule
from search.objective import Devices, TrialRunner, trial_seed
from search.storage import open_storage
from search.study_config import load_study
from search.study_store import create_or_load_study
from search.worker import FAIL_REASON_ATTR, SURPLUS_REASON, WORKER_ATTR, WorkerSpec, run_worker
from tests.search.helpers import load, run_cli, start_cli, states, tiny_study, wait_until

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT = ("--heartbeat-interval", "1", "--grace-period", "5")


def _assert_recovered(study: optuna.Study, trials: int, killed: list[optuna.trial.FrozenTrial]) -> None:
    """Exactly ``trials`` finished, each killed trial FAIL and retried once with its parameters and seed,
    nothing running or queued, nothing else failed. Workers racing for the last slot may create a trial and
    hand it back untrained as surplus (as in test_concurrency); that one is not a failure."""
    all_trials = study.get_trials()
    assert len({t.number for t in all_trials}) == len(all_trials)
    assert len(study.get_trials(states=FINISHED)) == trials
    assert states(study)["RUNNING"] == 0 and states(study)["WAITING"] == 0, states(study)
    failed = {t.number for t in all_trials if t.state == TrialState.FAIL
              and t.user_attrs.get(FAIL_REASON_ATTR) != SURPLUS_REASON}
    assert failed == {k.number for k in killed}, failed
    seed = json.loads(study.user_attrs["definition"])["seed"]
    for k in killed:
        retries = [t for t in all_trials if t.system_attrs.get("failed_trial") == k.number]
        assert len(retries) == 1, f"trial {k.number} retried {len(retries)} times"
        retry = retries[0]
        assert retry.state in FINISHED
        assert retry.params == k.params
        assert retry.user_attrs["seed"] == k.user_attrs["seed"] == seed + k.number


def test_worker_retries_stale_trial_with_same_params_and_seed(tmp_path: Path) -> None:
    """In process: a RUNNING trial whose heartbeats stopped (its worker is gone) is failed by the next
    worker once the grace period has passed and re-run with the same parameters and seed."""
    study_file = tiny_study(tmp_path)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    cfg = load_study(str(study_file))
    storage = open_storage(url, heartbeat_interval=1, grace_period=2)
    study = create_or_load_study(storage, "crash", cfg, 3)
    dead = study.ask()  # the dead worker's trial: parameters chosen, one heartbeat, then silence
    TrialRunner(cfg, prepare_datamodule(cfg), Devices()).design(dead)
    dead.set_user_attr("seed", trial_seed(cfg.seed, dead))
    # What the dead run had measured (it died just before reporting a pruned trial): not the retry's.
    dead.set_user_attr("pruned_reason", "pruned after epoch 1")
    storage.record_heartbeat(dead._trial_id)
    started = time.monotonic()
    run_worker(WorkerSpec(study=str(study_file), study_name="crash", storage=url, trials=2, heartbeat_interval=1,
                          grace_period=2))
    assert time.monotonic() - started >= 2  # it waited for the grace period instead of leaving the slot
    study = load(url, "crash")
    _assert_recovered(study, 2, [study.trials[dead.number]])
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number)
    assert retry.state == TrialState.COMPLETE and "pruned_reason" not in retry.user_attrs
    assert retry.user_attrs["seed"] == trial_seed(cfg.seed, dead)  # written again by its own run


def _running_mid_trial(url: str, name: str, count: int = 1) -> list[optuna.trial.FrozenTrial] | None:
    """``count`` running trials that have finished at least one epoch (so a kill lands inside training)."""
    try:
        running = load(url, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except KeyError:
        return None
    busy = [t for t in running if t.user_attrs.get("val_accuracy_curve") and WORKER_ATTR in t.user_attrs]
    return busy if len(busy) >= count else None


@pytest.mark.slow
def test_crash_sigkill_worker_mid_trial_study_completes_with_retry(tmp_path: Path, pg_url: str,
                                                                  pg_study: str) -> None:
    """PostgreSQL, two workers: one is killed with SIGKILL mid-trial; the other finishes the study."""
    study_file = tiny_study(tmp_path, training={"epochs": 8}, trials=4)
    proc = start_cli("search.run", "--study", str(study_file), "--study-name", pg_study, "--storage", pg_url,
                     "--runs-dir", str(tmp_path / "runs"), "--workers", "2", "--poll", "0.2", *HEARTBEAT,
                     log=tmp_path / "run.log")
    try:
        victim = wait_until(lambda: _running_mid_trial(pg_url, pg_study), 300, "a trial past its first epoch")[0]
        host, pid = victim.user_attrs[WORKER_ATTR].rsplit(":", 1)
        assert host == socket.gethostname()
        os.kill(int(pid), signal.SIGKILL)
        code = proc.wait(600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "run.log").read_text()
    assert code == 0, output[-3000:]
    assert "exited with code -9" in output  # the dead worker is reported, the study still completes
    study = load(pg_url, pg_study)
    _assert_recovered(study, 4, [study.trials[victim.number]])


@pytest.mark.slow
def test_crash_restarted_command_completes_remainder(tmp_path: Path) -> None:
    """SQLite: the whole command (main process and both workers) dies at once, as on power loss; running
    the same command again fails the dead trials after the grace period, retries them and finishes."""
    study_file = tiny_study(tmp_path, training={"epochs": 8}, trials=4)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    args = ("--study", str(study_file), "--storage", url, "--runs-dir", str(tmp_path / "runs"), "--workers", "2",
            "--poll", "0.2", *HEARTBEAT)
    proc = start_cli("search.run", *args, log=tmp_path / "run.log")
    try:
        wait_until(lambda: _running_mid_trial(url, "tiny", 2), 300, "two trials past their first epoch")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = load(url, "tiny").get_trials(states=(TrialState.RUNNING,))
    assert killed, "the kill should have left running trials behind"
    again = run_cli("search.run", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming:" in again.stdout
    study = load(url, "tiny")
    _assert_recovered(study, 4, [study.trials[k.number] for k in killed])
