"""``imagefolder``: any ``train/<class>/*`` tree (optionally ``test/<class>/*``), e.g. ``cifar10-jpeg``.

Small images (all at most 64 px, or resized to ``image_size`` <= 64) are decoded once, in parallel, into
the uint8 cache and served by the fast path; anything larger goes through DataLoaders with workers
(``folder_loaders``). The fast path's images are square, as everything downstream assumes (the cost of a
network is counted on ``image_size`` squared): without ``image_size``, images of mixed sizes or not square
are resized to a square of their largest side, and a line on stderr says so. The tree is checked before
anything is decoded: missing folders, empty class folders and train/test class lists that differ are
reported in one line each.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_modules.data.base import FAST_PATH_MAX_SIZE, ArrayDataModule, SourceArrays, pixel_sums
from lightning_modules.data.cache import load_or_build, meta_path, source_key
from lightning_modules.data.config import DataConfig
from lightning_modules.data.decode import decode_images, probe_size
from lightning_modules.data.errors import DataError
from lightning_modules.data.folder_loaders import FolderLoaders
from lightning_modules.data.registry import DATASETS

__all__ = ["IMAGE_EXTENSIONS", "FolderTree", "ImageFolderDataModule", "scan_tree"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Bump when the cache layout or the decoded pixels change, so old files are not read. 3: 16-bit greys keep
# their high byte (2 clipped them to white); trees of mixed or non-square sizes are decoded square.
_CACHE_FORMAT = 3


@dataclass(frozen=True)
class FolderTree:
    """A checked ImageFolder tree: class names and, per split, (relative path, label) in sorted order."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...] | None
    stats: tuple[tuple[str, int, int], ...]  # (relative path, size, mtime_ns) of every listed file

    def paths(self, split: str) -> list[Path]:
        return [self.root / rel for rel, _ in (self.train if split == "train" else self.test or ())]

    def labels(self, split: str) -> np.ndarray:
        return np.array([y for _, y in (self.train if split == "train" else self.test or ())], np.int64)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan_split(root: Path, split: str, classes: list[str]) -> tuple[list[tuple[str, int]], list[tuple]]:
    items: list[tuple[str, int]] = []
    stats: list[tuple[str, int, int]] = []
    for label, cls in enumerate(classes):
        entries = sorted(
            (e for e in os.scandir(root / split / cls)
             if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)),
            key=lambda e: e.name,
        )
        if not entries:
            raise DataError(
                f"imagefolder: class folder {root / split / cls} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        for e in entries:
            rel = f"{split}/{cls}/{e.name}"
            st = e.stat()
            items.append((rel, label))
            stats.append((rel, st.st_size, st.st_mtime_ns))
    return items, stats


def scan_tree(root: Path) -> FolderTree:
    """List and check the tree at ``root``; every problem is a one-line ``DataError``."""
    hint = "pass --data-dir DIR pointing at a tree with train/<class>/<image> (and optionally test/<class>/)"
    if not root.is_dir():
        raise DataError(f"imagefolder: data directory {root} does not exist; {hint}")
    if not (root / "train").is_dir():
        raise DataError(f"imagefolder: {root} has no train/ folder; {hint}")
    classes = _class_dirs(root / "train")
    if not classes:
        raise DataError(f"imagefolder: {root / 'train'} holds no class folders; {hint}")
    train, stats = _scan_split(root, "train", classes)
    test = None
    if (root / "test").is_dir():
        test_classes = _class_dirs(root / "test")
        if test_classes != classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            raise DataError(
                f"imagefolder: train/ and test/ class folders differ in {root}: "
                f"only in train: {', '.join(only_train) or '-'}; "
                f"only in test: {', '.join(only_test) or '-'}; "
                f"make both hold the same class folders"
            )
        test, test_stats = _scan_split(root, "test", classes)
        stats += test_stats
    return FolderTree(root, tuple(classes), tuple(train), None if test is None else tuple(test), tuple(stats))


def _large_marker(cache_path: Path) -> Path:
    """Left next to a tree's would-be cache when some image is above the fast path's maximum, so the next
    process goes straight to the DataLoader path instead of decoding the tree again."""
    return cache_path.with_name(cache_path.name + ".large-images")


class _TooLarge(Exception):
    """Some image of a tree without ``image_size`` is above FAST_PATH_MAX_SIZE: the tree needs DataLoaders."""


@DATASETS.register("imagefolder")
class ImageFolderDataModule(ArrayDataModule):
    """An ImageFolder tree at ``cfg.data_dir``; fast path for small images, DataLoaders for large ones.

    Without ``test/`` a fixed stratified 20% test split is carved (seed 0). ``describe()['pipeline']`` says
    which path was taken.
    """

    name = "imagefolder"
    device_only = False  # images above FAST_PATH_MAX_SIZE go through DataLoaders

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        if cfg.data_dir is None:
            raise DataError(
                "imagefolder: no data directory given; pass --data-dir DIR pointing at a tree with "
                "train/<class>/<image> (and optionally test/<class>/)"
            )
        self._tree: FolderTree | None = None
        self._folder: FolderLoaders | None = None
        self._pending: SourceArrays | None = None
        self._too_large = False  # found by a decode; remembered here too, where the marker cannot be written

    @property
    def root(self) -> Path:
        return Path(self.cfg.data_dir).resolve()

    def tree(self) -> FolderTree:
        if self._tree is None:
            self._tree = scan_tree(self.root)
        return self._tree

    # -- which path -------------------------------------------------------------------------------------
    def _cache_path(self, tree: FolderTree) -> Path:
        size = self.cfg.image_size
        setting = ((size, size), True) if size is not None else "native"  # native: the tree's largest side
        key = source_key(tree.stats, _CACHE_FORMAT, setting, tree.classes)
        return self.cache_root / f"imagefolder-{tree.root.name}-{key[:24]}.npy"

    def _cache_target(self) -> Path | None:
        """The cache entry for the fast path, or None when the tree needs the DataLoader path. Costs at most
        one header read: an entry already cached answers without any."""
        tree = self.tree()
        if self.cfg.image_size is not None:
            return self._cache_path(tree) if self.cfg.image_size <= FAST_PATH_MAX_SIZE else None
        path = self._cache_path(tree)
        if meta_path(path).exists():
            return path
        if self._too_large or _large_marker(path).exists():
            return None
        w, h = probe_size(tree.root / tree.train[0][0])  # a tree of large images leaves at once
        return path if max(w, h) <= FAST_PATH_MAX_SIZE else None

    def _decode_at(self, tree: FolderTree, side: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
        """Train then test images in one (N, 3, side, side) array, and the sizes the files had."""
        train, test = tree.paths("train"), tree.paths("test")
        # Both splits decode into one array: decoding them apart and concatenating held the data 2.5 times.
        images = np.empty((len(train) + len(test), 3, side, side), np.uint8)
        what = f"imagefolder {tree.root}"
        _, sizes = decode_images(train, (side, side), what=f"{what} train", out=images[: len(train)])
        if test:
            sizes |= decode_images(test, (side, side), what=f"{what} test", out=images[len(train) :])[1]
        return images, sizes

    def _decode_square(self, tree: FolderTree) -> np.ndarray:
        """The tree decoded at ``image_size``, or without it at its largest image side (``_TooLarge`` above
        the fast path's maximum). Decoded at the first image's side first, as most trees are one square
        size: that is one pass with the files' own pixels; the decode tells the sizes, and only a tree whose
        first image is not its largest is decoded a second time (once: then it is cached)."""
        if self.cfg.image_size is not None:
            return self._decode_at(tree, self.cfg.image_size)[0]
        first = max(probe_size(tree.root / tree.train[0][0]))
        images, sizes = self._decode_at(tree, first)
        side = max(max(size) for size in sizes)
        if side > FAST_PATH_MAX_SIZE:
            raise _TooLarge
        if sizes != {(side, side)}:
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4]) + (", ..." if len(sizes) > 4 else "")
            found = f"are {shown}, not square" if len(sizes) == 1 else f"come in {len(sizes)} sizes ({shown})"
            print(f"imagefolder {tree.root}: images {found}; resizing them all to {side}x{side} (the largest "
                  f"side) for the fast path; set data.image_size to choose the size", file=sys.stderr, flush=True)
        if side != first:
            del images  # before the second array exists
            images = self._decode_at(tree, side)[0]
        return images

    def _decode(self, tree: FolderTree) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Train then test images as one array, and the metadata the cache keeps beside them."""
        images = self._decode_square(tree)
        meta = {
            "classes": np.array(tree.classes),
            "train_labels": tree.labels("train"),
            "test_labels": tree.labels("test"),  # empty without test/
            "has_test": np.array(tree.test is not None),
            "train_pixel_sums": pixel_sums(images[: len(tree.train)]),
        }
        return images, meta

    def _cached(self) -> SourceArrays | None:
        """The decoded tree (from the cache, or decoded and cached now), or None when it needs the
        DataLoader path."""
        if self._pending is not None:
            return self._pending
        path = self._cache_target()
        if path is None:
            return None
        tree = self.tree()
        try:
            images, meta, hit = load_or_build(path, lambda: self._decode(tree))
        except _TooLarge:
            self._too_large = True
            with contextlib.suppress(OSError):  # only a shortcut for the next process; no cache, no shortcut
                _large_marker(path).parent.mkdir(parents=True, exist_ok=True)
                _large_marker(path).touch()
            return None
        classes = tuple(str(c) for c in meta["classes"])
        if classes != tree.classes:  # pragma: no cover - the key covers the class list
            raise DataError(f"imagefolder: cache {path} does not match {self.root}; delete it")
        n_train = len(meta["train_labels"])
        has_test = bool(meta["has_test"])
        return SourceArrays(
            train_images=images[:n_train], train_labels=meta["train_labels"],
            test_images=images[n_train:] if has_test else None,
            test_labels=meta["test_labels"] if has_test else None,
            classes=classes, source=str(self.root), cache_file=str(path), cache_hit=hit,
            train_pixel_sums=meta["train_pixel_sums"],
        )

    # -- hooks ------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Decode and write the cache once per node, before the ranks call ``setup``; a cache that already
        exists is not even opened here."""
        path = self._cache_target()
        if path is not None and not meta_path(path).exists():
            self._pending = self._cached()  # setup() in this process reuses the decoded arrays

    def setup(self, stage: str | None = None) -> None:
        if self._data is not None or self._folder is not None:
            return
        try:
            self._pending = self._cached()
            if self._pending is None:
                self._folder = FolderLoaders(self.tree(), self.cfg, self.cache_root)
                self.load_count += 1
                return
            super().setup(stage)
        finally:
            self._pending = None

    def _load(self) -> SourceArrays:
        source = self._cached()
        assert source is not None
        return source

    # -- the DataLoader path delegates ----------------------------------------------------------------------
    def train_dataloader(self) -> Any:
        if self._folder is not None:
            world, rank = self._world()
            return self._folder.train_loader(world, rank, self._base_seed(world), self._device())
        return super().train_dataloader()

    def spread_sample(self, split: str, n: int, *, device: Any) -> Any:
        if self._folder is not None:
            return self._folder.sample_loader(split, n, device)
        return super().spread_sample(split, n, device=device)

    def val_dataloader(self) -> Any:
        return self._folder.eval_loader("val", *self._world(), self._device()) if self._folder \
            else super().val_dataloader()

    def test_dataloader(self) -> Any:
        return self._folder.eval_loader("test", *self._world(), self._device()) if self._folder \
            else super().test_dataloader()

    @property
    def num_classes(self) -> int:
        return len(self._folder.tree.classes) if self._folder else super().num_classes

    @property
    def classes(self) -> tuple[str, ...]:
        return self._folder.tree.classes if self._folder else super().classes

    @property
    def in_channels(self) -> int:
        return 3 if self._folder else super().in_channels

    @property
    def image_size(self) -> int:
        return self._folder.image_size if self._folder else super().image_size

    @property
    def split_indices(self) -> dict[str, np.ndarray]:
        return dict(self._folder.indices) if self._folder else super().split_indices

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if self._folder:
            raise RuntimeError("imagefolder: split_arrays() needs the fast path; this tree uses DataLoaders")
        return super().split_arrays(split)

    def describe(self) -> dict[str, Any]:
        return self._folder.describe() if self._folder else super().describe()
