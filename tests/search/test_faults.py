"""Fault isolation inside a trial: divergence, CUDA out of memory, any other exception, Ctrl-C and SIGTERM.

Each failure is recorded on its trial with the reason (and a traceback summary for unexpected errors), and
the worker goes on with the next trial. The worker-level tests run the real worker loop in this process on
a real SQLite study with real Lightning training; Ctrl-C is tested end to end in subprocesses.
"""

from __future__ import annotations

import gc
import os
import signal
import time
import weakref
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search.data import prepare_datamodule
from search.objective import Devices, TrialRunner
from search.space import TrialDesign
from search.storage import open_storage
from search.study_config import load_study
from search.study_store import create_or_load_study
from search.worker import FAIL_REASON_ATTR, MAX_CONSECUTIVE_FAILURES, WorkerGaveUp, WorkerSpec, _run_one, run_worker
from tests.lightning_modules.test_data import _write_tree
from tests.search.helpers import load, start_cli, states, tiny_study, wait_until, worker_logs

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _study(tmp_path: Path, study_file: Path, name: str = "faults") -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    cfg = load_study(str(study_file))
    study = create_or_load_study(open_storage(url, heartbeat_interval=None), name, cfg, 3)
    return url, study


def _spec(study_file: Path, url: str, trials: int, name: str = "faults") -> WorkerSpec:
    return WorkerSpec(study=str(study_file), study_name=name, storage=url, trials=trials, heartbeat_interval=None)


def test_worker_divergent_trial_fails_with_reason_and_study_continues(tmp_path: Path) -> None:
    study_file = tiny_study(tmp_path, search_space={"lr": {"low": 0.01, "high": 1.0e31, "log": True}})
    url, study = _study(tmp_path, study_file)
    study.enqueue_trial({"lr": 1.0e30})  # weights and logits overflow float32 in the first steps
    study.enqueue_trial({"lr": 0.05})
    run_worker(_spec(study_file, url, trials=1))
    first, second = load(url, "faults").trials
    assert first.state == TrialState.FAIL
    assert first.user_attrs[FAIL_REASON_ATTR].startswith("diverged: training loss is")
    assert second.state == TrialState.COMPLETE and second.params["lr"] == 0.05


def test_worker_gives_up_after_consecutive_failures(tmp_path: Path) -> None:
    study_file = tiny_study(tmp_path, training={"lr": 1.0e30})  # every trial diverges
    url, _ = _study(tmp_path, study_file)
    with pytest.raises(WorkerGaveUp, match=f"{MAX_CONSECUTIVE_FAILURES} trials in a row failed"):
        run_worker(_spec(study_file, url, trials=2))
    trials = load(url, "faults").trials
    assert [t.state for t in trials] == [TrialState.FAIL] * MAX_CONSECUTIVE_FAILURES
    assert all(t.user_attrs[FAIL_REASON_ATTR].startswith("diverged") for t in trials)


class _WrongChannelsRunner(TrialRunner):
    """A real bug inside a trial: the network is built for RGB while the digits are grayscale, so the first
    convolution of the real Lightning fit raises."""

    def design(self, trial: optuna.trial.BaseTrial) -> TrialDesign:
        design = super().design(trial)
        return TrialDesign(design.arch.replace(in_channels=3), design.recipe)


def test_run_one_exception_records_traceback_and_worker_goes_on(tmp_path: Path) -> None:
    study_file = tiny_study(tmp_path)
    _, study = _study(tmp_path, study_file)
    cfg = load_study(str(study_file))
    dm = prepare_datamodule(cfg)
    assert not _run_one(study, study.ask(), _WrongChannelsRunner(cfg, dm, Devices()))
    assert _run_one(study, study.ask(), TrialRunner(cfg, dm, Devices()))
    broken, fine = study.trials
    assert broken.state == TrialState.FAIL
    assert broken.user_attrs[FAIL_REASON_ATTR].startswith("RuntimeError:")
    assert "Traceback" in broken.user_attrs["traceback"] and "conv" in broken.user_attrs["traceback"]
    assert fine.state == TrialState.COMPLETE


def test_run_one_cuda_oom_fails_trial_and_frees_memory(tmp_path: Path) -> None:
    """A stand-in for hardware this machine lacks: the runner raises the exception type PyTorch raises on a
    CUDA out-of-memory error, from a frame holding a large tensor in a reference cycle (as a Lightning
    trainer, module and optimiser are). The handler must record the reason and free that memory before the
    worker goes on: only a garbage collection after the exception is dropped can release it."""
    study_file = tiny_study(tmp_path)
    _, study = _study(tmp_path, study_file)
    held: list[weakref.ref] = []

    def out_of_memory(trial: optuna.Trial) -> float:
        activations = torch.empty(4_000_000)
        cycle: dict[str, object] = {"activations": activations}
        cycle["self"] = cycle
        held.append(weakref.ref(activations))
        del activations
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 139.8 GiB total)")

    gc.disable()  # only the handler's own collection may free the cycle
    try:
        assert not _run_one(study, study.ask(), out_of_memory)
        assert held[0]() is None, "the trial's memory is still referenced after the handler"
    finally:
        gc.enable()
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[FAIL_REASON_ATTR].startswith("CUDA out of memory. Tried to allocate 20.00 GiB")
    cfg = load_study(str(study_file))
    assert _run_one(study, study.ask(), TrialRunner(cfg, prepare_datamodule(cfg), Devices()))


