"""``python -m search.run`` end to end on digits, against a real SQLite file, in real subprocesses."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.search.helpers import QUICK_STUDY, run_cli, write_study

pytestmark = pytest.mark.slow

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def _run(tmp_path: Path, study: Path, *extra: str):
    return run_cli(
        "search.run",
        "--study",
        str(study),
        "--storage",
        _storage(tmp_path),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--poll",
        "0.2",
        *extra,
    )


def _load(tmp_path: Path, name: str = "quick") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage(tmp_path))


def test_run_digits_study_completes_and_prints_front(tmp_path: Path) -> None:
    study_file = write_study(tmp_path)
    result = _run(tmp_path, study_file)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _load(tmp_path)
    finished = study.get_trials(states=FINISHED)
    assert len(finished) == 3
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert t.user_attrs["flops"] == 2 * t.user_attrs["macs"] > 0
        assert t.user_attrs["params"] > 0
        assert t.values[1] == t.user_attrs["flops"]
        assert 0.0 <= t.user_attrs["test_accuracy"] <= 1.0
        assert len(t.user_attrs["val_accuracy_curve"]) == 1
        assert t.user_attrs["seed"] == t.number
    # The printed front is exactly study.best_trials.
    table = result.stdout.split("Pareto front")[1].split("hypervolume")[0]
    printed = {int(line.split()[0]) for line in table.splitlines() if line.strip()[:1].isdigit()}
    assert printed == {t.number for t in study.best_trials}
    assert "hypervolume" in result.stdout
    # Provenance stored on the study.
    attrs = study.user_attrs
    assert attrs["versions"]["optuna"] == optuna.__version__
    assert attrs["definition_hash"] and attrs["git_revision"]
    assert study.metric_names == ["val_accuracy", "flops"]


def test_run_resume_adds_trials_up_to_new_total(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, QUICK_STUDY.replace("trials: 3", "trials: 2"))
    assert _run(tmp_path, study_file).returncode == 0
    assert len(_load(tmp_path).get_trials(states=FINISHED)) == 2
    again = _run(tmp_path, study_file, "--trials", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_load(tmp_path).get_trials(states=FINISHED)) == 3


def test_run_changed_definition_is_refused_without_writing(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, QUICK_STUDY.replace("trials: 3", "trials: 1"))
    assert _run(tmp_path, study_file).returncode == 0
    before = len(_load(tmp_path).get_trials())
    study_file.write_text(QUICK_STUDY.replace("reduction: [4, 16]", "reduction: [8]"))
    result = _run(tmp_path, study_file, "--trials", "2")
    assert result.returncode == 2
    assert "different definition" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert len(_load(tmp_path).get_trials()) == before


def test_run_two_workers_share_one_sqlite_study(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, QUICK_STUDY.replace("trials: 3", "trials: 4"))
    result = _run(tmp_path, study_file, "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _load(tmp_path).get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 4
    assert len({t.number for t in trials}) == len(trials)
    with sqlite3.connect(tmp_path / "studies.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_run_rerun_trial_reports_stored_and_new_accuracy(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, QUICK_STUDY.replace("trials: 3", "trials: 1"))
    assert _run(tmp_path, study_file).returncode == 0
    stored = _load(tmp_path).trials[0]
    result = _run(tmp_path, study_file, "--rerun-trial", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stored:" in result.stdout and "rerun:" in result.stdout
    rerun_val = float(result.stdout.split("rerun:")[1].split()[1])
    # Same seed, same data, same network on the CPU: the rerun reproduces the stored accuracy.
    assert rerun_val == pytest.approx(stored.user_attrs["val_accuracy"], abs=1e-6)


def test_run_rerun_trial_uses_the_trials_own_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU kernels sum in an order that follows the thread count, so a rerun in another environment (here one
    thread, where the worker had every core) trains another network unless it pins the trial's count. Seen in
    CI, where an earlier test had left OMP_NUM_THREADS=1 behind for later subprocesses."""
    study_file = write_study(tmp_path, QUICK_STUDY.replace("trials: 3", "trials: 1"))
    assert _run(tmp_path, study_file).returncode == 0
    stored = _load(tmp_path).trials[0]
    assert stored.user_attrs["torch_threads"] >= 1  # the worker's: every core of this machine for one worker
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = _run(tmp_path, study_file, "--rerun-trial", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{stored.user_attrs['torch_threads']} torch threads" in result.stdout
    rerun_val = float(result.stdout.split("rerun:")[1].split()[1])
    assert rerun_val == pytest.approx(stored.user_attrs["val_accuracy"], abs=1e-6)
