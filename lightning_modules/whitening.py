"""Patch-whitening input layer (Page 2018, "How to train your ResNet 8"; Jordan's airbench keeps it).

A fixed 3x3 convolution whose filters are the eigenvectors of the covariance of the training images' 3x3
patches, each scaled by ``1 / sqrt(eigenvalue + eps)``: its outputs are decorrelated, unit-variance patch
coordinates. The trainable 1x1 convolution after it sees well-conditioned inputs, which is what makes the
first layer learn fast (Page: 2 fewer epochs to 94%; airbench's ablation: 35 -> 22 epochs).

Our own module, not a library's: neither torchvision nor timm has a data-initialised whitening layer; the
computation is a covariance and one ``eigh`` of a 27 x 27 matrix.

Before ``fit_whitening`` sees data the filters are the identity patch extraction (filter k copies pixel k of
the patch), so an unfitted stem is exactly a factorised plain 3x3 convolution: a network built without data
(cost counting, loading a checkpoint) is well defined, and a checkpoint restores the fitted filters and the
``fitted`` flag with the other weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MAX_IMAGES", "PatchWhitening", "fit_whitening", "needs_whitening"]

# Page's regulariser: whitened directions with eigenvalue well below 1e-2 (of unit-variance normalised pixels)
# are mostly JPEG and interpolation noise; amplifying them 1/sqrt(eps) = 10x at most keeps them in check.
EPS = 1e-2
# Page fits on 10,000 images; the covariance of ~9M patches is converged well before that.
MAX_IMAGES = 10_000


class PatchWhitening(nn.Conv2d):
    """A frozen ``kernel x kernel`` convolution from ``in_channels`` to ``in_channels * kernel**2`` whitened
    patch coordinates (zero padding: 'same' size). A ``Conv2d`` so that cost counting and channels_last treat
    it as the convolution it is; its weight never trains (``requires_grad`` False, outside every optimiser)."""

    def __init__(self, in_channels: int, kernel: int = 3) -> None:
        dims = in_channels * kernel * kernel
        super().__init__(in_channels, dims, kernel, padding=kernel // 2, bias=False)
        self.weight.requires_grad_(False)
        with torch.no_grad():
            self.weight.copy_(torch.eye(dims).reshape(dims, in_channels, kernel, kernel))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, images: Iterable[torch.Tensor]) -> None:
        """Set the filters from normalised (B, C, H, W) image batches."""
        k = self.kernel_size[0]
        dims = self.out_channels
        gram = torch.zeros(dims, dims, dtype=torch.float64, device=self.weight.device)
        count = 0
        for batch in images:
            # (B, C*k*k, L) in (channel, row, column) order: the order of a conv weight's flattened filter.
            # In float64: the small-eigenvalue directions are amplified up to 10x, and float32 sums would make
            # the filters depend on how the images were batched.
            patches = F.unfold(batch.to(self.weight.device, torch.float64), k).transpose(1, 2).reshape(-1, dims)
            gram += patches.T @ patches
            count += len(patches)
        if count == 0:
            raise ValueError("fit_whitening: no training images to fit the patch-whitening stem on")
        eigenvalues, eigenvectors = torch.linalg.eigh(gram / count)
        # Largest variance first (Page's order); eigh returns ascending.
        filters = eigenvectors.T.flip(0) / torch.sqrt(eigenvalues.flip(0).clamp_min(0) + EPS)[:, None]
        self.weight.copy_(filters.reshape_as(self.weight).to(self.weight.dtype))
        self.fitted.fill_(True)


def _unfitted(net: nn.Module) -> list[PatchWhitening]:
    return [m for m in net.modules() if isinstance(m, PatchWhitening) and not bool(m.fitted)]


def needs_whitening(net: nn.Module) -> bool:
    """Whether ``net`` has a whitening layer that has not yet been fitted (nor restored from a checkpoint)."""
    return bool(_unfitted(net))


def fit_whitening(net: nn.Module, images: Iterable[torch.Tensor | tuple[torch.Tensor, ...]]) -> None:
    """Fit every unfitted ``PatchWhitening`` of ``net`` on ``images`` (normalised batches of the training
    split, unaugmented, in a fixed order, so every process and every run of a trial computes the same filters)."""
    layers = _unfitted(net)
    if layers:
        batches = list(_take(images, MAX_IMAGES))
        for layer in layers:
            layer.fit(batches)


def _take(batches: Iterable[torch.Tensor | tuple[torch.Tensor, ...]], n: int) -> Iterable[torch.Tensor]:
    """The first ``n`` images of ``batches`` (image tensors, or (images, labels) pairs from a loader)."""
    seen = 0
    for batch in batches:
        images = batch[0] if isinstance(batch, tuple | list) else batch
        images = images[: n - seen]
        yield images
        seen += len(images)
        if seen >= n:
            return
