"""One trial, top to bottom: suggest -> build -> cost -> fit (with pruning) -> test -> values.

Reads like optuna-examples' Lightning example. Everything a trial knows before training (its cost and seed)
is stored on it first, so a trial that dies still says what it was. A trial on several devices runs the same
fit on every DDP rank (``search.ddp``); only this process, rank 0, holds the Optuna trial.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import Strategy

from lightning_modules.classifier import TEST_ACCURACY, SEClassifier
from lightning_modules.training import make_trainer
from search.cost import count_cost
from search.data import data_config, ready_datamodule
from search.ddp import RankGroup
from search.pareto import CONSTRAINTS_ATTR
from search.pruning import CURVE_ATTR, MultiObjectivePruner, PruningCallback
from search.space import TrialDesign, suggest
from search.study_config import StudyConfig
from search.trial_writes import batched_writes, set_user_attrs

__all__ = ["PRUNED_REASON_ATTR", "Devices", "TrialRunner", "train_and_test", "trial_seed"]

PRUNED_REASON_ATTR = "pruned_reason"


@dataclass(frozen=True)
class Devices:
    """Where a worker trains: Lightning accelerator and device count. ``devices`` > 1 trains each trial with
    DDP over that many processes (one per GPU, or CPU processes on gloo), this process being rank 0
    (``search.ddp``)."""

    accelerator: str = "cpu"
    devices: int = 1


def trial_seed(study_seed: int, trial: optuna.trial.BaseTrial | optuna.trial.FrozenTrial) -> int:
    """Seed of a trial: the study seed plus the trial number, or the original trial's number for a retry of a
    trial whose worker died, so the retry trains exactly what the original would have."""
    if isinstance(trial, optuna.Trial):
        # The retry's "failed_trial" is set when the retry is created, so the copy the trial read when it
        # started (Optuna's ``Trial._cached_frozen_trial``) has it: no storage round trip per trial.
        system_attrs = trial._cached_frozen_trial.system_attrs
    else:
        system_attrs = getattr(trial, "system_attrs", {})
    number = system_attrs.get("failed_trial", trial.number)
    return study_seed + number


def train_and_test(design: TrialDesign, seed: int, datamodule: pl.LightningDataModule, *, accelerator: str,
                   devices: int, strategy: str | Strategy, callback: PruningCallback) -> dict[str, Any]:
    """Train ``design`` and, unless the callback pruned it, test it. Every DDP rank runs exactly this."""
    pl.seed_everything(seed, workers=True, verbose=False)
    model = SEClassifier(design.arch, design.recipe)
    trainer = make_trainer(design.recipe.epochs, accelerator=accelerator, devices=devices, strategy=strategy,
                           callbacks=[callback])
    try:
        return _fit_and_test(trainer, model, datamodule, callback)
    finally:
        # Lightning leaves ``datamodule.trainer`` set, and the trainer holds the model, its optimiser and
        # gradients: the DataModule outlives the trial, so cut the link or the trial never leaves memory.
        datamodule.trainer = None


def _fit_and_test(trainer: pl.Trainer, model: SEClassifier, datamodule: pl.LightningDataModule,
                  callback: PruningCallback) -> dict[str, Any]:
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    # The whole curve: the callback writes it to the trial only now and then while training.
    result: dict[str, Any] = {"epochs_run": len(callback.curve), "train_seconds": round(train_seconds, 3),
                              CURVE_ATTR: list(callback.curve)}
    if callback.pruned_at_epoch:
        return {**result, "pruned_at_epoch": callback.pruned_at_epoch}
    val = callback.curve[-1]
    tested = trainer.test(model, datamodule=datamodule, verbose=False)
    return {**result, "val_accuracy": val, "test_accuracy": float(tested[0][TEST_ACCURACY])}


def _helper_rank_fit(accelerator: str, world_size: int, design: TrialDesign, seed: int,
                     datamodule: pl.LightningDataModule, strategy: Strategy) -> dict[str, Any]:
    """A helper rank's part of a trial: the same fit, no trial (pruning decisions arrive by broadcast)."""
    return train_and_test(design, seed, datamodule, accelerator=accelerator, devices=world_size,
                          strategy=strategy, callback=PruningCallback(None, None))


