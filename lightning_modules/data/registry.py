"""The dataset registry: name -> DataModule class taking a ``DataConfig``; one decorated class each."""

from __future__ import annotations

from typing import Any

from lightning_modules.registry import Registry

__all__ = ["DATASETS"]

DATASETS: Registry[Any] = Registry("dataset")
