"""SE network family: SE block and pooling registry, residual units with placements, backbones,
the classification LightningModule and the DataModules. Nothing here imports Optuna."""

from __future__ import annotations

from lightning_modules.backbones import BACKBONES, SENet, build_arch, build_network
from lightning_modules.config import ArchConfig, ConfigError, per_stage
from lightning_modules.registry import Registry
from lightning_modules.se import POOLINGS, SEBlock
from lightning_modules.units import PLACEMENTS, ResidualUnit

__all__ = [
    "BACKBONES",
    "PLACEMENTS",
    "POOLINGS",
    "ArchConfig",
    "ConfigError",
    "Registry",
    "ResidualUnit",
    "SEBlock",
    "SENet",
    "build_arch",
    "build_network",
    "per_stage",
]
