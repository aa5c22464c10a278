"""Backbones built from an ``ArchConfig``, and the registry of named presets (one line each).

Presets:

- ``resnet20/32/44/56/110``: He et al. 2016's CIFAR ResNets (3 stages of 16/32/64, option-A shortcuts);
- ``resnet50``/``resnet101``: ImageNet bottleneck ResNets exactly as torchvision builds them (stride on the
  3x3); ``resnet50_v1``/``resnet101_v1`` put the stride on the first 1x1 as the Caffe models behind the
  SE paper's 3.86 GFLOPs did (same parameters, ~6% fewer MACs);
- ``cifar_resnet18``: the common CIFAR ResNet-18 (3x3 stem of 64, four stages);
- ``fastnet``: the quick-study backbone. It is David Page's DAWNBench ResNet-9 (3x3 stem of 64, then per
  stage conv3x3 + max-pool transitions to 128/256/512) with a residual unit in *every* stage so every
  placement applies; that family trains CIFAR-10 to 94% in minutes on one GPU, the best accuracy per second
  of training among plain residual nets (Page 2018; Jordan's airbench builds on it);
- ``fastnet_page``: ``fastnet`` with the rest of Page's network: a global max pool, logits scaled by 1/8 and
  PyTorch's default conv init (his recipe trains it at lr 0.4 with label smoothing 0.2);
- ``fastnet_whiten``: ``fastnet_page`` with Page's patch-whitening stem (``lightning_modules.whitening``): a
  fixed 3x3 whitening convolution fitted on the training images, then a 1x1 convolution to 64 channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lightning_modules.config import ArchConfig, ConfigError
from lightning_modules.registry import Registry
from lightning_modules.units import BRANCHES, ResidualUnit, conv_bn
from lightning_modules.whitening import PatchWhitening

__all__ = ["BACKBONES", "SENet", "build_arch", "build_network"]


def _stem(cfg: ArchConfig) -> nn.Sequential:
    if cfg.stem == "imagenet":
        return nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.stem_width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(cfg.stem_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
    if cfg.stem == "whiten":
        whiten = PatchWhitening(cfg.in_channels)
        return nn.Sequential(whiten, *conv_bn(whiten.out_channels, cfg.stem_width, 1), nn.ReLU(inplace=True))
    return nn.Sequential(*conv_bn(cfg.in_channels, cfg.stem_width, 3), nn.ReLU(inplace=True))


class SENet(nn.Module):
    """Stem, stages of residual units with per-stage SE choices, a global pool (average or max: ``head_pool``),
    a linear head and the logits' ``logit_scale``."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = _stem(cfg)
        expansion = BRANCHES.get(cfg.block).expansion
        stages: list[nn.Module] = []
        channels = cfg.stem_width
        for i in range(cfg.num_stages):
            width, stride = cfg.widths[i], cfg.strides[i]
            layers: list[nn.Module] = []
            if cfg.transition == "conv_pool":
                # Page's ResNet-9 transition: the width change and downsampling happen outside the units.
                layers += [*conv_bn(channels, width * expansion, 3), nn.ReLU(inplace=True)]
                if stride > 1:
                    layers.append(nn.MaxPool2d(stride))
                channels, stride = width * expansion, 1
            for d in range(cfg.depths[i]):
                unit = ResidualUnit(
                    channels,
                    width,
                    stride if d == 0 else 1,
                    block=cfg.block,
                    shortcut=cfg.shortcut,
                    placement=cfg.placements[i],
                    reduction=cfg.reductions[i],
                    pooling=cfg.poolings[i],
                    stride_in_1x1=cfg.stride_in_1x1,
                )
                layers.append(unit)
                channels = unit.out_channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveMaxPool2d(1) if cfg.head_pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, cfg.num_classes)
        self.logit_scale = cfg.logit_scale
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            # "torch" keeps nn.Conv2d's own init, ~2.4x smaller than Kaiming's fan-out normal at 3x3: behind batch
            # norm a smaller weight is a larger effective learning rate (lr / |w|^2), which a 10-epoch run needs.
            if isinstance(m, PatchWhitening):
                continue  # fitted on data, never initialised at random
            if isinstance(m, nn.Conv2d) and self.cfg.conv_init == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits


