"""``imagefolder``: any ``train/<class>/*`` tree (optionally ``test/<class>/*``), e.g. ``cifar10-jpeg``.

Small images (all one size <= 64, or resized to ``image_size`` <= 64) are decoded once, in parallel, into
the uint8 cache and served by the fast path; anything larger goes through DataLoaders with workers
(``folder_loaders``). The tree is checked before anything is decoded: missing folders, empty class folders
and train/test class lists that differ are reported in one line each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_modules.data.base import FAST_PATH_MAX_SIZE, ArrayDataModule, SourceArrays, pixel_sums
from lightning_modules.data.cache import load_or_build, meta_path, source_key
from lightning_modules.data.config import DataConfig
from lightning_modules.data.decode import MixedSizesError, decode_images, probe_size
from lightning_modules.data.errors import DataError
from lightning_modules.data.folder_loaders import FolderLoaders
from lightning_modules.data.registry import DATASETS

__all__ = ["IMAGE_EXTENSIONS", "FolderTree", "ImageFolderDataModule", "scan_tree"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CACHE_FORMAT = 2  # bump when the cache layout changes, so old files are not read


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


def _mixed_marker(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.name + ".mixed-sizes")


@DATASETS.register("imagefolder")
class ImageFolderDataModule(ArrayDataModule):
    """An ImageFolder tree at ``cfg.data_dir``; fast path for small images, DataLoaders for large ones.

    Without ``test/`` a fixed stratified 20% test split is carved (seed 0). ``describe()['pipeline']`` says
    which path was taken.
    """

    name = "imagefolder"

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

    @property
    def root(self) -> Path:
        return Path(self.cfg.data_dir).resolve()

    def tree(self) -> FolderTree:
        if self._tree is None:
            self._tree = scan_tree(self.root)
        return self._tree

    # -- which path -------------------------------------------------------------------------------------
    def _fast_size(self, tree: FolderTree) -> tuple[int, int] | None:
        """The (width, height) to decode to on the fast path, or None for the DataLoader path."""
        if self.cfg.image_size is not None:
            s = self.cfg.image_size
            return (s, s) if s <= FAST_PATH_MAX_SIZE else None
        w, h = probe_size(tree.root / tree.train[0][0])
        return (w, h) if max(w, h) <= FAST_PATH_MAX_SIZE else None

    def _cache_path(self, tree: FolderTree, size: tuple[int, int]) -> Path:
        key = source_key(tree.stats, _CACHE_FORMAT, size, self.cfg.image_size is not None, tree.classes)
        return self.cache_root / f"imagefolder-{tree.root.name}-{key[:24]}.npy"

    def _decode(self, tree: FolderTree, size: tuple[int, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Train then test images as one array, and the metadata the cache keeps beside them."""
        resize = self.cfg.image_size is not None
        what = f"imagefolder {tree.root}"
        parts = [decode_images(tree.paths("train"), size, resize=resize, what=f"{what} train")]
        if tree.test is not None:
            parts.append(decode_images(tree.paths("test"), size, resize=resize, what=f"{what} test"))
        images = np.concatenate(parts) if len(parts) > 1 else parts[0]
        meta = {
            "classes": np.array(tree.classes),
            "train_labels": tree.labels("train"),
            "test_labels": tree.labels("test"),  # empty without test/
            "has_test": np.array(tree.test is not None),
            "train_pixel_sums": pixel_sums(parts[0]),
        }
        return images, meta

    def _cache_target(self) -> Path | None:
        """The cache entry for the fast path, or None when the tree needs the DataLoader path."""
        tree = self.tree()
        size = self._fast_size(tree)
        if size is None:
            return None
        path = self._cache_path(tree, size)
        return None if _mixed_marker(path).exists() else path

    def _cached(self) -> SourceArrays | None:
        """The decoded tree (from the cache, or decoded and cached now), or None when it needs the
        DataLoader path."""
        if self._pending is not None:
            return self._pending
        path = self._cache_target()
        if path is None:
            return None
        tree = self.tree()
        size = self._fast_size(tree)
        assert size is not None
        try:
            images, meta, hit = load_or_build(path, lambda: self._decode(tree, size))
        except MixedSizesError:
            # Remember it, so the next trial goes straight to the DataLoader path instead of decoding again.
            _mixed_marker(path).parent.mkdir(parents=True, exist_ok=True)
            _mixed_marker(path).touch()
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
