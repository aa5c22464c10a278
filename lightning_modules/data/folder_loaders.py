"""The DataLoader path for ImageFolder trees too large for the device-resident fast path.

Standard ImageNet-style transforms (``RandomResizedCrop`` + flip for training, resize + centre crop for
evaluation) in worker processes. Under ``flip: alternate`` the sampler, in the main process, decides each
image's flip (it knows the epoch, which the workers do not) and hands it to the workers with the index.
Every file is decoded once before training (in parallel), so a damaged one stops the study before any
trial trains instead of failing each trial when its loader reaches the file; the normalisation is
estimated from a fixed sample of training images. Both results are kept in small JSON files next to the
decode caches, keyed by the source files (the check by those alone), so later trials and processes skip them.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from lightning_modules.data.base import spread
from lightning_modules.data.cache import atomic_write, load_or_build_once, source_key
from lightning_modules.data.config import DataConfig
from lightning_modules.data.decode import check_images, to_rgb
from lightning_modules.data.errors import DataError
from lightning_modules.data.loader import alternate_first_flips
from lightning_modules.data.splits import REPORT_SPLIT, SELECTION_SPLIT, split_indices

if TYPE_CHECKING:
    from lightning_modules.data.imagefolder import FolderTree

__all__ = ["DEFAULT_LARGE_IMAGE_SIZE", "STATS_SAMPLE", "FolderLoaders"]

DEFAULT_LARGE_IMAGE_SIZE = 224
STATS_SAMPLE = 1000  # training images the normalisation is estimated from (fixed seed)
_CROP_RATIO = 0.875  # resize to size / 0.875, then centre-crop (the torchvision ImageNet recipe)
# Part of the statistics file's key: bump when the pixels the statistics are computed from change, so old
# files are not read. 2: 16-bit greys keep their high byte (1 clipped them to white).
_STATS_FORMAT = 2
# Part of the decode check's key: bump when ``to_rgb`` accepts or refuses other files, so they are checked
# again.
_CHECK_FORMAT = 1


def _default_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of every loader here. Worker processes are forked from the trial's process and
    inherit its stop-signal handlers (``search.worker`` turns Ctrl-C into the trial's interruption). Ctrl-C
    reaches the whole process group, workers included; with the inherited handler they died with a
    traceback, and torch failed the trial with "DataLoader worker exited unexpectedly" instead of recording
    the interruption. Torch's worker loop expects Python's defaults: a KeyboardInterrupt it swallows,
    leaving the stop to the main process."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Files(Dataset):
    """(path, label) pairs read with Pillow and passed through ``transform``."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Any) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, int]:
        """``key`` is an index, or ``(index, mirror)`` from ``_AlternateFlipSampler``."""
        i, mirror = key if isinstance(key, tuple) else (key, False)
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = to_rgb(im)
        except Exception as err:
            msg = f"{type(err).__name__}: {err}"
            # Every file decoded in the check before training: this one changed since (or decodes only sometimes).
            raise DataError(f"imagefolder: cannot decode image {path} ({msg}), which decoded in the check before "
                            f"training; fix or remove the file") from None
        x = self.transform(image)
        # Mirroring after the crop is the same distribution as before it: RandomResizedCrop's box is placed
        # uniformly, so its mirror image is as likely.
        return (x.flip(-1) if mirror else x), label


