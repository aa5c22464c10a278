"""Four worker processes on one study, on PostgreSQL and on SQLite: unique trial numbers, the exact finished
count, zero storage errors. Also the storage throughput benchmark (``benchmarks/concurrency.py``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from optuna.trial import TrialState

from benchmarks.concurrency import measure
from search.worker import FAIL_REASON_ATTR, SURPLUS_REASON
from tests.search.helpers import load, run_cli, tiny_study, worker_logs

STORAGE_ERRORS = ("Traceback", "OperationalError", "StorageInternalError", "database is locked", "deadlock",
                  "storage error")


@pytest.mark.slow
@pytest.mark.parametrize("storage_url", ["sqlite", "postgresql"], indirect=True)
def test_concurrency_four_workers_share_one_study(tmp_path: Path, storage_url: str, study_name: str) -> None:
    study_file = tiny_study(tmp_path, trials=12)
    runs = tmp_path / "runs"
    result = run_cli("search.run", "--study", str(study_file), "--study-name", study_name, "--storage", storage_url,
                     "--runs-dir", str(runs), "--workers", "4", "--poll", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(storage_url, study_name).trials
    assert len({t.number for t in trials}) == len(trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 12
    # Workers racing for the last slots may create a trial and hand it back as surplus; nothing else fails.
    assert all(t.user_attrs.get(FAIL_REASON_ATTR) == SURPLUS_REASON for t in trials if t not in complete)
    assert len({t.user_attrs["worker"] for t in complete}) >= 2  # the work was shared
    logs = worker_logs(runs, study_name) + result.stderr
    assert not [e for e in STORAGE_ERRORS if e in logs], logs[-3000:]
    if storage_url.startswith("sqlite"):  # readers never wait for the writer: set on the file by search.storage
        with sqlite3.connect(storage_url.removeprefix("sqlite:///")) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("storage_url", ["sqlite", "postgresql"], indirect=True)
def test_benchmark_concurrency_measures_storage_throughput(storage_url: str) -> None:
    result = measure(storage_url, procs=2, seconds=3)
    assert result["trials"] > 0 and result["trials_per_s"] > 0
    assert result["error_count"] == 0, result["errors"]
    assert result["unique_numbers"] and result["stored_complete"] == result["trials"]
