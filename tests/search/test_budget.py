"""The worker's budget bookkeeping (``search.worker.Budget``): one read of the trials per loop pass, and a
surplus check after ``ask`` that is skipped only when the trial cannot be over the budget."""

from __future__ import annotations

import random
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.storage import open_storage
from search.worker import Budget, _is_surplus

END_STATES = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, None]  # None: left running


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/budget.db", heartbeat_interval=None))


def _start(study: optuna.Study, state: TrialState | None) -> optuna.Trial:
    trial = study.ask()
    if state is not None:
        study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)
    return trial


def test_budget_counts_finished_running_and_failed(tmp_path: Path) -> None:
    study = _study(tmp_path)
    for state in [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, None, TrialState.COMPLETE]:
        _start(study, state)
    budget = Budget.read(study, trials=4)
    assert (budget.finished, budget.running, budget.last_number) == (3, 1, 4)
    assert budget.counted_numbers == (0, 1, 3, 4)  # the failed trial 2 does not count
    assert not budget.done and not budget.left  # 3 finished + 1 running fill a budget of 4
    assert Budget.read(study, trials=5).left
    assert Budget.read(study, trials=3).done


@pytest.mark.parametrize("seed", range(6))
def test_surplus_check_is_skipped_only_when_the_trial_cannot_be_surplus(tmp_path: Path, seed: int) -> None:
    """Other workers create and finish trials between a worker's read and its ask; whenever the worker skips
    the surplus read, the trial it asked is really within the budget. Early in a study it does skip."""
    rng = random.Random(seed)
    study = _study(tmp_path)
    trials, skipped, checked = 30, 0, 0
    while len(study.trials) < 60:
        budget = Budget.read(study, trials)
        for _ in range(rng.randint(0, 3)):  # other workers, between this worker's read and its ask
            _start(study, rng.choice(END_STATES))
        for old in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if rng.random() < 0.3:  # some trials running elsewhere finish meanwhile
                if rng.random() < 0.5:
                    study.tell(old.number, 0.5)
                else:
                    study.tell(old.number, state=TrialState.FAIL)
        trial = study.ask()
        if budget.surely_not_surplus(trial):
            skipped += 1
            assert not _is_surplus(study, trial, trials), (trial.number, budget)
        else:
            checked += 1
        study.tell(trial, 0.5)
    assert skipped >= 5 and checked >= 5