class _AlternateFlipSampler(DistributedSampler):
    """``DistributedSampler`` whose items are ``(index, mirror)``: airbench's alternating flips (see
    ``DataConfig.flip``), image ``i`` mirrored in epoch ``e`` iff its seeded coin differs from ``e % 2``.
    Lightning calls ``set_epoch`` on it before every epoch, as on the plain sampler."""

    def __init__(self, dataset: Dataset, first_flips: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.first_flips = first_flips.tolist()

    def __iter__(self) -> Iterator[tuple[int, bool]]:  # type: ignore[override]
        odd = bool(self.epoch % 2)
        return ((i, self.first_flips[i] != odd) for i in super().__iter__())


def _save_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomically, like the decode cache (``load_or_build_once`` turns a failed write into a warning)."""
    atomic_write(path, lambda f: f.write(json.dumps(payload).encode()))


def _tree_checked(path: Path, n_files: int) -> bool:
    """Whether an earlier process decoded all ``n_files`` of the tree the name of ``path`` is keyed by; an
    unreadable record (cut short by a crash) only means checking again."""
    try:
        return json.loads(path.read_text()).get("decoded") == n_files
    except (OSError, ValueError, AttributeError):  # absent, not JSON, or JSON but not an object
        return False


def _read_stats(path: Path) -> tuple[list[float], list[float]] | None:
    """The saved (mean, std), or None when absent or unreadable (empty or cut short: a crash or a full disk
    while an older version wrote it), so the statistics are computed again and the file rewritten."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        mean, std = [float(v) for v in saved["mean"]], [float(v) for v in saved["std"]]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("not 3 channels")
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        print(f"se-search: ignoring unreadable statistics file {path} ({err}); computing them again",
              file=sys.stderr)
        return None
    return mean, std


class FolderLoaders:
    """Splits, normalisation and DataLoaders for one large-image tree."""

    def __init__(self, tree: FolderTree, cfg: DataConfig, cache_root: Path) -> None:
        self.tree = tree
        self.cfg = cfg
        self.image_size = cfg.image_size or DEFAULT_LARGE_IMAGE_SIZE
        labels = tree.labels("train")
        paths = tree.paths("train")
        self.indices, self.test_from = split_indices(labels, cfg.val_size, cfg.split_seed,
                                                     None if tree.test is None else len(tree.test),
                                                     "imagefolder")
        self.samples = {split: [(paths[i], int(labels[i])) for i in self.indices[split]] for split in ("train", "val")}
        self.samples["test"] = (
            [(paths[i], int(labels[i])) for i in self.indices["test"]] if tree.test is None
            else list(zip(tree.paths("test"), tree.labels("test").tolist(), strict=True)))
        key = source_key(tree.stats, "folder", _STATS_FORMAT, self.image_size, cfg.split_seed, cfg.val_size)
        self.stats_file = cache_root / f"imagefolder-{tree.root.name}-{key[:24]}.stats.json"
        # Keyed by the files alone: whether they decode does not depend on the size or the split.
        key = source_key(tree.stats, "decoded", _CHECK_FORMAT)
        self.check_file = cache_root / f"imagefolder-{tree.root.name}-{key[:24]}.decoded.json"
        self._check_decodes()
        self.mean, self.std = self._stats()

    def _eval_transform(self, normalize: bool = True) -> Any:
        size = self.image_size
        steps: list[Any] = [T.Resize(round(size / _CROP_RATIO)), T.CenterCrop(size), T.ToTensor()]
        return T.Compose([*steps, T.Normalize(self.mean, self.std)] if normalize else steps)

    def _train_transform(self) -> Any:
        if not self.cfg.augment:
            return self._eval_transform()
        # Under "alternate" the sampler says which images to mirror (``_AlternateFlipSampler``).
        flip = [T.RandomHorizontalFlip()] if self.cfg.flip == "random" else []
        return T.Compose([T.RandomResizedCrop(self.image_size), *flip, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _check_decodes(self) -> None:
        """Decode every file of the tree once, before any training, and record that it passed; the processes
        of a study starting together check once, the others waiting for the record."""
        paths = self.tree.paths("train") + self.tree.paths("test")
        record = {"decoded": len(paths)}
        load_or_build_once(self.check_file, lambda: True if _tree_checked(self.check_file, len(paths)) else None,
                           lambda: check_images(paths, what=f"imagefolder {self.tree.root}") or True,
                           lambda _: _save_json(self.check_file, record))

    def _stats(self) -> tuple[list[float], list[float]]:
        """Mean/std estimated on a fixed sample of training images, computed once and saved."""
        stats, _ = load_or_build_once(self.stats_file, lambda: _read_stats(self.stats_file), self._measure_stats,
                                      lambda stats: _save_json(self.stats_file, {"mean": stats[0], "std": stats[1]}))
        return stats

    def _measure_stats(self) -> tuple[list[float], list[float]]:
        train = self.samples["train"]
        pick = np.random.RandomState(0).permutation(len(train))[:STATS_SAMPLE]
        ds = _Files([train[i] for i in pick], self._eval_transform(normalize=False))
        total = torch.zeros(3, dtype=torch.float64)
        total_sq = torch.zeros(3, dtype=torch.float64)
        count = 0
        for x, _ in DataLoader(ds, batch_size=64, num_workers=self.cfg.num_workers,
                               worker_init_fn=_default_stop_signals):
            x = x.to(torch.float64)
            total += x.sum(dim=(0, 2, 3))
            total_sq += (x * x).sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
        return mean.tolist(), std.tolist()

    def _loader_kwargs(self, device: torch.device) -> dict[str, Any]:
        workers = self.cfg.num_workers
        return {"batch_size": self.cfg.batch_size, "num_workers": workers,
                "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
                "worker_init_fn": _default_stop_signals}

    def train_loader(self, world: int, rank: int, seed: int, device: torch.device) -> DataLoader:
        """Shuffled, augmented, drop-last; sharded over ``world`` ranks by our own ``DistributedSampler``
        (Lightning keeps it), seeded from the run seed so epochs are reproducible."""
        ds = _Files(self.samples["train"], self._train_transform())
        if len(ds) < self.cfg.batch_size * world:
            raise DataError(f"imagefolder: the training split has {len(ds)} images, fewer than one batch of "
                            f"{self.cfg.batch_size} per process; lower batch_size")
        seed = seed % 2**62
        shard = {"num_replicas": world, "rank": rank, "shuffle": True, "seed": seed, "drop_last": True}
        sampler = (_AlternateFlipSampler(ds, alternate_first_flips(len(ds), seed), **shard)
                   if self.cfg.augment and self.cfg.flip == "alternate" else DistributedSampler(ds, **shard))
        return DataLoader(ds, sampler=sampler, drop_last=True, generator=torch.Generator().manual_seed(seed),
                          **self._loader_kwargs(device))

    def sample_loader(self, split: str, n: int, device: torch.device) -> DataLoader:
        """About ``n`` files of ``split`` evenly spaced over it, unaugmented, in a fixed order
        (``ArrayDataModule.spread_sample``)."""
        return DataLoader(_Files(spread(self.samples[split], n), self._eval_transform()), shuffle=False,
                          **self._loader_kwargs(device))

    def eval_loader(self, split: str, world: int, rank: int, device: torch.device) -> DataLoader:
        """In file order; under DDP rank r reads every ``world``-th file from the r-th (disjoint shards that
        cover the split once, as the tensor loaders do)."""
        return DataLoader(_Files(self.samples[split][rank::world], self._eval_transform()), shuffle=False,
                          **self._loader_kwargs(device))

    def describe(self) -> dict[str, Any]:
        sample = min(STATS_SAMPLE, len(self.samples["train"]))
        return {
            "dataset": "imagefolder",
            "source": str(self.tree.root),
            "classes": list(self.tree.classes),
            "cache_file": None,
            "cache_hit": None,
            "stats_file": str(self.stats_file),
            "decode_check_file": str(self.check_file),
            "val_from": f"train pool: stratified, split_seed {self.cfg.split_seed}",
            "test_from": self.test_from,
            "num_classes": len(self.tree.classes),
            "in_channels": 3,
            "image_size": self.image_size,
            "pipeline": "dataloader",
            "splits": {name: len(s) for name, s in self.samples.items()},
            "split_seed": self.cfg.split_seed,
            "val_size": self.cfg.val_size,
            "selection_split": SELECTION_SPLIT,
            "report_split": REPORT_SPLIT,
            "normalization": {"mean": list(self.mean), "std": list(self.std),
                              "computed_on": f"train split (estimate from {sample} images)"},
            "augment": {"random_resized_crop": self.image_size, "horizontal_flip": self.cfg.flip}
            if self.cfg.augment else None,
            "batch_size": self.cfg.batch_size,
        }
