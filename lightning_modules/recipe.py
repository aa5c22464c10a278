"""The training recipe of a trial: ``TrainingRecipe`` (optimiser, schedule, regularisation, test-time
augmentation), the optimisers and schedules it names, and the network as it trains (``build_trainable``).

Torch only, no Lightning: the study file is checked against ``TrainingRecipe`` before ``search.run`` imports
the training stack (Lightning and torchmetrics take several seconds), so a mistake in it is answered at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.backbones import build_network
from lightning_modules.config import ADDED_LATER, ArchConfig, ConfigError
from lightning_modules.registry import Registry

__all__ = ["OPTIMIZERS", "SCHEDULES", "TTA_MODES", "TrainingRecipe", "build_trainable", "eval_logits"]


@dataclass(frozen=True)
class TrainingRecipe:
    """Optimiser, schedule and regularisation of one trial. ``lr`` is the peak learning rate."""

    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "onecycle"
    warmup_fraction: float = 0.2
    # Test-time augmentation for validation and test (``eval_logits``): "flip" adds the logits of the mirrored
    # images (as airbench does; +1.1 points on se_placement's default trial for one more forward pass over the
    # evaluation splits); "flip_translate" also those of the images shifted one pixel either way (airbench's
    # level 2; +0.1 point more there, for three times flip's evaluation). Measured: benchmarks/README.md.
    tta: str = dataclasses.field(default="none", metadata=ADDED_LATER)
    # Page's and airbench's batch-norm treatment: BN scales frozen at 1 and BN biases trained at
    # ``bn_bias_lr_scale`` times the learning rate (they use 64; airbench's ablation: 22 -> 17 epochs to 94%).
    freeze_bn_scale: bool = dataclasses.field(default=False, metadata=ADDED_LATER)
    bn_bias_lr_scale: float = dataclasses.field(default=1.0, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: unknown value {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if self.tta not in TTA_MODES:
            raise ConfigError(f"tta: unknown value {self.tta!r}; allowed: {', '.join(TTA_MODES)}")
        if not isinstance(self.freeze_bn_scale, bool):
            raise ConfigError(f"freeze_bn_scale: must be true or false, got {self.freeze_bn_scale!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: unknown value {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        # name -> (valid?, the rule in words for the message)
        checks = {
            "lr": (self.lr > 0, "> 0"),
            "momentum": (0 <= self.momentum < 1, "in [0, 1)"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "warmup_fraction": (0 < self.warmup_fraction < 1, "in (0, 1)"),
            "bn_bias_lr_scale": (self.bn_bias_lr_scale > 0, "> 0"),
        }
        for name, (ok, rule) in checks.items():
            if not ok or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}: value {getattr(self, name)!r} is out of range; give a finite number {rule}")

    def replace(self, **changes: Any) -> TrainingRecipe:
        return dataclasses.replace(self, **changes)


TTA_MODES = ("none", "flip", "flip_translate")


def eval_logits(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits for evaluation under test-time augmentation ``tta`` (one of ``TTA_MODES``; a weighted sum, as
    accuracy only takes the argmax):

    - ``none``: ``net(x)``;
    - ``flip``: ``net(x) + net(mirrored x)``;
    - ``flip_translate``: airbench94's six views: the flip logits of ``x`` at weight 1/2 and of ``x`` shifted
      diagonally by one pixel up-left and down-right at 1/4 each. Training's random crops make such shifts
      (up to ``default_padding`` pixels, filling the edge with zeros); here, as in airbench, a reflection
      fills the one new row and column.
    """
    if tta == "none":
        return net(x)
    if tta == "flip":
        return net(x) + net(x.flip(-1))
    if tta == "flip_translate":
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = (padded[..., :h, :w], padded[..., 2:, 2:])
        return 0.5 * eval_logits(net, x, "flip") + 0.25 * sum(eval_logits(net, s, "flip") for s in shifted)
    raise ValueError(f"tta: unknown mode {tta!r}; allowed: {', '.join(TTA_MODES)}")


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def build_trainable(arch: ArchConfig, recipe: TrainingRecipe) -> nn.Module:
    """``build_network(arch)`` with what ``recipe`` freezes frozen (``freeze_bn_scale``), here rather than in
    the optimiser: DDP records which parameters train when it wraps the module, before the optimiser exists."""
    net = build_network(arch)
    if recipe.freeze_bn_scale:
        for m in net.modules():
            if isinstance(m, _BATCH_NORMS) and m.affine:
                m.weight.requires_grad_(False)
    return net


def _param_groups(model: nn.Module, r: TrainingRecipe) -> list[dict[str, Any]]:
    """Weight decay on weights of convolutions and linear layers only: decaying BN scales, biases and
    GeM's p only hurts (Goyal et al. 2017, "no bias decay"). With ``bn_bias_lr_scale`` != 1 the BN biases
    form a third group at that multiple of the learning rate (at 1 the groups stay as they always were, so
    an optimiser state saved by an earlier version still loads). Frozen parameters join no group."""
    scaled = {id(m.bias) for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.affine} \
        if r.bn_bias_lr_scale != 1 else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": r.weight_decay, "lr": r.lr},
        {"params": [p for p in params if p.ndim <= 1 and id(p) not in scaled], "weight_decay": 0.0, "lr": r.lr},
        {"params": [p for p in params if id(p) in scaled], "weight_decay": 0.0, "lr": r.lr * r.bn_bias_lr_scale},
    ]
    return [g for g in groups if g["params"]]


OPTIMIZERS: Registry[Any] = Registry("optimizer")
OPTIMIZERS.register("sgd")(
    lambda model, r: torch.optim.SGD(
        _param_groups(model, r), lr=r.lr, momentum=r.momentum, nesterov=r.nesterov and r.momentum > 0
    )
)
OPTIMIZERS.register("adamw")(lambda model, r: torch.optim.AdamW(_param_groups(model, r), lr=r.lr))

SCHEDULES: Registry[Any] = Registry("schedule")


@SCHEDULES.register("onecycle")
def _one_cycle(opt: torch.optim.Optimizer, r: TrainingRecipe, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then linear decay (no momentum cycling)."""
    warmup = r.warmup_fraction
    # torch divides by the warm-up's length in steps less one, so a warm-up of exactly one step (0.2 of a
    # 5-step run: a small split for one epoch) fails with ZeroDivisionError; make it two steps (none when the
    # whole run is two steps or fewer).
    if math.isclose(warmup * steps, 1.0):
        warmup = 2 / steps if steps > 2 else 0.0
    # One peak per parameter group: each group's own lr (BN biases may train faster, ``bn_bias_lr_scale``).
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps, pct_start=warmup,
        anneal_strategy="linear", cycle_momentum=False,
    )


SCHEDULES.register("cosine")(lambda opt, r, steps: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps))
SCHEDULES.register("constant")(lambda opt, r, steps: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0))
