"""The Squeeze-and-Excitation block and its registry of squeeze poolings.

SE(z) = z * sigmoid(W2 relu(W1 pool(z))) (Hu et al., "Squeeze-and-Excitation Networks", TPAMI 2019, eq. 2-4),
W1: C -> max(1, C // r), W2: back to C, both linear layers with bias as in the reference implementation.
A pooling returns one or more per-channel statistics; the shared MLP is applied to each and the results are
summed before the sigmoid (CBAM's avg+max scheme, which reduces to the paper's block for one statistic).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.registry import Registry

__all__ = ["POOLINGS", "SEBlock", "SqueezePooling", "se_hidden_width"]


class SqueezePooling(nn.Module):
    """Base of the squeeze poolings: ``forward`` maps (N, C, H, W) to a list of (N, C) statistics.

    ``ops_per_element`` is the cost model's count of operations per input element (one accumulate per
    statistic, plus the power of GeM), used by ``search.cost``.
    """

    ops_per_element: int = 1

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


POOLINGS: Registry[type[SqueezePooling]] = Registry("pooling")


@POOLINGS.register("avg")
class AvgPooling(SqueezePooling):
    """Global average pooling, the paper's squeeze."""

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [z.mean(dim=(2, 3))]


@POOLINGS.register("max")
class MaxPooling(SqueezePooling):
    """Global max pooling, the paper's squeeze ablation (Table 11)."""

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [z.amax(dim=(2, 3))]


@POOLINGS.register("avgmax")
class AvgMaxPooling(SqueezePooling):
    """Average and max statistics through the shared MLP, summed before the gate (CBAM, Woo et al. 2018)."""

    ops_per_element = 2

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [z.mean(dim=(2, 3)), z.amax(dim=(2, 3))]


@POOLINGS.register("std")
class StdPooling(SqueezePooling):
    """Per-channel standard deviation, the style statistic of SRM (Lee et al. 2019).

    Costs two accumulates per element (sum and sum of squares).
    """

    ops_per_element = 2

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        # Computed in float32: the variance of bf16 activations loses most of its digits.
        var = z.float().var(dim=(2, 3), unbiased=False)
        return [(var + 1e-5).sqrt().to(z.dtype)]


@POOLINGS.register("gem")
class GeMPooling(SqueezePooling):
    """Generalised mean (mean(max(z, eps)^p))^(1/p) with a learnable p (Radenovic et al. 2018), p0 = 3.

    Counted as two operations per element (power and accumulate).
    """

    ops_per_element = 2

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        p = self.p.clamp(min=1.0)
        pooled = z.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        return [pooled.to(z.dtype)]


def se_hidden_width(channels: int, reduction: int) -> int:
    """Width of the SE bottleneck, max(1, C // r)."""
    return max(1, channels // reduction)


class SEBlock(nn.Module):
    """Channel gating z * sigmoid(W2 relu(W1 pool(z))) for ``channels`` channels, ratio ``reduction``."""

    def __init__(self, channels: int, reduction: int = 16, pooling: str = "avg") -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction: must be an integer >= 1, got {reduction!r}")
        hidden = se_hidden_width(channels, reduction)
        self.channels = channels
        self.pool = POOLINGS.get(pooling)()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def gate(self, z: torch.Tensor) -> torch.Tensor:
        """The (N, C, 1, 1) excitation weights in (0, 1)."""
        logits = sum(self.fc2(torch.relu(self.fc1(s))) for s in self.pool(z))
        return torch.sigmoid(logits)[:, :, None, None]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.gate(z).to(z.dtype)
