"""The pruning callback inside real Lightning training: a clearly worse trial is pruned, a good one and a
cheap one are not (multi-objective, Pareto-aware), and pruned trials keep their curve."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.data import prepare_datamodule
from search.objective import Devices, TrialRunner
from search.pruning import CURVE_ATTR
from search.study_config import load_study
from tests.search.helpers import QUICK_STUDY, write_study

pytestmark = pytest.mark.slow

PARAMS = {f"stage{i}.placement": "none" for i in (1, 2, 3)}


def _study_with_finished(flops: float) -> optuna.Study:
    """A real multi-objective study holding four completed trials that reached ~90% accuracy at ``flops``."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for d in (0.0, 0.01, 0.02, 0.03):
        curve = [0.80 + d, 0.88 + d, 0.90 + d]
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=[curve[-1], flops],
                user_attrs={"flops": flops, CURVE_ATTR: curve},
                params=PARAMS,
                distributions={
                    k: optuna.distributions.CategoricalDistribution(["none", "standard", "pre", "post", "identity"])
                    for k in PARAMS
                },
            )
        )
    return study


def _runner(tmp_path: Path, lr: float) -> TrialRunner:
    text = QUICK_STUDY.replace("epochs: 1", "epochs: 3").replace("lr: 0.1", f"lr: {lr}")
    cfg = load_study(str(write_study(tmp_path, text)))
    return TrialRunner(cfg, prepare_datamodule(cfg), Devices("cpu", 1))


def _run(study: optuna.Study, runner: TrialRunner) -> optuna.trial.FrozenTrial:
    study.enqueue_trial(PARAMS)
    trial = study.ask()
    try:
        study.tell(trial, runner(trial))
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    return study.trials[-1]


def test_pruning_callback_prunes_clearly_worse_trial(tmp_path: Path) -> None:
    runner = _runner(tmp_path, lr=1e-9)  # cannot learn: stays at chance, far below the finished trials
    trial = _run(_study_with_finished(flops=1.0), runner)
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["epochs_run"] == 2  # warm-up step 1 kept it; pruned after epoch 2 of 3
    assert len(trial.user_attrs[CURVE_ATTR]) == 2


def test_pruning_callback_keeps_cheaper_trial_when_pareto_aware(tmp_path: Path) -> None:
    runner = _runner(tmp_path, lr=1e-9)
    trial = _run(_study_with_finished(flops=1e15), runner)  # every finished trial costs more than this one
    assert trial.state == TrialState.COMPLETE
    assert len(trial.user_attrs[CURVE_ATTR]) == 3 and "test_accuracy" in trial.user_attrs


def test_pruning_callback_keeps_good_trial(tmp_path: Path) -> None:
    runner = _runner(tmp_path, lr=0.1)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for d in (0.0, 0.01, 0.02, 0.03):  # weak finished trials: a learning trial is above their median
        curve = [0.05 + d, 0.06 + d, 0.07 + d]
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE, values=[curve[-1], 1.0], user_attrs={"flops": 1.0, CURVE_ATTR: curve}
            )
        )
    trial = _run(study, runner)
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["val_accuracy"] > 0.2


def test_running_curve_is_written_after_first_epoch_then_throttled_and_whole_at_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The curve a running trial shows in storage: epoch 1 at once (monitors, crash records), later epochs
    only every CURVE_WRITE_INTERVAL_S (here: never), and the whole curve once the fit ends."""
    import pytorch_lightning as pl

    monkeypatch.setattr("search.pruning.CURVE_WRITE_INTERVAL_S", 1e9)
    seen: list[list[float]] = []

    class ReadStoredCurve(pl.Callback):  # runs after the pruning callback in the same hook
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            stored = study.trials[-1].user_attrs.get(CURVE_ATTR, [])
            seen.append(list(stored))

    monkeypatch.setattr("search.objective.make_trainer", _with_callback(ReadStoredCurve()))
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = _run(study, _runner(tmp_path, lr=0.1))
    assert trial.state == TrialState.COMPLETE
    assert [len(c) for c in seen] == [1, 1, 1]
    assert len(trial.user_attrs[CURVE_ATTR]) == 3 and trial.user_attrs[CURVE_ATTR][0] == seen[0][0]


def _with_callback(extra):  # type: ignore[no-untyped-def]
    from lightning_modules.training import make_trainer

    def make(*args, callbacks=(), **kwargs):  # type: ignore[no-untyped-def]
        return make_trainer(*args, callbacks=[*callbacks, extra], **kwargs)

    return make
