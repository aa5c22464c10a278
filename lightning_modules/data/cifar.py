"""``cifar10`` / ``cifar100``: the Krizhevsky python batches, read from a local copy or downloaded.

A copy under the data directory (``<data_dir>/cifar-10-batches-py`` or ``cifar-100-python``, or ``data_dir``
being that folder) is used as is: no checksum pass, so a prepared or trimmed copy works too. When it is
missing, torchvision downloads and verifies it (``download=True``); when that fails, the error names the
folders looked at and how to point at a copy. The batches already are uint8 arrays, so they go straight to
the fast path without a decode cache. They are pickles by the publisher's design; they are read with an
unpickler that only admits NumPy arrays and plain containers, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import numpy as np
from torchvision import datasets as tv_datasets

from lightning_modules.data.base import ArrayDataModule, SourceArrays, resize_uint8
from lightning_modules.data.config import DATA_DIR_ENV
from lightning_modules.data.errors import DataError
from lightning_modules.data.registry import DATASETS

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "read_cifar_batch"]

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # A NumPy scalar (labels written as ``list(np_array)`` by a hand-made copy): a dtype and its raw bytes.
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> dict[str, Any]:
    """One CIFAR python batch (``data``, ``labels``/``fine_labels``, or the meta dict) as a dict."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except Exception as err:
        raise DataError(
            f"cannot read CIFAR file {path} ({type(err).__name__}: {err}); delete the folder to download it "
            f"again, or pass --data-dir pointing at a good copy"
        ) from None
    if not isinstance(entry, dict):
        raise DataError(f"cannot read CIFAR file {path} (not a CIFAR batch); pass --data-dir at a good copy")
    return entry


def _reachable(url: str, timeout: float = 10.0) -> None:
    """Fail in seconds, not minutes, where there is no network (urllib has no timeout of its own).

    Skipped behind a proxy, where a direct connection says nothing about the download.
    """
    if any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return
    host = urlparse(url).hostname or ""
    with socket.create_connection((host, 443), timeout=timeout):
        pass


class _CIFARDataModule(ArrayDataModule):
    """Shared reader: subclasses name the torchvision class and the label key."""

    tv_class: ClassVar[type[tv_datasets.CIFAR10]]
    label_key: ClassVar[str]

    @property
    def folder_name(self) -> str:
        return self.tv_class.base_folder

    def _files(self) -> tuple[list[str], list[str], str]:
        tv = self.tv_class
        return [n for n, _ in tv.train_list], [n for n, _ in tv.test_list], tv.meta["filename"]

    def _candidates(self) -> list[Path]:
        root = self.data_root
        return [root / self.folder_name, root] if root.name != self.folder_name else [root]

    def _find_copy(self) -> Path | None:
        train, test, meta = self._files()
        for folder in self._candidates():
            if all((folder / n).is_file() for n in (*train, *test, meta)):
                return folder
        return None

    def _missing_message(self, why: str) -> str:
        looked = " and ".join(str(p) for p in self._candidates())
        return (
            f"{self.name}: no copy under {self.data_root} "
            f"(looked for the {self.folder_name} files in {looked}) "
            f"and {why}; pass --data-dir DIR pointing at a folder holding {self.folder_name}, "
            f"or set {DATA_DIR_ENV}"
        )

    def _locate(self) -> Path:
        """The folder holding the batches, downloading them first if allowed and needed."""
        folder = self._find_copy()
        if folder is not None:
            return folder
        if not self.cfg.download:
            raise DataError(self._missing_message("download is disabled (download=False)"))
        try:
            _reachable(self.tv_class.url)
            self.data_root.mkdir(parents=True, exist_ok=True)
            self.tv_class(root=str(self.data_root), train=True, download=True)
        except Exception as err:
            raise DataError(
                self._missing_message(f"the download failed ({type(err).__name__}: {err})")
            ) from None
        folder = self._find_copy()
        if folder is None:  # pragma: no cover - torchvision verified the download
            raise DataError(self._missing_message("the download did not produce the expected files"))
        return folder

    def _prepare(self) -> None:
        self._locate()

    def _read(self, folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        data, labels = [], []
        for n in names:
            entry = read_cifar_batch(folder / n)
            if "data" not in entry or self.label_key not in entry:
                raise DataError(
                    f"{self.name}: {folder / n} has no 'data'/'{self.label_key}' entries; "
                    f"is it a {self.folder_name} file? pass --data-dir at a good copy"
                )
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[self.label_key], dtype=np.int64))
        return np.concatenate(data), np.concatenate(labels)

    def _load(self) -> SourceArrays:
        folder = self._locate()
        train, test, meta = self._files()
        train_x, train_y = self._read(folder, train)
        test_x, test_y = self._read(folder, test)
        classes = tuple(str(c) for c in read_cifar_batch(folder / meta)[self.tv_class.meta["key"]])
        for split, y in (("train", train_y), ("test", test_y)):
            if len(y) and (y.min() < 0 or y.max() >= len(classes)):
                raise DataError(f"{self.name}: {split} labels outside 0..{len(classes) - 1} in {folder}; "
                                f"pass --data-dir at a good copy")
        if self.cfg.image_size is not None:
            size = self.cfg.image_size
            train_x, test_x = resize_uint8(train_x, size), resize_uint8(test_x, size)
        return SourceArrays(train_x, train_y, test_x, test_y, classes, source=str(folder))


@DATASETS.register("cifar10")
class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50,000 train / 10,000 test, 32x32 RGB, 10 classes) on the fast path."""

    name = "cifar10"
    tv_class = tv_datasets.CIFAR10
    label_key = "labels"


@DATASETS.register("cifar100")
class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels: 100 classes) on the fast path."""

    name = "cifar100"
    tv_class = tv_datasets.CIFAR100
    label_key = "fine_labels"
