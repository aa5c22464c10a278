"""Define-by-run suggestions: a trial's parameters -> an architecture config and a training recipe.

Parameter names are indexed by stage (``stage1.placement``, ``stage1.reduction``, ``stage1.pooling``) or,
in tied studies, shared (``placement``...). Ratio and pooling are not suggested for a stage whose placement
is ``none``: they would not change the network, and suggesting them would store one network many times under
different parameters. The same function rebuilds a stored trial through ``optuna.trial.FixedTrial``.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
import torch

from lightning_modules import ArchConfig, build_arch
from lightning_modules.backbones import build_network
from lightning_modules.recipe import TrainingRecipe
from lightning_modules.se import SEBlock
from search.study_config import SearchSpace, StudyConfig

__all__ = ["TrialDesign", "grid_search_space", "one_pixel_se_stages", "stage_choices", "suggest"]


@dataclass(frozen=True)
class TrialDesign:
    """What one trial trains: the network and the recipe."""

    arch: ArchConfig
    recipe: TrainingRecipe


def _pick(trial: optuna.trial.BaseTrial, name: str, choices: tuple) -> object:
    """Suggest among ``choices``; a single choice is a constant and is not stored as a parameter."""
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))


def _stage_se(trial: optuna.trial.BaseTrial, prefix: str, space: SearchSpace) -> tuple[str, int, str]:
    placement = _pick(trial, f"{prefix}placement", space.placement)
    if placement == "none":
        return "none", space.reduction[0], space.pooling[0]
    return (
        placement,
        _pick(trial, f"{prefix}reduction", space.reduction),
        _pick(trial, f"{prefix}pooling", space.pooling),
    )


def stage_choices(trial: optuna.trial.BaseTrial, space: SearchSpace, num_stages: int) -> list[tuple[str, int, str]]:
    """(placement, reduction, pooling) for each stage."""
    if space.tie_stages:
        return [_stage_se(trial, "", space)] * num_stages
    return [_stage_se(trial, f"stage{i + 1}.", space) for i in range(num_stages)]


def suggest(
    trial: optuna.trial.BaseTrial, cfg: StudyConfig, *, num_classes: int, in_channels: int, image_size: int
) -> TrialDesign:
    space = cfg.search_space
    width = float(_pick(trial, "width_multiplier", space.width_multiplier))
    base = build_arch(
        cfg.backbone, num_classes=num_classes, in_channels=in_channels, image_size=image_size, width_multiplier=width
    )
    placements, reductions, poolings = zip(*stage_choices(trial, space, base.num_stages), strict=True)
    arch = base.with_se(placements, reductions, poolings)
    recipe = cfg.training
    changes: dict[str, float] = {}
    for name in ("lr", "weight_decay"):
        rng = getattr(space, name)
        if rng is not None:
            changes[name] = trial.suggest_float(name, rng.low, rng.high, log=rng.log)
    if space.label_smoothing is not None:
        changes["label_smoothing"] = float(_pick(trial, "label_smoothing", space.label_smoothing))
    return TrialDesign(arch, recipe.replace(**changes) if changes else recipe)


def one_pixel_se_stages(cfg: StudyConfig, *, num_classes: int, in_channels: int, image_size: int) -> list[int]:
    """The stages (1-based) whose SE blocks, placed as ``standard``, squeeze a 1x1 feature map at this image
    size. There the squeeze has nothing to pool: ``avg`` and ``max`` are the same network, ``gem`` nearly
    so, and ``std`` gives a constant gate, so searching poolings there stores near-duplicates under
    different names (fastnet_whiten's stage 3 on 8x8 digits). ``search.run`` warns about them."""
    base = build_arch(cfg.backbone, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                      width_multiplier=min(cfg.search_space.width_multiplier))
    stages = base.num_stages
    net = build_network(base.with_se(["standard"] * stages, [16] * stages, ["avg"] * stages))
    sizes: dict[int, set[tuple[int, int]]] = {}

    def record(stage: int) -> object:
        return lambda module, inputs, output: sizes.setdefault(stage, set()).add(tuple(inputs[0].shape[2:]))

    for name, module in net.named_modules():
        if isinstance(module, SEBlock):  # named stages.<i>.<block>.se
            module.register_forward_hook(record(int(name.split(".")[1]) + 1))
    with torch.no_grad():
        net.eval()(torch.zeros(1, in_channels, image_size, image_size))
    return sorted(stage for stage, shapes in sizes.items() if shapes == {(1, 1)})


def grid_search_space(cfg: StudyConfig, num_stages: int) -> dict[str, list]:
    """The full grid of a study's suggested parameters, for ``GridSampler``.

    A grid cannot hold conditional parameters, so a grid study whose placements include ``none`` may not
    also search ratios or poolings (checked here with a message saying so).
    """
    space = cfg.search_space
    if space.lr is not None or space.weight_decay is not None:
        raise ValueError("search_space: a grid study cannot search float ranges (lr, weight_decay); list values")
    if "none" in space.placement and len(space.placement) > 1 and (len(space.reduction) > 1 or len(space.pooling) > 1):
        raise ValueError(
            "search_space: a grid study with 'none' among its placements cannot also search "
            "reduction or pooling (those parameters would be conditional)"
        )
    grid: dict[str, list] = {}
    prefixes = [""] if space.tie_stages else [f"stage{i + 1}." for i in range(num_stages)]
    for prefix in prefixes:
        for name in ("placement", "reduction", "pooling"):
            choices = getattr(space, name)
            if len(choices) > 1 and not (name != "placement" and space.placement == ("none",)):
                grid[f"{prefix}{name}"] = list(choices)
    for name in ("width_multiplier", "label_smoothing"):
        choices = getattr(space, name)
        if choices is not None and len(choices) > 1:
            grid[name] = list(choices)
    return grid
