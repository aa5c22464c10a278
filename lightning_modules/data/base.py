"""``ArrayDataModule``: the fast path shared by every small dataset (digits, CIFAR, small ImageFolders).

A dataset subclass only says how to obtain its images as uint8 (N, C, H, W) arrays (``_load``); this class
carves the validation split, computes the normalisation, keeps one copy of the arrays on the training
device and hands out ``DeviceBatchLoader``s. It is built to be reused: one instance serves many trials in a
process (each with a new ``Trainer``), loading once and re-creating device copies only when the device
changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_modules.data.augment import default_padding
from lightning_modules.data.config import DataConfig, default_cache_root, default_data_root
from lightning_modules.data.errors import DataError
from lightning_modules.data.loader import DeviceBatchLoader
from lightning_modules.data.splits import REPORT_SPLIT, SELECTION_SPLIT, split_indices

T = TypeVar("T")

__all__ = [
    "FAST_PATH_MAX_SIZE",
    "ArrayDataModule",
    "SourceArrays",
    "channel_stats",
    "check_fast_path_size",
    "pixel_sums",
    "resize_uint8",
    "spread",
]

# Images up to this size (CIFAR is 32) are held whole on the device; larger ones go through DataLoaders.
FAST_PATH_MAX_SIZE = 64
# Evaluation batches hold this many pixels per channel (1024 images at 32x32), never fewer images than a
# training batch: without gradients they fit easily, and every batch costs a fixed loop, logging and
# kernel-launch overhead that a 5,000-image validation split pays 10 times at batch 512.
EVAL_BATCH_PIXELS = 1024 * 32 * 32


@dataclass
class SourceArrays:
    """What a dataset yields: uint8 (N, C, H, W) images and int64 labels, before the validation split.

    ``test_images`` None means the source has no test split; a fixed stratified one is then carved.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    classes: tuple[str, ...]
    source: str
    cache_file: str | None = None
    cache_hit: bool | None = None
    train_pixel_sums: np.ndarray | None = None  # ``pixel_sums(train_images)`` when already known (cache)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Prepared:
    """The pools of images with the index arrays that cut them into splits, and what ``describe()`` says.

    The splits are index arrays into at most two pools (the source's training pool, and its test pool or
    the training pool again when the test split is carved), so no split is ever copied: one uint8 copy of
    the data lives on the host and one on the device.
    """

    pools: dict[str, tuple[np.ndarray, np.ndarray]]  # "train"/"test" -> (uint8 images, int64 labels)
    pool_of: dict[str, str]  # split -> pool name
    indices: dict[str, np.ndarray]  # split -> sorted int64 indices into its pool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    info: dict[str, Any]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of one split, as a copy (for inspection; the loaders never copy)."""
        images, labels = self.pools[self.pool_of[name]]
        idx = self.indices[name]
        return images[idx], labels[idx]


def pixel_sums(images: np.ndarray) -> np.ndarray:
    """Per image and channel, the sum of pixel values and of their squares: int64 (N, C, 2), exact.

    Squares are summed in float32 over rows of at most 64 pixels (below 2**24, so exact), then in int64.
    Kept with the decode cache, so the normalisation of any split is a sum over rows, not a pass over
    the images.
    """
    out = np.empty((len(images), images.shape[1], 2), np.int64)
    for s in range(0, len(images), 2048):
        chunk = np.asarray(images[s : s + 2048])
        out[s : s + 2048, :, 0] = chunk.sum(axis=(2, 3), dtype=np.int64)
        f = chunk.astype(np.float32)
        out[s : s + 2048, :, 1] = np.einsum("nchw,nchw->nch", f, f).astype(np.int64).sum(axis=2)
    return out


