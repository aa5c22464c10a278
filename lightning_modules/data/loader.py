"""``DeviceBatchLoader``: batches cut from uint8 tensors held on the training device.

The whole split lives on the device as uint8 (CIFAR-10 train: 150 MB); each batch is an index-select, an
optional crop/flip gather and a fused normalisation, all on the device, so a trial never waits for workers,
pinned memory or host-to-device copies (Page's DAWNBench ResNet-9 and airbench feed CIFAR-10 this way).

Lightning accepts any iterable with ``__len__`` as a dataloader and only injects a ``DistributedSampler``
into real ``torch.utils.data.DataLoader`` objects, so this loader is safe whatever
``use_distributed_sampler`` says; it shards itself from ``world_size``/``rank``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lightning_modules.data.augment import crop_flip, draw_crop_flip, normalize
from lightning_modules.data.config import FLIP_MODES

__all__ = ["DeviceBatchLoader", "alternate_first_flips", "epoch_seed"]

# ``DataConfig.flip``'s modes (see there), and "never" for data whose mirror image is another thing.
_FLIPS = (*FLIP_MODES, "never")
# Stream key of the per-image first-epoch flips of "alternate": above any epoch number, so never an epoch's.
_ALTERNATE_FLIP_STREAM = 2**40


def epoch_seed(base_seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for one epoch (``SeedSequence``), so nearby base seeds and epochs give
    unrelated streams."""
    state = np.random.SeedSequence([base_seed % 2**64, epoch]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def alternate_first_flips(count: int, seed: int) -> torch.Tensor:
    """Per image of a pool of ``count``, its flip in epoch 0 under ``flip: alternate`` (bool); in epoch ``e``
    an image is mirrored iff its flag differs from ``e % 2``. It depends only on the seed, so every split,
    rank and loader (device-resident or DataLoader) of one run agrees."""
    g = torch.Generator().manual_seed(epoch_seed(seed, _ALTERNATE_FLIP_STREAM))
    return torch.rand(count, generator=g) < 0.5


class _EpochClock:
    """Holds the epoch; Lightning's fit loop calls ``set_epoch`` on a loader's ``sampler`` every epoch."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class DeviceBatchLoader:
    """Iterable of ``(float32 (B, C, H, W) normalised images, int64 (B,) labels)`` on the tensors' device.

    Serves ``images[indices]`` (all images when ``indices`` is None) without copying them.

    Training loaders (``shuffle=True``) draw a permutation, crop offsets and flips for the whole epoch from
    a CPU ``torch.Generator`` seeded with ``epoch_seed(seed, epoch)``: the same seed gives the same batches
    on any device and any run. With ``world_size`` > 1 every rank draws the same epoch plan and takes every
    ``world_size``-th group of ``batch_size`` (drop-last), so ranks see disjoint batches, equally many.
    ``flip`` ("random", "alternate" or "never") says how they mirror: "alternate" flips image ``i`` in epoch
    ``e`` iff its seeded coin ``first[i]`` differs from ``e % 2`` (the crops, the order and the coins do not
    depend on the mode, so "random" and "alternate" runs of one seed differ only in the flips); "never" keeps
    the crops.
    Evaluation loaders keep the stored order, never augment and keep the last partial batch; with
    ``world_size`` > 1 rank r serves every ``world_size``-th image from the r-th, so the ranks evaluate
    disjoint shards that cover the split exactly once (torchmetrics sums their counts: the accuracy is the
    whole split's, without the duplicates a padding sampler would add).

    The epoch comes from ``set_epoch`` (Lightning calls it through ``.sampler`` before every epoch, resumed
    runs included) and otherwise advances after each complete pass, for plain ``for`` loops.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        indices: torch.Tensor | None = None,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: bool = False,
        padding: int = 0,
        flip: str = "random",
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            got = f"{images.dtype} {tuple(images.shape)}"
            raise ValueError(f"images: expected a uint8 (N, C, H, W) tensor, got {got}")
        if len(labels) != len(images):
            raise ValueError(f"labels: {len(labels)} labels for {len(images)} images")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
        if flip not in _FLIPS:
            raise ValueError(f"flip: unknown mode {flip!r}; allowed: {', '.join(_FLIPS)}")
        self.images = images
        self.labels = labels
        # Positions in ``images`` this loader serves (a split of a shared pool); kept on the CPU, where the
        # epoch plan is drawn.
        self.subset = torch.arange(len(images)) if indices is None else indices.to("cpu", torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.padding = padding
        self.flip = flip
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        # Lightning reads ``.sampler`` (to call ``set_epoch``) and then ``.batch_sampler`` of anything that
        # has one; neither is a torch sampler, so Lightning neither shards nor re-wraps this loader.
        self.sampler = _EpochClock()
        self.batch_sampler = None
        c = images.shape[1]
        std_t = torch.as_tensor(std, dtype=torch.float64).reshape(1, c, 1, 1)
        mean_t = torch.as_tensor(mean, dtype=torch.float64).reshape(1, c, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).to(torch.float32).to(images.device)
        self._shift = (mean_t / std_t).to(torch.float32).to(images.device)

    @property
    def drop_last(self) -> bool:
        return self.shuffle

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        if self.shuffle:
            return len(self.subset) // (self.batch_size * self.world_size)
        return math.ceil(len(self.subset[self.rank::self.world_size]) / self.batch_size)

    def _plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's image order for ``epoch`` and, when augmenting, its crop offsets and flips."""
        n = len(self.subset)
        if not self.shuffle:
            return self.subset[self.rank::self.world_size], None, None
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g)
        offsets, flips = draw_crop_flip(n, self.padding, g) if self.augment else (None, None)
        used = len(self) * self.batch_size * self.world_size
        mine = torch.arange(used).view(len(self), self.world_size, self.batch_size)[:, self.rank].reshape(-1)
        visits = self.subset[order[mine]]
        if flips is not None:
            flips = flips[mine]
            if self.flip == "never":
                flips = torch.zeros_like(flips)
            elif self.flip == "alternate":
                flips = self._first_epoch_flips[visits] ^ bool(epoch % 2)
        return visits, None if offsets is None else offsets[mine], flips

    @functools.cached_property
    def _first_epoch_flips(self) -> torch.Tensor:
        """Per image of the pool (so every split and every rank agree), its flip in epoch 0 under "alternate";
        drawn once, as it depends only on the seed."""
        return alternate_first_flips(len(self.images), self.seed)

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """The image indices this rank visits in ``epoch`` (default: the current one), in batch order."""
        return self._plan(self.sampler.epoch if epoch is None else epoch)[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.sampler.epoch
        dev = self.images.device
        order, offsets, flips = self._plan(epoch)
        order = order.to(dev, non_blocking=True)
        if offsets is not None and flips is not None:
            offsets, flips = offsets.to(dev, non_blocking=True), flips.to(dev, non_blocking=True)
        bs = self.batch_size
        for b in range(len(self)):
            sl = slice(b * bs, (b + 1) * bs)
            idx = order[sl]
            x = self.images.index_select(0, idx)
            if offsets is not None and flips is not None:
                x = crop_flip(x, offsets[sl], flips[sl], self.padding)
            yield normalize(x, self._scale, self._shift), self.labels.index_select(0, idx)
        if self.sampler.epoch == epoch:
            self.sampler.epoch = epoch + 1
