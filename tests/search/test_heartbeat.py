"""``search.heartbeat.Heartbeat``: a running trial's heartbeat on a real SQLite study survives a failed write."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy.exc

from search.heartbeat import Heartbeat
from search.storage import open_storage
from search.study_config import load_study
from search.study_store import create_or_load_study
from tests.search.helpers import tiny_study


def test_heartbeat_failed_write_is_logged_and_the_beats_go_on(tmp_path: Path) -> None:
    """One write fails (a lock held past the timeout, a dropped connection). Optuna's own heartbeat thread
    ends there, and the trial, still training, would go stale and be failed and retried by another worker."""
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}", heartbeat_interval=1, grace_period=2)
    study = create_or_load_study(storage, "beats", load_study(str(tiny_study(tmp_path))), 3)
    trial = study.ask()
    record, recorded, failures = storage.record_heartbeat, [], ["database is locked"]

    def flaky(trial_id: int) -> None:
        if failures:
            raise sqlalchemy.exc.OperationalError("UPDATE trial_heartbeats", {}, Exception(failures.pop()))
        record(trial_id)
        recorded.append(time.monotonic())

    storage.record_heartbeat = flaky
    logs: list[str] = []
    with Heartbeat(storage, trial._trial_id, trial.number, logs.append):
        time.sleep(2.5)
    assert recorded  # the beats at 1 s and 2 s (one, on a loaded machine), after the failed one at 0 s
    assert logs[0].startswith("trial 0: heartbeat not recorded (OperationalError: ")
    assert "database is locked" in logs[0] and logs[0].endswith("trying again every 1 s")
    assert logs[1:] == ["trial 0: heartbeat recorded again"]
    assert storage._get_stale_trial_ids(study._study_id) == []  # it is fresh: nobody will fail it


def test_heartbeat_off_records_nothing(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}", heartbeat_interval=None)
    study = create_or_load_study(storage, "quiet", load_study(str(tiny_study(tmp_path))), 3)
    trial = study.ask()
    calls: list[int] = []
    storage.record_heartbeat = calls.append
    with Heartbeat(storage, trial._trial_id, trial.number):
        time.sleep(0.2)
    assert calls == []
