"""``python -m search.run`` end to end on digits, against a real SQLite file, in real subprocesses."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.storage import open_storage
from search.study_config import load_study
from search.study_store import create_or_load_study
from tests.conftest import isolated_env
from tests.search.helpers import QUICK_STUDY, run_cli, tiny_study, write_study

pytestmark = pytest.mark.slow

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def _run(tmp_path: Path, study: Path, *extra: str, env: dict[str, str] | None = None):
    return run_cli("search.run", "--study", str(study), "--storage", _storage(tmp_path), "--runs-dir",
                   str(tmp_path / "runs"), "--poll", "0.2", *extra, env=env)


def test_run_warns_where_searched_poolings_squeeze_one_pixel(tmp_path: Path) -> None:
    """The README's first command: fastnet_whiten's stage 3 sees 1x1 maps on 8x8 digits, where the searched
    poolings are (nearly) one network; the run says so once, and runs."""
    result = run_cli("search.run", "--study", "se_placement", "--dataset", "digits", "--trials", "1", "--epochs",
                     "1", "--storage", _storage(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--poll", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "at image size 8, the SE blocks of stage(s) 3 squeeze 1x1" in warnings[0]


def _rerun_val(stdout: str) -> float:
    """The rerun's validation accuracy from ``--rerun-trial``'s report (``rerun:  val 0.123456  test ...``)."""
    return float(stdout.split("rerun:")[1].split()[1])


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
    low, high = attrs["cost_ranges"]["flops"]  # the hypervolume's cost axis: the space's cheapest to costliest
    assert 0 < low < min(t.user_attrs["flops"] for t in finished) <= high
    assert "hypervolume (accuracy x cost scaled over the search space's range" in result.stdout
    assert study.metric_names == ["val_accuracy", "flops"]
    assert "warning:" not in result.stderr  # resnet20's last stage is 2x2 on 8x8 digits: poolings differ
    # The worker's log says which trial started, not Lightning's banners and warnings once per trial.
    log = (tmp_path / "runs" / "logs" / "quick" / "worker-0.log").read_text()
    assert log.count("trial 2 started") == 1
    for noise in ("GPU available", "Trainer.fit", "estimate number of stepping batches", "Heartbeat of storage"):
        assert noise not in log, noise


@pytest.fixture(scope="module")
def one_trial_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the quick study cut to one trial and the SQLite file of a finished run of it; tests
    that only reread or refuse it take a copy (``_copy_of``) rather than train their own."""
    root = tmp_path_factory.mktemp("one-trial")
    study_file = write_study(root, QUICK_STUDY.replace("trials: 3", "trials: 1"))
    result = _run(root, study_file, env=isolated_env(tmp_path_factory))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _copy_of(run: Path, tmp_path: Path) -> Path:
    """The run's study file and database copied into ``tmp_path``; returns the study file's copy."""
    for name in ("quick.yaml", "studies.db"):
        shutil.copy2(run / name, tmp_path / name)
    return tmp_path / "quick.yaml"


def test_run_resume_adds_trials_up_to_new_total(one_trial_run: Path, tmp_path: Path) -> None:
    study_file = _copy_of(one_trial_run, tmp_path)
    first = _load(tmp_path).get_trials(states=FINISHED)
    assert len(first) == 1
    again = _run(tmp_path, study_file, "--trials", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming: 1 finished" in again.stdout
    trials = _load(tmp_path).get_trials(states=FINISHED)
    assert len(trials) == 3 and trials[0].params == first[0].params  # the first trial kept, two added
    # The resumed worker's sampler does not start from the first run's state: TPE's random start-up trials
    # would otherwise propose trial 0's parameters again for trial 1.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3, [t.params for t in trials]


def test_run_changed_definition_is_refused_without_writing(one_trial_run: Path, tmp_path: Path) -> None:
    study_file = _copy_of(one_trial_run, tmp_path)
    before = len(_load(tmp_path).get_trials())
    study_file.write_text(QUICK_STUDY.replace("reduction: [4, 16]", "reduction: [8]"))
    result = _run(tmp_path, study_file, "--trials", "2")
    assert result.returncode == 2
    assert "different definition" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert len(_load(tmp_path).get_trials()) == before


def test_run_rerun_trial_reports_stored_and_new_accuracy(one_trial_run: Path, tmp_path: Path) -> None:
    study_file = _copy_of(one_trial_run, tmp_path)
    stored = _load(tmp_path).trials[0]
    result = _run(tmp_path, study_file, "--rerun-trial", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stored:" in result.stdout and "rerun:" in result.stdout
    # Same seed, same data, same network on the CPU: the rerun reproduces the stored accuracy.
    assert _rerun_val(result.stdout) == pytest.approx(stored.user_attrs["val_accuracy"], abs=1e-6)


def test_run_rerun_trial_uses_the_trials_own_thread_count(one_trial_run: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU kernels sum in an order that follows the thread count, so a rerun in another environment (here one
    thread, where the worker had every core) trains another network unless it pins the trial's count. Seen in
    CI, where an earlier test had left OMP_NUM_THREADS=1 behind for later subprocesses."""
    study_file = _copy_of(one_trial_run, tmp_path)
    stored = _load(tmp_path).trials[0]
    assert stored.user_attrs["torch_threads"] >= 1  # the worker's: every core of this machine for one worker
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = _run(tmp_path, study_file, "--rerun-trial", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{stored.user_attrs['torch_threads']} torch threads" in result.stdout
    assert _rerun_val(result.stdout) == pytest.approx(stored.user_attrs["val_accuracy"], abs=1e-6)


def test_run_rerun_trial_trains_over_as_many_ddp_ranks_as_the_trial(tmp_path: Path) -> None:
    """A trial trained with DDP over 2 processes is rerun over 2: on one, its global batch would be half and
    its steps twice as many, another training run (and another accuracy)."""
    study_file = tiny_study(tmp_path, trials=1)
    first = _run(tmp_path, study_file, "--procs-per-trial", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    stored = _load(tmp_path, "tiny").trials[0]
    assert stored.user_attrs["ddp_world_size"] == 2
    result = _run(tmp_path, study_file, "--rerun-trial", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP over 2 processes:" in result.stdout
    assert _rerun_val(result.stdout) == pytest.approx(stored.user_attrs["val_accuracy"], abs=1e-6)


def test_run_heartbeats_off_with_orphaned_running_trials_says_why_it_cannot_finish(tmp_path: Path) -> None:
    """A trial left RUNNING by a worker that died, and heartbeats off: nothing will ever fail and retry it, so
    the command cannot fill its budget. It exits 1 and says so, instead of a bare exit status."""
    study_file = tiny_study(tmp_path)
    storage = open_storage(_storage(tmp_path), heartbeat_interval=None)
    create_or_load_study(storage, "tiny", load_study(str(study_file)), 3).ask()  # the dead worker's trial
    result = _run(tmp_path, study_file, "--trials", "1", "--heartbeat-interval", "0")
    assert result.returncode == 1, result.stderr[-3000:]
    assert ("error: the study holds 0 of its 1 finished trials; 1 trial(s) still RUNNING hold the rest of the "
            "budget, and with heartbeats off (--heartbeat-interval 0) nothing fails and retries them") in result.stderr
