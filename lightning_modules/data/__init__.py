"""DataModules that feed trials fast, offline or downloaded.

``build_datamodule(DataConfig(name=...))`` gives a ``pytorch_lightning.LightningDataModule`` for one of
``DATASETS``: ``digits`` (bundled with scikit-learn, offline), ``cifar10``/``cifar100`` (local copy or
download) and ``imagefolder`` (any ``train/<class>/`` tree). Small images are decoded once into a uint8
cache, held on the training device and augmented there in whole batches; large ones use DataLoaders.
Every data problem raises ``DataError`` with a one-line message, before any training starts.
"""

from __future__ import annotations

from lightning_modules.data.base import FAST_PATH_MAX_SIZE, ArrayDataModule, SourceArrays
from lightning_modules.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_modules.data.config import CACHE_DIR_ENV, DATA_DIR_ENV, DataConfig
from lightning_modules.data.digits import DigitsDataModule
from lightning_modules.data.errors import DataConfigError, DataError
from lightning_modules.data.imagefolder import ImageFolderDataModule
from lightning_modules.data.loader import DeviceBatchLoader
from lightning_modules.data.registry import DATASETS
from lightning_modules.data.splits import REPORT_SPLIT, SELECTION_SPLIT

__all__ = [
    "CACHE_DIR_ENV",
    "DATASETS",
    "DATA_DIR_ENV",
    "FAST_PATH_MAX_SIZE",
    "REPORT_SPLIT",
    "SELECTION_SPLIT",
    "ArrayDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataConfig",
    "DataConfigError",
    "DataError",
    "DeviceBatchLoader",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "SourceArrays",
    "build_datamodule",
]


def build_datamodule(cfg: DataConfig) -> ArrayDataModule:
    """The DataModule registered under ``cfg.name`` (already validated by ``DataConfig``)."""
    if not isinstance(cfg, DataConfig):
        raise DataConfigError(f"cfg: expected a DataConfig, got {type(cfg).__name__}")
    return DATASETS.get(cfg.name)(cfg)