def _no_se(n: int) -> dict[str, tuple]:
    return {"placements": ("none",) * n, "reductions": (16,) * n, "poolings": ("avg",) * n}


def cifar_resnet(depth: int) -> ArchConfig:
    """He et al.'s CIFAR ResNet-(6n+2): three stages of n basic units, 16/32/64 wide, option-A shortcuts."""
    n = (depth - 2) // 6
    return ArchConfig(
        widths=(16, 32, 64), depths=(n, n, n), strides=(1, 2, 2), shortcut="pad", stem_width=16, **_no_se(3)
    )


def imagenet_resnet(depths: tuple[int, ...], stride_in_1x1: bool = False) -> ArchConfig:
    """A torchvision-layout bottleneck ResNet for 224x224 ImageNet."""
    return ArchConfig(
        widths=(64, 128, 256, 512), depths=depths, strides=(1, 2, 2, 2), block="bottleneck", stem="imagenet",
        stem_width=64, shortcut="conv", stride_in_1x1=stride_in_1x1, num_classes=1000, image_size=224,
        **_no_se(4),
    )


BACKBONES: Registry[Callable[[], ArchConfig]] = Registry("backbone")
BACKBONES.register("resnet20")(lambda: cifar_resnet(20))
BACKBONES.register("resnet32")(lambda: cifar_resnet(32))
BACKBONES.register("resnet44")(lambda: cifar_resnet(44))
BACKBONES.register("resnet56")(lambda: cifar_resnet(56))
BACKBONES.register("resnet110")(lambda: cifar_resnet(110))
BACKBONES.register("cifar_resnet18")(
    lambda: ArchConfig(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), strides=(1, 2, 2, 2), stem_width=64,
                       **_no_se(4))
)
BACKBONES.register("resnet50")(lambda: imagenet_resnet((3, 4, 6, 3)))
BACKBONES.register("resnet101")(lambda: imagenet_resnet((3, 4, 23, 3)))
BACKBONES.register("resnet50_v1")(lambda: imagenet_resnet((3, 4, 6, 3), stride_in_1x1=True))
BACKBONES.register("resnet101_v1")(lambda: imagenet_resnet((3, 4, 23, 3), stride_in_1x1=True))
BACKBONES.register("fastnet")(
    lambda: ArchConfig(widths=(128, 256, 512), depths=(1, 1, 1), strides=(2, 2, 2), stem_width=64,
                       transition="conv_pool", **_no_se(3))
)
BACKBONES.register("fastnet_page")(lambda: BACKBONES.get("fastnet")().replace(
    head_pool="max", logit_scale=0.125, conv_init="torch"))
BACKBONES.register("fastnet_whiten")(lambda: BACKBONES.get("fastnet_page")().replace(stem="whiten"))


def build_arch(
    backbone: str,
    *,
    placement: str | tuple[str, ...] = "none",
    reduction: int | tuple[int, ...] = 16,
    pooling: str | tuple[str, ...] = "avg",
    num_classes: int | None = None,
    image_size: int | None = None,
    in_channels: int | None = None,
    width_multiplier: float = 1.0,
) -> ArchConfig:
    """The preset ``backbone`` with SE choices (one value or one per stage) and data-dependent sizes."""
    cfg = BACKBONES.get(backbone)()
    changes: dict[str, object] = {}
    sizes = {"num_classes": num_classes, "image_size": image_size, "in_channels": in_channels}
    for field, value in sizes.items():
        if value is not None:
            changes[field] = value
    if width_multiplier != 1.0:
        # isfinite: NaN passes a "<= 0" test, and NaN or infinity would fail in round() with a traceback.
        if not (math.isfinite(width_multiplier) and width_multiplier > 0):
            raise ConfigError(f"width_multiplier: must be a finite number > 0, got {width_multiplier!r}")
        changes["widths"] = tuple(max(1, round(w * width_multiplier)) for w in cfg.widths)
        changes["stem_width"] = max(1, round(cfg.stem_width * width_multiplier))
    return cfg.replace(**changes).with_se(placement, reduction, pooling)


def build_network(cfg: ArchConfig) -> SENet:
    return SENet(cfg)
