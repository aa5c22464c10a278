"""Trials in one worker process do not leak: no model, trainer or optimiser outlives its trial."""

from __future__ import annotations

import gc
from pathlib import Path

import optuna
import pytest
import pytorch_lightning as pl

from lightning_modules.classifier import SEClassifier
from search.data import prepare_datamodule
from search.objective import Devices, TrialRunner
from search.study_config import load_study
from search.worker import _free_memory, _run_one
from tests.search.helpers import TINY_STUDY, write_study

pytestmark = pytest.mark.slow


def _alive(kind: type) -> int:
    return sum(isinstance(o, kind) for o in gc.get_objects())


def test_worker_trials_leave_no_models_or_trainers_alive(tmp_path: Path) -> None:
    cfg = load_study(str(write_study(tmp_path, TINY_STUDY)))
    runner = TrialRunner(cfg, prepare_datamodule(cfg), Devices("cpu", 1))
    study = optuna.create_study(directions=["maximize", "minimize"])
    for _ in range(3):
        assert _run_one(study, study.ask(), runner)
        _free_memory()  # what the worker loop does after every trial
        assert _alive(SEClassifier) == 0
        assert _alive(pl.Trainer) == 0
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3
