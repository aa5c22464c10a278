"""Residual units (basic and bottleneck) with the five SE placements of Hu et al., TPAMI 2019, Fig. 5.

A unit computes out = relu(F(x) + S(x)), F the residual branch and S the shortcut. A placement says where the
SE block sits; each one is a small combine function plus one registry entry:

| placement  | output                      | SE sees                         |
| ---------- | --------------------------- | ------------------------------- |
| none       | relu(F(x) + S(x))           | -                               |
| standard   | relu(SE(F(x)) + S(x))       | the branch output (C_out)       |
| pre        | relu(F(SE(x)) + S(x))       | the unit input, branch only     |
| post       | SE(relu(F(x) + S(x)))       | the activated sum (C_out)       |
| identity   | relu(F(x) + SE(S(x)))       | the shortcut output (C_out)     |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.registry import Registry
from lightning_modules.se import SEBlock

__all__ = ["BRANCHES", "PLACEMENTS", "SHORTCUTS", "Placement", "ResidualUnit"]


@dataclass(frozen=True)
class Placement:
    """How a unit combines branch, shortcut and SE; ``se_on_input`` puts the SE on the unit's input width."""

    combine: Callable[[ResidualUnit, torch.Tensor], torch.Tensor]
    uses_se: bool = True
    se_on_input: bool = False


PLACEMENTS: Registry[Placement] = Registry("placement")

PLACEMENTS.register("none")(Placement(lambda u, x: torch.relu(u.branch(x) + u.shortcut(x)), uses_se=False))
PLACEMENTS.register("standard")(Placement(lambda u, x: torch.relu(u.se(u.branch(x)) + u.shortcut(x))))
PLACEMENTS.register("pre")(
    Placement(lambda u, x: torch.relu(u.branch(u.se(x)) + u.shortcut(x)), se_on_input=True)
)
PLACEMENTS.register("post")(Placement(lambda u, x: u.se(torch.relu(u.branch(x) + u.shortcut(x)))))
PLACEMENTS.register("identity")(Placement(lambda u, x: torch.relu(u.branch(x) + u.se(u.shortcut(x)))))


class SameConv2d(nn.Conv2d):
    """A convolution with 'same' padding (``kernel // 2``, odd kernel) that computes a 1x1 input as the matrix
    product it is. Only the centre tap of the kernel meets a pixel there, the others meet padding, so the
    output is ``W[:, :, c, c] @ x``: the same parameters, output and gradients (the other taps' gradient is
    zero either way), where oneDNN's convolution backward on a 1x1 map is about 100x slower than the product on
    the CPU (512 -> 512 channels, batch 64: 141 ms against about 1 ms). The flagship on 8x8 digits ends its last
    stage at 1x1, and that backward was half of each training step. Larger inputs take ``nn.Conv2d``'s path."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, bias: bool = False) -> None:
        if kernel % 2 != 1:
            raise ValueError(f"SameConv2d: kernel must be odd for 'same' padding, got {kernel}")
        super().__init__(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1):
            return super().forward(x)
        centre = self.weight[:, :, self.kernel_size[0] // 2, self.kernel_size[1] // 2]
        return F.linear(x.flatten(1), centre, self.bias)[:, :, None, None]


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    """A bias-free convolution with 'same' padding followed by batch norm."""
    return [SameConv2d(in_ch, out_ch, kernel, stride), nn.BatchNorm2d(out_ch)]


@dataclass(frozen=True)
class BranchType:
    """A residual branch builder ``build(in_ch, width, stride, stride_in_1x1)`` and its output expansion."""

    build: Callable[[int, int, int, bool], nn.Sequential]
    expansion: int


def _basic_branch(in_ch: int, width: int, stride: int, stride_in_1x1: bool) -> nn.Sequential:
    """Two 3x3 convolutions (He et al. 2016, Fig. 5 left); ``stride_in_1x1`` has no meaning here."""
    return nn.Sequential(*conv_bn(in_ch, width, 3, stride), nn.ReLU(inplace=True), *conv_bn(width, width, 3))


def _bottleneck_branch(in_ch: int, width: int, stride: int, stride_in_1x1: bool) -> nn.Sequential:
    """1x1 reduce, 3x3, 1x1 expand (x4). The stride sits on the 3x3 (torchvision, "ResNet v1.5") or, as in
    the original Caffe ResNet-50 behind the SE paper's 3.86 GFLOPs, on the first 1x1."""
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    return nn.Sequential(
        *conv_bn(in_ch, width, 1, s1),
        nn.ReLU(inplace=True),
        *conv_bn(width, width, 3, s3),
        nn.ReLU(inplace=True),
        *conv_bn(width, width * 4, 1),
    )


BRANCHES: Registry[BranchType] = Registry("block")
BRANCHES.register("basic")(BranchType(_basic_branch, expansion=1))
BRANCHES.register("bottleneck")(BranchType(_bottleneck_branch, expansion=4))


class PadShortcut(nn.Module):
    """He et al.'s CIFAR option A: subsample spatially and zero-pad the new channels (parameter free)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


def _pad_shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    return PadShortcut(in_ch, out_ch, stride) if (stride > 1 or in_ch != out_ch) else nn.Identity()


def _conv_shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Option B: a 1x1 projection with batch norm where the shape changes, identity elsewhere."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(*conv_bn(in_ch, out_ch, 1, stride))


SHORTCUTS: Registry[Callable[[int, int, int], nn.Module]] = Registry("shortcut")
SHORTCUTS.register("pad")(_pad_shortcut)
SHORTCUTS.register("conv")(_conv_shortcut)


class ResidualUnit(nn.Module):
    """One residual unit: branch ``F``, shortcut ``S`` and an SE block placed as ``placement`` says."""

    def __init__(
        self,
        in_ch: int,
        width: int,
        stride: int = 1,
        *,
        block: str = "basic",
        shortcut: str = "conv",
        placement: str = "none",
        reduction: int = 16,
        pooling: str = "avg",
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        branch_type = BRANCHES.get(block)
        self.out_channels = width * branch_type.expansion
        self.placement = placement
        self._placement = PLACEMENTS.get(placement)
        self.branch = branch_type.build(in_ch, width, stride, stride_in_1x1)
        self.shortcut = SHORTCUTS.get(shortcut)(in_ch, self.out_channels, stride)
        self.se: nn.Module = nn.Identity()
        if self._placement.uses_se:
            se_channels = in_ch if self._placement.se_on_input else self.out_channels
            self.se = SEBlock(se_channels, reduction, pooling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._placement.combine(self, x)
