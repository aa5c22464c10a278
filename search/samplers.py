"""Samplers by name. All are seeded from the study, and all honour the study's constraints (budgets)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optuna

from lightning_modules.registry import Registry
from search.pareto import constraints_of

__all__ = ["SAMPLERS", "make_sampler"]


SamplerFactory = Callable[[int, Mapping[str, Any], dict[str, list], bool], optuna.samplers.BaseSampler]
SAMPLERS: Registry[SamplerFactory] = Registry("sampler")


@SAMPLERS.register("tpe")
def _tpe(
    seed: int, options: Mapping[str, Any], grid: dict[str, list], constrained: bool
) -> optuna.samplers.BaseSampler:
    """Multivariate TPE with the constant liar, so parallel workers do not all try the same region."""
    kwargs: dict[str, Any] = {"multivariate": True, "group": True, "constant_liar": True, "n_startup_trials": 10}
    kwargs.update(options)
    return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints_of if constrained else None, **kwargs)


@SAMPLERS.register("nsga2")
def _nsga2(
    seed: int, options: Mapping[str, Any], grid: dict[str, list], constrained: bool
) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints_of if constrained else None, **options)


@SAMPLERS.register("random")
def _random(
    seed: int, options: Mapping[str, Any], grid: dict[str, list], constrained: bool
) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed, **options)


@SAMPLERS.register("grid")
def _grid(
    seed: int, options: Mapping[str, Any], grid: dict[str, list], constrained: bool
) -> optuna.samplers.BaseSampler:
    """Every combination once (the paper's ablation tables); the study stops when the grid is exhausted."""
    return optuna.samplers.GridSampler(grid, seed=seed, **options)


def make_sampler(
    name: str, seed: int, options: Mapping[str, Any], grid: dict[str, list], constrained: bool
) -> optuna.samplers.BaseSampler:
    factory = SAMPLERS.get(name)
    try:
        return factory(seed, dict(options), grid, constrained)
    except TypeError as e:
        raise ValueError(f"sampler.options: {e}") from None
