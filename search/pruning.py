"""Pruning on validation accuracy, for single- and multi-objective studies.

Optuna refuses ``trial.report``/``should_prune`` in multi-objective studies and none of its pruners accept
them. Single-objective studies use Optuna's pruners directly. Multi-objective studies record each epoch's
validation accuracy on the trial (user attribute ``val_accuracy_curve``) and ask the same Optuna pruner
about those curves through a throw-away in-memory single-objective study that holds the comparable
trials' curves ("shadow study"), so the decision is Optuna's own rule, not a reimplementation. With
``pareto_aware`` only trials whose FLOPs are at most the current trial's are comparable: a cheap network
is never pruned for being worse than networks that cost more.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import optuna
import pytorch_lightning as pl
from optuna.trial import TrialState

from lightning_modules.classifier import VAL_ACCURACY
from lightning_modules.registry import Registry

__all__ = [
    "CURVE_ATTR",
    "PRUNERS",
    "MultiObjectivePruner",
    "PruningCallback",
    "make_pruner",
    "shadow_should_prune",
]

CURVE_ATTR = "val_accuracy_curve"
FLOPS_ATTR = "flops"
# A running trial's curve is written after its first epoch (so monitors and crash records see it train) and
# then at most this often; the objective writes the whole curve when the fit ends. Per-epoch writes were
# most of a short trial's storage time, and pruning never reads a running trial's curve (the shadow study
# compares against finished trials only).
CURVE_WRITE_INTERVAL_S = 5.0

PRUNERS: Registry[Callable[..., optuna.pruners.BasePruner]] = Registry("pruner")
PRUNERS.register("none")(optuna.pruners.NopPruner)
PRUNERS.register("median")(optuna.pruners.MedianPruner)
PRUNERS.register("percentile")(optuna.pruners.PercentilePruner)
PRUNERS.register("successive_halving")(optuna.pruners.SuccessiveHalvingPruner)
PRUNERS.register("hyperband")(optuna.pruners.HyperbandPruner)
PRUNERS.register("threshold")(optuna.pruners.ThresholdPruner)

# Hyperband assigns brackets by trial identity, which a shadow study cannot reproduce.
SINGLE_OBJECTIVE_ONLY = frozenset({"hyperband"})


def make_pruner(name: str, options: Mapping[str, Any], *, multi_objective: bool = False) -> optuna.pruners.BasePruner:
    """The Optuna pruner ``name`` with ``options``; ``multi_objective``: also refuse what the shadow study of
    ``MultiObjectivePruner`` cannot run. Every rule on a study's pruner settings is here, so checking a study
    (``create_or_load_study``) and running its trials (the workers) cannot disagree."""
    if multi_objective and name in SINGLE_OBJECTIVE_ONLY:
        raise ValueError(
            f"pruner.name: {name!r} works for single-objective studies only; for multi-objective "
            f"studies use one of: {', '.join(n for n in PRUNERS.names() if n not in SINGLE_OBJECTIVE_ONLY)}"
        )
    try:
        factory = PRUNERS.get(name)
    except ValueError as e:
        raise ValueError(f"pruner.name: {e}") from None
    try:
        return factory(**dict(options))
    except (TypeError, ValueError) as e:  # an unknown option, or a value Optuna refuses (n_startup_trials: -1)
        raise ValueError(f"pruner.options: {e}") from None


def _promotion_steps(pruner: optuna.pruners.SuccessiveHalvingPruner, min_resource: int) -> Iterator[int]:
    """Successive halving's rung promotion steps in order, by Optuna's formula
    (``min_resource * reduction_factor ** (min_early_stopping_rate + rung)``)."""
    rung = 0
    while True:
        yield min_resource * pruner._reduction_factor ** (pruner._min_early_stopping_rate + rung)
        rung += 1


def _rung_attrs(pruner: optuna.pruners.BasePruner, curve: Sequence[float], upto: int) -> dict[str, float]:
    """Successive halving's ``completed_rung_k`` attributes a trial with ``curve`` wrote at steps below
    ``upto`` (step = epoch index from 0).

    Asynchronous SH records the value at each rung's promotion step when the trial reaches it; rebuilding
    them from the curve lets the shadow study hold exactly what the real pruner would have stored.
    """
    if not isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner):
        return {}
    min_resource = pruner._min_resource if isinstance(pruner._min_resource, int) else 1
    steps = itertools.takewhile(lambda step: step < min(upto, len(curve)), _promotion_steps(pruner, min_resource))
    return {f"completed_rung_{rung}": curve[step] for rung, step in enumerate(steps)}


def shadow_should_prune(
    pruner_factory: Callable[[], optuna.pruners.BasePruner],
    curve: Sequence[float],
    finished: Sequence[tuple[Sequence[float], bool]],
) -> bool:
    """Optuna's decision for a trial whose accuracy curve (step k = after epoch k + 1) is ``curve``, against
    ``finished`` trials given as (curve, completed?) pairs. A fresh pruner is made per decision, since
    some pruners cache study facts on themselves."""
    pruner = pruner_factory()
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for other, completed in finished:
        if not other:
            continue
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE if completed else TrialState.PRUNED,
                value=other[-1] if completed else None,
                intermediate_values=dict(enumerate(other)),
                system_attrs=_rung_attrs(pruner, other, len(other)),
            )
        )
    trial = study.ask()
    for step, value in enumerate(curve):
        trial.report(value, step)
    for key, value in _rung_attrs(pruner, curve, len(curve) - 1).items():
        study._storage.set_trial_system_attr(trial._trial_id, key, value)
    return pruner.prune(study, study._storage.get_trial(trial._trial_id))


def _decision_steps(pruner: optuna.pruners.BasePruner) -> Callable[[int], bool]:
    """Whether ``pruner`` can prune at a step, known without the other trials where the rule says so.

    Successive halving compares a trial only at its rungs' promotion steps; at every other step its
    ``prune`` returns False before reading the study. Knowing that here spares the storage a read of every
    finished trial at most epochs. Other pruners (and successive halving with ``min_resource: auto``): every
    step."""
    if isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner) and isinstance(pruner._min_resource, int):
        min_resource = pruner._min_resource
        return lambda step: step in itertools.takewhile(lambda s: s <= step, _promotion_steps(pruner, min_resource))
    return lambda step: True


class MultiObjectivePruner:
    """Prunes a multi-objective trial on its validation-accuracy curve (see module docstring)."""

    def __init__(self, name: str, options: Mapping[str, Any], pareto_aware: bool) -> None:
        self.name, self.options, self.pareto_aware = name, dict(options), pareto_aware
        # Also validates the settings now, not at the first decision.
        self._decision_steps = _decision_steps(make_pruner(name, options, multi_objective=True))

    def reads_trials_at(self, step: int) -> bool:
        """Whether a decision at ``step`` reads the finished trials (the pruner can compare there)."""
        return self.name != "none" and self._decision_steps(step)

    def should_prune(self, trial: optuna.Trial, curve: Sequence[float], own_flops: float | None = None) -> bool:
        """``own_flops``: the trial's FLOPs if the caller knows them (saves a storage read per epoch)."""
        if not self.reads_trials_at(len(curve) - 1):
            return False  # the pruner would not compare at this step: no need to read the other trials
        if own_flops is None:
            own_flops = trial.user_attrs.get(FLOPS_ATTR)
        finished = []
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if self.pareto_aware and own_flops is not None and t.user_attrs.get(FLOPS_ATTR, float("inf")) > own_flops:
                continue
            finished.append((t.user_attrs.get(CURVE_ATTR, []), t.state == TrialState.COMPLETE))
        return shadow_should_prune(lambda: make_pruner(self.name, self.options), curve, finished)


