"""From a study's data section to a ready DataModule (decoded or loaded from the cache)."""

from __future__ import annotations

import pytorch_lightning as pl

from lightning_modules.data import DATASETS, DataConfig, DataError, build_datamodule
from search.errors import UsageError
from search.study_config import StudyConfig

__all__ = ["data_config", "prepare_datamodule", "ready_datamodule"]


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
            flip=d.flip,
        )
    except (DataError, ValueError) as e:
        raise UsageError(f"{cfg.name}: data.{e}") from None


def ready_datamodule(cfg: DataConfig) -> pl.LightningDataModule:
    """Build and set up a DataModule (decoded, or read from the cache another process filled). Takes the
    plain ``DataConfig`` so DDP helper processes can receive it pickled."""
    try:
        dm = build_datamodule(cfg)
        dm.prepare_data()
        dm.setup("fit")
    except DataError as e:
        raise UsageError(str(e)) from None
    return dm


def prepare_datamodule(cfg: StudyConfig) -> pl.LightningDataModule:
    """The study's DataModule, set up; every data problem becomes one line for the user, and so does
    test-time augmentation (every mode mirrors) on data whose mirror image is another thing (digits: a
    mirrored 2 is no 2). Both are checked before any image is decoded."""
    data = data_config(cfg)  # validates the dataset name first
    tta = cfg.training.tta
    if tta != "none" and not DATASETS.get(data.name).hflip:
        raise UsageError(f"{cfg.name}: training.tta: {tta} evaluates mirrored images, but {data.name} is not "
                         f"mirror-symmetric (its training never flips); set tta: none for it "
                         f"(in by_dataset.{data.name}.training, or the study's training)")
    return ready_datamodule(data)
