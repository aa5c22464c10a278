"""From a study's data section to a ready DataModule (decoded or loaded from the cache)."""

from __future__ import annotations

import pytorch_lightning as pl

from lightning_modules.data import DataConfig, DataError, build_datamodule
from search.errors import UsageError
from search.study_config import StudyConfig

__all__ = ["data_config", "prepare_datamodule"]


def data_config(cfg: StudyConfig) -> DataConfig:
    d = cfg.data
    try:
        return DataConfig(
            name=d.dataset,
            data_dir=d.data_dir,
            batch_size=cfg.training.batch_size,
            val_size=d.val_size,
            split_seed=d.split_seed,
            image_size=d.image_size,
            num_workers=d.num_workers,
            augment=d.augment,
        )
    except (DataError, ValueError) as e:
        raise UsageError(f"{cfg.name}: data.{e}") from None


def prepare_datamodule(cfg: StudyConfig) -> pl.LightningDataModule:
    """Build and set up the study's DataModule; every data problem becomes one line for the user."""
    try:
        dm = build_datamodule(data_config(cfg))
        dm.prepare_data()
        dm.setup("fit")
    except DataError as e:
        raise UsageError(str(e)) from None
    return dm