class TrialRunner:
    """The objective: one instance per worker process, reusing that process's DataModule for every trial.

    With ``devices.devices`` > 1 it keeps a ``RankGroup`` of helper processes for DDP; ``close()`` ends them.
    """

    def __init__(self, cfg: StudyConfig, datamodule: pl.LightningDataModule, devices: Devices,
                 trial_attrs: Mapping[str, Any] | None = None) -> None:
        """``trial_attrs``: stored on every trial in its first write (the worker's identity), which saves
        the storage a transaction per trial."""
        self.cfg, self.dm, self.devices = cfg, datamodule, devices
        self.trial_attrs = dict(trial_attrs or {})
        self.mo_pruner = (
            MultiObjectivePruner(cfg.pruner.name, cfg.pruner.options, cfg.pruner.pareto_aware)
            if cfg.multi_objective else None
        )
        self.ranks: RankGroup | None = None
        if devices.devices > 1:
            self.ranks = RankGroup(
                devices.devices, devices.accelerator,
                functools.partial(ready_datamodule, data_config(cfg)),
                functools.partial(_helper_rank_fit, devices.accelerator, devices.devices),
                threads=torch.get_num_threads(),
            )

    def close(self) -> None:
        """End the DDP helper processes, if any."""
        if self.ranks is not None:
            self.ranks.close()

    def design(self, trial: optuna.trial.BaseTrial) -> TrialDesign:
        return suggest(trial, self.cfg, num_classes=self.dm.num_classes, in_channels=self.dm.in_channels,
                       image_size=self.dm.image_size)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        with batched_writes(trial):  # the parameters and what is known before training: one transaction
            design = self.design(trial)
            cost = count_cost(design.arch)
            seed = trial_seed(self.cfg.seed, trial)
            attrs: dict[str, Any] = {**self.trial_attrs, **cost.to_dict(), "seed": seed,
                                     "placements": list(design.arch.placements),
                                     "reductions": list(design.arch.reductions),
                                     "poolings": list(design.arch.poolings)}
            constraints = self.constraint_values(cost.to_dict())
            if constraints:
                attrs[CONSTRAINTS_ATTR] = constraints
            set_user_attrs(trial, attrs)

        result = self.fit(design, seed, trial, flops=cost.flops)
        pruned_at = result.pop("pruned_at_epoch", None)
        reason = f"pruned after epoch {pruned_at}" if pruned_at else None
        set_user_attrs(trial, result | ({PRUNED_REASON_ATTR: reason} if reason else {}))
        if reason:
            raise optuna.TrialPruned(reason)
        metrics = {"val_accuracy": result["val_accuracy"], **cost.to_dict()}
        values = tuple(float(metrics[o]) for o in self.cfg.objectives)
        return values if self.cfg.multi_objective else values[0]

    def constraint_values(self, cost: dict[str, int]) -> list[float]:
        limits = self.cfg.constraints
        return [cost[k] - limit for k, limit in (("flops", limits.max_flops), ("params", limits.max_params))
                if limit is not None]

    def fit(self, design: TrialDesign, seed: int, trial: optuna.Trial | None,
            flops: float | None = None) -> dict[str, Any]:
        """Train and evaluate ``design``; with a ``trial``, report and prune through it (``flops``: the
        network's, for Pareto-aware pruning)."""
        # Without a trial (a rerun) the callback only records the curve, and takes part in the prune broadcast.
        callback = PruningCallback(trial, self.mo_pruner if trial is not None else None, flops)
        d = self.devices
        if self.ranks is None:
            return train_and_test(design, seed, self.dm, accelerator=d.accelerator, devices=d.devices,
                                  strategy="auto", callback=callback)
        result, helpers = self.ranks.run_trial(design, seed, lambda strategy: train_and_test(
            design, seed, self.dm, accelerator=d.accelerator, devices=d.devices, strategy=strategy,
            callback=callback))
        # Evidence that every rank trained and stopped together (a pruned trial: the same epoch on all).
        return {**result, "ddp_world_size": d.devices,
                "ddp_rank_epochs": [result["epochs_run"], *(h["epochs_run"] for h in helpers)]}
