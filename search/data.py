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
    """The study's DataModule, set up; every data problem becomes one line for the user, and so does flip
    test-time augmentation on data whose mirror image is another thing (digits: a mirrored 2 is no 2)."""
    dataset = cfg.data.dataset
    # The dataset class says it (``hflip``): refused before any image is decoded.
    tta = cfg.training.tta
    if tta != "none" and not getattr(DATASETS.get(dataset), "hflip", True):  # every TTA mode mirrors
        raise UsageError(f"{cfg.name}: training.tta: {tta} evaluates mirrored images, but {dataset} is not "
                         f"mirror-symmetric (its training never flips); set tta: none for it "
                         f"(in by_dataset.{dataset}.training, or the study's training)")
    return ready_datamodule(data_config(cfg))
