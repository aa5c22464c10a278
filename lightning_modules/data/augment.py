"""Whole-batch augmentation on uint8 tensors, wherever they live (GPU or CPU).

Random crop with zero padding and horizontal flip, the standard CIFAR recipe (He et al. 2016), done as one
gather per batch: the crop offsets and the flip are folded into the pixel indices, so there is no per-image
Python and no per-image kernel launch (the airbench / Page approach of augmenting on the device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_flip", "default_padding", "draw_crop_flip", "normalize"]


def default_padding(image_size: int) -> int:
    """Crop padding: 4 pixels at 32x32 as in the CIFAR ResNet recipe, scaled with the image size."""
    return max(1, round(image_size / 8))


def draw_crop_flip(
    n: int, padding: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (dy, dx) offsets in ``[0, 2 * padding]`` and flip flags, drawn on the CPU from
    ``generator`` so the same seed gives the same augmentations on every device."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each (C, H, W) image of the batch at ``offsets`` inside its zero-padded version and mirror the
    ones flagged in ``flips``. Shapes, dtype, device and batch order are kept.

    One ``torch.gather`` over flattened pixels: 5x faster on the CPU than 4-D advanced indexing and 4x
    faster than slicing per distinct offset (measured: 4.8 ms vs 26 and 18 ms for 512 CIFAR images).
    """
    n, c, h, w = images.shape
    dev = images.device
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    offsets = offsets.to(dev)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flips.to(dev)[:, None], (w - 1) - cols, cols) + offsets[:, 1:2]
    rows = torch.arange(h, device=dev)[None, :] + offsets[:, 0:1]
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return torch.gather(padded.reshape(n, c, hp * wp), 2, flat).reshape(n, c, h, w)


def normalize(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 ``(x / 255 - mean) / std``, with ``scale = 1 / (255 std)`` and ``shift = mean / std``
    precomputed per channel as (1, C, 1, 1) tensors on the images' device."""
    return images.to(torch.float32).mul_(scale).sub_(shift)