class PruningCallback(pl.Callback):
    """Records validation accuracy after every epoch and stops the fit when the trial should be pruned.

    Only rank 0 talks to the study; its decision is broadcast, so every DDP rank stops together. The
    objective turns ``pruned_at_epoch`` into ``optuna.TrialPruned`` after the fit returns. Ranks other than 0
    (and a rerun of a stored trial) hold no trial: ``trial`` None records the curve and joins the broadcast.
    """

    def __init__(self, trial: optuna.Trial | None, mo_pruner: MultiObjectivePruner | None,
                 flops: float | None = None) -> None:
        self.trial, self.mo_pruner, self.flops = trial, mo_pruner, flops
        self.curve: list[float] = []
        self.pruned_at_epoch: int | None = None
        self._curve_written_at: float | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or VAL_ACCURACY not in trainer.callback_metrics:
            return
        self.curve.append(float(trainer.callback_metrics[VAL_ACCURACY]))
        epoch = len(self.curve)
        prune = False
        if trainer.is_global_zero and self.trial is not None:
            self._write_curve()
            if self.mo_pruner is None:
                self.trial.report(self.curve[-1], epoch - 1)
            if epoch < trainer.max_epochs:  # after the last epoch there is nothing left to save
                prune = self._decide()
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned_at_epoch = epoch
            trainer.should_stop = True

    def _write_curve(self) -> None:
        now = time.monotonic()
        if self._curve_written_at is None or now - self._curve_written_at >= CURVE_WRITE_INTERVAL_S:
            self.trial.set_user_attr(CURVE_ATTR, list(self.curve))
            self._curve_written_at = now

    def _decide(self) -> bool:
        if self.mo_pruner is None:
            return self.trial.should_prune()
        return self.mo_pruner.should_prune(self.trial, self.curve, self.flops)
