"""The architecture config: a frozen, validated description of one SE network, one entry per stage.

Validated once at construction (DESIGN.md convention 3): every message names the field, the bad value and
what is allowed, so a study file or a CLI flag with a typo fails before anything is built or stored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_modules.registry import Registry
from lightning_modules.se import POOLINGS
from lightning_modules.units import BRANCHES, PLACEMENTS, SHORTCUTS

__all__ = ["CONV_INITS", "HEAD_POOLS", "STEMS", "TRANSITIONS", "ArchConfig", "ConfigError", "per_stage"]

# Names only: the modules they stand for are built in ``backbones``, which registers them.
STEMS: tuple[str, ...] = ("cifar", "imagenet", "whiten")
TRANSITIONS: tuple[str, ...] = ("unit", "conv_pool")
HEAD_POOLS: tuple[str, ...] = ("avg", "max")
CONV_INITS: tuple[str, ...] = ("kaiming", "torch")


# Metadata of a config field added after studies were stored: while it holds its default it is left out of a
# study's identity (``search.study_config.StudyConfig.identity``), so a study stored before the field existed
# keeps its definition hash and resumes; any other value is part of the identity like every field.
ADDED_LATER = {"identity": "omitted at default"}


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and the allowed values."""


def _allowed(field: str, value: Any, allowed: Sequence[str] | Registry[Any]) -> None:
    names = allowed.names() if isinstance(allowed, Registry) else tuple(allowed)
    if value not in names:
        raise ConfigError(f"{field}: unknown value {value!r}; allowed: {', '.join(names)}")


def per_stage(field: str, value: Any, num_stages: int) -> tuple[Any, ...]:
    """One value per stage: a single value applies to every stage, a sequence must have one per stage."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        return (value,) * num_stages
    values = tuple(value)
    if len(values) == 1:
        return values * num_stages
    if len(values) != num_stages:
        raise ConfigError(
            f"{field}: got {len(values)} values {list(values)} for a backbone with {num_stages} stages; "
            f"give one value for all stages or exactly {num_stages}"
        )
    return values


@dataclass(frozen=True)
class ArchConfig:
    """A residual SE network. ``widths`` are the branch widths (bottleneck output = 4 x width)."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    strides: tuple[int, ...]
    placements: tuple[str, ...]
    reductions: tuple[int, ...]
    poolings: tuple[str, ...]
    block: str = "basic"
    stem: str = "cifar"
    stem_width: int = 16
    shortcut: str = "conv"
    transition: str = "unit"
    stride_in_1x1: bool = False
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    # The head and the initialisation (Page's ResNet-9 uses a global max pool, logits x 1/8 and PyTorch's
    # default conv init; He et al.'s ResNets average-pool and init convs with Kaiming's fan-out normal).
    head_pool: str = "avg"
    logit_scale: float = 1.0
    conv_init: str = "kaiming"

    def __post_init__(self) -> None:
        n = len(self.widths)
        if n == 0:
            raise ConfigError("widths: a backbone needs at least one stage")
        for name in ("depths", "strides", "placements", "reductions", "poolings"):
            object.__setattr__(self, name, per_stage(name, getattr(self, name), n))
        for name in ("widths", "depths", "strides"):
            for i, v in enumerate(getattr(self, name)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConfigError(f"{name}[{i}]: must be an integer >= 1, got {v!r}")
        for i, (p, r, pool) in enumerate(zip(self.placements, self.reductions, self.poolings, strict=True)):
            _allowed(f"placements[{i}]", p, PLACEMENTS)
            _allowed(f"poolings[{i}]", pool, POOLINGS)
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ConfigError(f"reductions[{i}]: reduction ratio must be an integer >= 1, got {r!r}")
        _allowed("block", self.block, BRANCHES)
        _allowed("stem", self.stem, STEMS)
        _allowed("shortcut", self.shortcut, SHORTCUTS)
        _allowed("transition", self.transition, TRANSITIONS)
        _allowed("head_pool", self.head_pool, HEAD_POOLS)
        _allowed("conv_init", self.conv_init, CONV_INITS)
        scale = self.logit_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < math.inf:
            raise ConfigError(f"logit_scale: must be a finite number > 0, got {self.logit_scale!r}")
        for name in ("stem_width", "num_classes", "in_channels", "image_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")

    @property
    def num_stages(self) -> int:
        return len(self.widths)

    def with_se(
        self,
        placement: str | Sequence[str] | None = None,
        reduction: int | Sequence[int] | None = None,
        pooling: str | Sequence[str] | None = None,
    ) -> ArchConfig:
        """A copy with new SE choices; each is one value for all stages or one per stage."""
        changes: dict[str, Any] = {}
        for field, value in (("placements", placement), ("reductions", reduction), ("poolings", pooling)):
            if value is not None:
                changes[field] = per_stage(field, value, self.num_stages)
        return dataclasses.replace(self, **changes)

    def replace(self, **changes: Any) -> ArchConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