def channel_stats(sums: np.ndarray, pixels_per_image: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale of the images whose ``pixel_sums`` rows are ``sums``:
    exact integer totals, divided in float64, so the result does not drift with the number of images."""
    total = sums.sum(axis=0)  # (C, 2) int64
    count = len(sums) * pixels_per_image
    mean = total[:, 0] / (count * 255.0)
    var = total[:, 1] / (count * 255.0**2) - mean**2
    std = np.sqrt(np.maximum(var, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)


def check_fast_path_size(what: str, size: int) -> None:
    """Refuse an image side above the fast path's maximum, with the same line wherever it is checked."""
    if size > FAST_PATH_MAX_SIZE:
        raise DataError(f"{what}: image size {size} is above the fast path's {FAST_PATH_MAX_SIZE}; "
                        f"pass image_size <= {FAST_PATH_MAX_SIZE}")


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of uint8 (N, C, H, W) images to ``size`` x ``size``."""
    if images.shape[2] == size and images.shape[3] == size:
        return images
    out = np.empty((len(images), images.shape[1], size, size), np.uint8)
    for s in range(0, len(images), 4096):  # bounded float32 temporaries
        x = torch.from_numpy(images[s : s + 4096]).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[s : s + 4096] = y.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def spread(items: Sequence[T], n: int) -> list[T] | np.ndarray:
    """``n`` of ``items`` evenly spaced over them, first and last included (all of them when fewer)."""
    if len(items) <= n:
        return items
    picked = np.linspace(0, len(items) - 1, n).round().astype(np.int64)
    return items[picked] if isinstance(items, np.ndarray) else [items[i] for i in picked]


class ArrayDataModule(pl.LightningDataModule):
    """Base of the fast-path DataModules; subclasses implement ``_load`` (and ``_prepare`` for downloads).

    Train batches are augmented (random crop with padding, horizontal flip) when ``cfg.augment``; validation
    and test batches never are and keep a fixed order. The validation split comes from the training data
    (stratified, ``cfg.split_seed``); the test split is only for reporting. The engine should build its
    ``Trainer`` with ``use_distributed_sampler=False`` (the loaders shard themselves; they are also safe
    with the default, which Lightning applies only to ``torch.utils.data.DataLoader``).
    """

    name: ClassVar[str] = "array"
    # Horizontal flips in training augmentation; off where a mirrored image is not the same class.
    hflip: ClassVar[bool] = True
    # Whether every image of the dataset is held on the device (digits, CIFAR): a requested ``image_size``
    # above FAST_PATH_MAX_SIZE is then refused when the module is built, before anything is downloaded,
    # read or resized (resizing CIFAR to 224 first took 9 GB and minutes, only to be refused after).
    device_only: ClassVar[bool] = True

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if self.device_only and cfg.image_size is not None:
            check_fast_path_size(self.name, cfg.image_size)
        self._data: _Prepared | None = None
        self._device_copy: tuple[torch.device, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.load_count = 0  # how many times the source was actually loaded (tests, diagnostics)

    # -- subclass hooks --------------------------------------------------------------------------------
    def _load(self) -> SourceArrays:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Download or decode-and-cache, once per node (Lightning calls ``prepare_data`` on one process)."""

    # -- paths ----------------------------------------------------------------------------------------
    @property
    def data_root(self) -> Path:
        return Path(self.cfg.data_dir) if self.cfg.data_dir is not None else default_data_root()

    @property
    def cache_root(self) -> Path:
        return Path(self.cfg.cache_dir) if self.cfg.cache_dir is not None else default_cache_root()

    # -- Lightning hooks ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self._data is None:
            self._prepare()

    def setup(self, stage: str | None = None) -> None:
        """Load (or reuse) the arrays and splits; a no-op after the first call on this instance."""
        if self._data is None:
            self._data = self._split(self._load())
            self.load_count += 1

    def train_dataloader(self) -> DeviceBatchLoader:
        world, rank = self._world()
        return self._loader("train", shuffle=True, augment=self.cfg.augment, world=world, rank=rank,
                            seed=self._base_seed(world))

    def val_dataloader(self) -> DeviceBatchLoader:
        world, rank = self._world()  # under DDP each rank evaluates its shard of the split
        return self._loader("val", world=world, rank=rank)

    def test_dataloader(self) -> DeviceBatchLoader:
        world, rank = self._world()
        return self._loader("test", world=world, rank=rank)

    def loader(self, split: str, *, device: torch.device, train: bool = False, seed: int = 0) -> DeviceBatchLoader:
        """A loader of ``split`` on ``device`` without a Trainer (hand-written loops, benchmarks); ``train``
        shuffles and augments exactly as ``train_dataloader`` does for a run seeded with ``seed``."""
        return self._loader(split, shuffle=train, augment=train and self.cfg.augment, seed=seed, device=device)

    def spread_sample(self, split: str, n: int, *, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """About ``n`` images of ``split`` (all, when it has fewer) evenly spaced over it, normalised and
        unaugmented, in a fixed order: what the whitening stem is fitted on (same in every process and run).

        Evenly spaced, not the first ``n``: an image tree's splits are in file order, class by class, so the
        first 10,000 training images of the CIFAR-10 JPEG tree are 3 of its 10 classes (airplanes, cars and
        birds), whose patch covariance differs from the whole split's by 13% (another 10,000 spread over it:
        1.6%)."""
        return self._loader(split, device=device, indices=spread(self._prepared().indices[split], n))

    # -- facts ----------------------------------------------------------------------------------------
    def _prepared(self) -> _Prepared:
        if self._data is None:
            raise RuntimeError(f"{self.name}: call setup() before asking for the data's shape or loaders")
        return self._data

    @property
    def num_classes(self) -> int:
        return len(self._prepared().classes)

    @property
    def classes(self) -> tuple[str, ...]:
        return self._prepared().classes

    @property
    def eval_batch_size(self) -> int:
        """Batch size of the validation and test loaders (see ``EVAL_BATCH_PIXELS``)."""
        return max(self.cfg.batch_size, EVAL_BATCH_PIXELS // self.image_size**2)

    @property
    def in_channels(self) -> int:
        return int(self._prepared().pools["train"][0].shape[1])

    @property
    def image_size(self) -> int:
        return int(self._prepared().pools["train"][0].shape[2])

    @property
    def split_indices(self) -> dict[str, np.ndarray]:
        """Sorted indices of each split into the data it was cut from: the source's training data, or for
        ``test`` the source's test set when it has one (``describe()['test_from']`` says which)."""
        return {name: idx.copy() for name, idx in self._prepared().indices.items()}

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A copy of one split's uint8 (N, C, H, W) images and int64 labels, before normalisation."""
        return self._prepared().split(split)

    def describe(self) -> dict[str, Any]:
        """Provenance for study and trial attributes: what was read, how it was split and normalised."""
        d = self._prepared()
        n_train = len(d.indices["train"])
        return {
            **d.info,
            "num_classes": len(d.classes),
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "pipeline": "device",
            "splits": {name: len(idx) for name, idx in d.indices.items()},
            "split_seed": self.cfg.split_seed,
            "val_size": self.cfg.val_size,
            "selection_split": SELECTION_SPLIT,
            "report_split": REPORT_SPLIT,
            "normalization": {"mean": list(d.mean), "std": list(d.std),
                              "computed_on": f"train split ({n_train} images)"},
            "augment": {"random_crop_padding": default_padding(self.image_size),
                        "horizontal_flip": self.train_flip} if self.cfg.augment else None,
            "batch_size": self.cfg.batch_size,
            "eval_batch_size": self.eval_batch_size,
        }

    # -- internals ------------------------------------------------------------------------------------
    def _split(self, src: SourceArrays) -> _Prepared:
        what = self.name
        train_pool = (src.train_images, src.train_labels.astype(np.int64))
        h, w = src.train_images.shape[2:]
        check_fast_path_size(what, max(h, w))
        if h != w:  # ``image_size`` is one side: the network's cost and the crops assume a square
            raise DataError(f"{what}: images are {w}x{h}, not square; pass image_size to resize them square")
        pools = {"train": train_pool}
        has_test = src.test_images is not None and src.test_labels is not None
        if has_test:
            pools["test"] = (src.test_images, src.test_labels.astype(np.int64))
        test_pool = "test" if has_test else "train"
        indices, test_from = split_indices(train_pool[1], self.cfg.val_size, self.cfg.split_seed,
                                           len(pools["test"][1]) if has_test else None, what)
        sums = src.train_pixel_sums if src.train_pixel_sums is not None else pixel_sums(src.train_images)
        mean, std = channel_stats(sums[indices["train"]], h * w)
        info = {
            "dataset": self.name,
            "source": src.source,
            "classes": list(src.classes),
            "cache_file": src.cache_file,
            "cache_hit": src.cache_hit,
            "val_from": f"training data: stratified, split_seed {self.cfg.split_seed}",
            "test_from": test_from,
            **src.extra,
        }
        return _Prepared(
            pools=pools, pool_of={"train": "train", "val": "train", "test": test_pool},
            indices=indices, mean=mean, std=std, classes=src.classes, info=info,
        )

    def _trainer(self) -> pl.Trainer | None:
        """The attached trainer; Lightning sets ``self.trainer`` on the DataModule at ``fit``/``test``."""
        return getattr(self, "trainer", None)

    def _world(self) -> tuple[int, int]:
        trainer = self._trainer()
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _device(self) -> torch.device:
        trainer = self._trainer()
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _base_seed(self, world: int) -> int:
        """The run's seed (``pl.seed_everything`` sets it), captured when fit asks for the train loader;
        taken from rank 0 under DDP so every rank draws the same epoch plan."""
        seed = torch.initial_seed()
        trainer = self._trainer()
        if world > 1 and trainer is not None:
            seed = int(trainer.strategy.broadcast(seed, src=0))
        return seed

    def _on_device(self, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The pools as tensors on ``device``, created once and reused until another device is asked for
        (the old copy is dropped first, so at most one device copy is alive). On the CPU they share memory
        with the host arrays."""
        if self._device_copy is None or self._device_copy[0] != device:
            self._device_copy = None
            copies = {}
            for name, (images, labels) in self._prepared().pools.items():
                x, y = torch.from_numpy(images), torch.from_numpy(labels)
                copies[name] = (x.to(device), y.to(device)) if device.type != "cpu" else (x, y)
            self._device_copy = (device, copies)
        return self._device_copy[1]

    @property
    def train_flip(self) -> str:
        """How training batches are mirrored: the config's ``flip``, or "never" for data that must not be."""
        return self.cfg.flip if self.hflip else "never"

    def release_device_copy(self) -> None:
        """Drop the device-resident tensors (the host arrays stay for the next trial)."""
        self._device_copy = None

    def _loader(
        self, split: str, *, shuffle: bool = False, augment: bool = False, world: int = 1, rank: int = 0,
        seed: int = 0, device: torch.device | None = None, indices: np.ndarray | None = None,
    ) -> DeviceBatchLoader:
        """``device``: where the batches live (default: the Trainer's device); ``indices``: a subset of the
        split's (default: all of them)."""
        d = self._prepared()
        images, labels = self._on_device(device or self._device())[d.pool_of[split]]
        indices = torch.from_numpy(d.indices[split] if indices is None else indices)
        if shuffle and len(indices) < self.cfg.batch_size * world:
            raise DataError(
                f"{self.name}: the training split has {len(indices)} images, fewer than one batch of "
                f"{self.cfg.batch_size} per process ({world} process(es)); lower batch_size"
            )
        return DeviceBatchLoader(
            images, labels, indices=indices, batch_size=self.cfg.batch_size if shuffle else self.eval_batch_size,
            mean=d.mean, std=d.std, shuffle=shuffle, augment=augment, padding=default_padding(self.image_size),
            flip=self.train_flip, seed=seed, world_size=world, rank=rank,
        )
