"""``DataConfig``: which dataset, where it lives, and how it is split and batched.

Frozen and validated once at construction (DESIGN.md convention 3): every message names the field, the bad
value and what is allowed, so a study file or a ``--dataset`` typo fails before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_modules.data.errors import DataConfigError
from lightning_modules.data.registry import DATASETS

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_DIR_ENV",
    "FLIP_MODES",
    "MIN_IMAGE_SIZE",
    "DataConfig",
    "default_cache_root",
    "default_data_root",
]

DATA_DIR_ENV = "SE_SEARCH_DATA_DIR"
CACHE_DIR_ENV = "SE_SEARCH_CACHE_DIR"
# A random crop with padding needs a few pixels to move in; 8 is digits' native size.
MIN_IMAGE_SIZE = 8
# How training mirrors images (data that may be mirrored at all: a dataset's ``hflip``): "random" (each image,
# each epoch, with probability 1/2) or "alternate" (airbench's derandomised flip: a seeded random half in epoch
# 0, then every image the other way than the epoch before, so each sees both orientations every two epochs;
# Jordan 2024 finds it better than random flips wherever flipping helps, most in short runs).
FLIP_MODES = ("random", "alternate")


def default_data_root() -> Path:
    """Where datasets are looked for (and downloaded to) when ``data_dir`` is None."""
    return Path(os.environ.get(DATA_DIR_ENV) or "~/.cache/se-search/data").expanduser()


def default_cache_root() -> Path:
    """Where decoded uint8 caches are kept when ``cache_dir`` is None."""
    return Path(os.environ.get(CACHE_DIR_ENV) or "~/.cache/se-search/cache").expanduser()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(field: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise DataConfigError(f"{field}: must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """One dataset and how trials see it.

    ``val_size`` is a fraction of the training data in (0, 1) or a number of images (>= 1); the validation
    split is carved from the training data with ``split_seed`` and is what pruning and the objective read.
    ``image_size`` None keeps the dataset's native size (digits: 16, upsampled from 8). ``num_workers``
    only matters for the DataLoader path (large images); the fast path needs no workers.
    """

    name: str = "digits"
    data_dir: str | Path | None = None
    batch_size: int = 128
    val_size: float | int = 0.1
    split_seed: int = 0
    image_size: int | None = None
    cache_dir: str | Path | None = None
    num_workers: int = 2
    augment: bool = True
    flip: str = "random"
    download: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in DATASETS:
            raise DataConfigError(
                f"name: unknown dataset {self.name!r}; allowed: {', '.join(sorted(DATASETS.names()))}"
            )
        for field in ("data_dir", "cache_dir"):
            value = getattr(self, field)
            if value is None:
                continue
            if not isinstance(value, str | os.PathLike) or not str(value):
                raise DataConfigError(f"{field}: must be a directory path or None, got {value!r}")
            object.__setattr__(self, field, Path(value).expanduser())
        _check_int("batch_size", self.batch_size, 1)
        _check_int("split_seed", self.split_seed, 0)
        _check_int("num_workers", self.num_workers, 0)
        if self.image_size is not None:
            _check_int("image_size", self.image_size, MIN_IMAGE_SIZE)
        v = self.val_size
        if _is_int(v):
            if v < 1:
                raise DataConfigError(f"val_size: must be a fraction in (0, 1) or a count >= 1, got {v!r}")
        elif not isinstance(v, float) or not 0.0 < v < 1.0:
            raise DataConfigError(f"val_size: must be a fraction in (0, 1) or a count >= 1, got {v!r}")
        for field in ("augment", "download"):
            if not isinstance(getattr(self, field), bool):
                raise DataConfigError(f"{field}: must be True or False, got {getattr(self, field)!r}")
        if self.flip not in FLIP_MODES:
            raise DataConfigError(f"flip: unknown value {self.flip!r}; allowed: {', '.join(FLIP_MODES)}")
        if self.flip != "random" and not DATASETS.get(self.name).hflip:
            raise DataConfigError(f"flip: {self.flip} schedules mirrored images, but {self.name} never mirrors "
                                  f"its images (a mirrored one is another thing); leave flip at random")

    def replace(self, **changes: Any) -> DataConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings), for study attributes and logs."""
        out = dataclasses.asdict(self)
        for field in ("data_dir", "cache_dir"):
            if out[field] is not None:
                out[field] = str(out[field])
        return out