@pytest.mark.slow
@pytest.mark.parametrize(("how", "reason"), [("ctrl-c", "interrupted (Ctrl-C)"), ("sigterm", "terminated (SIGTERM)")])
def test_run_stop_signal_marks_running_trials_failed_exit_130(tmp_path: Path, how: str, reason: str) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group (run and its workers);
    SIGTERM (a scheduler's stop) reaches only the main process, which passes it on."""
    study_file = tiny_study(tmp_path, training={"epochs": 40}, trials=4)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    runs = tmp_path / "runs"
    proc = start_cli("search.run", "--study", str(study_file), "--storage", url, "--runs-dir", str(runs),
                     "--workers", "2", "--poll", "0.2", log=tmp_path / "run.log")
    try:
        wait_until(lambda: _running_with_epoch(url), 300, "both workers to be inside a trial")
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:  # twice, as some schedulers do: the second must not cut the clean stop short
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 130, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    study = load(url, "tiny")
    assert states(study)["RUNNING"] == 0 and states(study)["WAITING"] == 0, states(study)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 2
    assert {t.user_attrs[FAIL_REASON_ATTR] for t in failed} == {reason}
    assert "Traceback" not in worker_logs(runs, "tiny")


def _running_with_epoch(url: str, count: int = 2) -> bool:
    """``count`` trials running, each past its first epoch (so the stop lands inside Lightning's fit)."""
    try:
        running = load(url, "tiny").get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except KeyError:
        return False
    return len(running) == count and all(t.user_attrs.get("val_accuracy_curve") for t in running)


def test_stop_workers_kills_a_worker_that_ignores_further_signals(tmp_path: Path, capsys) -> None:
    """A worker that took the first stop signal only notes later ones (``search.worker._on_signal``); if it
    then hangs (a native call, a DDP teardown), the command's SIGTERM does not end it either. The command
    must still end: the worker is killed, and the user is told why (its trial is retried once stale)."""
    import subprocess
    import sys

    from search.study_run import _stop_workers

    ignores = ("import signal, sys, time\n"
               "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_IGN)\n"
               "print('ready', flush=True); time.sleep(600)\n")
    waits = "import time\nprint('ready', flush=True); time.sleep(600)\n"
    stubborn, obliging = (subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                          for code in (ignores, waits))
    # Signalled only once they are sleeping: Python started, its handlers (or their absence) in place.
    assert stubborn.stdout.readline() == obliging.stdout.readline() == "ready\n"
    try:
        _stop_workers([(stubborn, tmp_path / "w0.log"), (obliging, tmp_path / "w1.log")], timeout=1, grace=1)
        assert stubborn.returncode == -signal.SIGKILL
        assert obliging.returncode == -signal.SIGINT  # it took the stop signal itself: not killed
        assert "worker 0 did not stop within 2 s; killed it" in capsys.readouterr().err
    finally:
        for proc in (stubborn, obliging):
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_run_ctrl_c_with_dataloader_workers_records_the_interrupt(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group, DataLoader worker processes included (image trees over
    64 px). They must stop quietly, as torch expects, so the trial is failed as interrupted, not with a
    "DataLoader worker exited unexpectedly" or a traceback from a worker."""
    tree = _write_tree(tmp_path / "tree", n_train=40, n_test=10, size=(72, 72))  # over 64 px: DataLoaders
    study_file = tiny_study(tmp_path, data={"dataset": "imagefolder", "data_dir": str(tree), "image_size": 72,
                                            "num_workers": 2, "val_size": 0.2},
                            training={"epochs": 200, "batch_size": 16}, trials=1)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    runs = tmp_path / "runs"
    proc = start_cli("search.run", "--study", str(study_file), "--storage", url, "--runs-dir", str(runs),
                     "--poll", "0.2", log=tmp_path / "run.log")
    try:
        wait_until(lambda: _running_with_epoch(url, 1), 300, "the trial to be past its first epoch")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 130, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    failed = load(url, "tiny").get_trials(states=(TrialState.FAIL,))
    assert [t.user_attrs[FAIL_REASON_ATTR] for t in failed] == ["interrupted (Ctrl-C)"]
    assert "Traceback" not in worker_logs(runs, "tiny")
