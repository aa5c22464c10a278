"""DataModules on real data: digits end to end, ImageFolder trees the tests write (and the shared CIFAR-10
JPEG copy), CIFAR python batches in torchvision's format, the decode cache, the device batch loader's
augmentation, sharding and seeding, and every data error as one line before training."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchmetrics
from PIL import Image
from torchvision.transforms import PILToTensor

from lightning_modules import ConfigError, build_arch
from lightning_modules.data import (
    CACHE_DIR_ENV,
    DATA_DIR_ENV,
    DATASETS,
    ArrayDataModule,
    DataConfig,
    DataError,
    DeviceBatchLoader,
    SourceArrays,
    build_datamodule,
    folder_loaders,
)
from lightning_modules.data import cache as cache_module
from lightning_modules.data.augment import crop_flip
from lightning_modules.data.cache import meta_path
from lightning_modules.data.cifar import read_cifar_batch
from lightning_modules.data.decode import decode_images
from lightning_modules.data.folder_loaders import _Files
from tests.conftest import REPO

SHARED_CIFAR = Path(__file__).resolve().parents[3] / "shared/data/cifar10-jpeg"


@pytest.fixture(autouse=True)
def _own_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data and cache roots of this test only, so cache hits and misses are the test's own."""
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data-root"))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache-root"))


# -- helpers ---------------------------------------------------------------------------------------------
def _image(label: int, i: int, size: tuple[int, int]) -> Image.Image:
    """A noisy image whose mean colour depends on the class, so a network can learn the classes."""
    rng = np.random.RandomState(1000 * label + i)
    base = np.array([(label * 70) % 256, (label * 130 + 60) % 256, (label * 200 + 30) % 256])
    pixels = np.clip(base + rng.randint(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _write_tree(
    root: Path,
    classes: tuple[str, ...] = ("ant", "bee", "cat"),
    n_train: int = 20,
    n_test: int | None = 6,
    size: tuple[int, int] = (12, 12),
    ext: str = "png",
) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        if n is None:
            continue
        for label, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(label, i, size).save(folder / f"{i:04d}.{ext}")
    return root


def _write_fake_cifar(root: Path, name: str, per_batch: int = 30) -> Path:
    """A tiny copy in the exact python-pickle layout torchvision reads (random pixels, balanced labels)."""
    rng = np.random.RandomState(0)
    if name == "cifar10":
        folder, label_key, classes = root / "cifar-10-batches-py", "labels", [f"c{i}" for i in range(10)]
        files = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
        meta_name = "batches.meta"
        meta = {"label_names": classes, "num_cases_per_batch": per_batch, "num_vis": 3072}
    else:
        folder, label_key, classes = root / "cifar-100-python", "fine_labels", [f"f{i}" for i in range(100)]
        files = ["train", "test"]
        meta_name = "meta"
        meta = {"fine_label_names": classes, "coarse_label_names": [f"k{i}" for i in range(20)]}
    folder.mkdir(parents=True)
    n_classes = len(classes)
    for f in files:
        n = per_batch if name == "cifar10" else per_batch * 5 if f == "train" else per_batch
        entry = {
            "batch_label": f,
            "data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
            label_key: [int(i % n_classes) for i in range(n)],
            "filenames": [f"{f}_{i}.png" for i in range(n)],
        }
        if name == "cifar100":
            entry["coarse_labels"] = [0] * n
        with open(folder / f, "wb") as out:
            pickle.dump(entry, out, protocol=2)
    with open(folder / meta_name, "wb") as out:
        pickle.dump(meta, out, protocol=2)
    return folder


def _digits(**changes: Any) -> DataConfig:
    return DataConfig(name="digits", **{"batch_size": 128, "num_workers": 0, **changes})


def _batches(loader: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _trainer(**overrides: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    options.update(overrides)
    return pl.Trainer(**options)


def _se_model(dm: Any, epochs: int = 1) -> pl.LightningModule:
    """A small SE network (resnet20 at quarter width, SE on every residual branch), platform module."""
    from lightning_modules.classifier import SEClassifier, TrainingRecipe

    arch = build_arch("resnet20", placement="standard", num_classes=dm.num_classes,
                      in_channels=dm.in_channels, image_size=dm.image_size, width_multiplier=0.25)
    return SEClassifier(arch, TrainingRecipe(epochs=epochs, batch_size=dm.cfg.batch_size, lr=0.05))


# -- config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"name": "mnist"}, "name: unknown dataset 'mnist'; allowed: cifar10, cifar100, digits, imagefolder"),
        ({"batch_size": 0}, "batch_size: must be an integer >= 1, got 0"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"val_size": 0}, "val_size"),
        ({"val_size": 1.0}, "val_size: must be a fraction in (0, 1) or a count >= 1, got 1.0"),
        ({"val_size": -3}, "val_size"),
        ({"split_seed": -1}, "split_seed"),
        ({"image_size": 4}, "image_size: must be an integer >= 8, got 4"),
        ({"num_workers": -1}, "num_workers"),
        ({"augment": "yes"}, "augment: must be True or False, got 'yes'"),
        ({"download": 1}, "download"),
        ({"data_dir": 7}, "data_dir: must be a directory path or None, got 7"),
        ({"flip": "sometimes"}, "flip: unknown value 'sometimes'; allowed: random, alternate"),
        ({"flip": "alternate"}, "flip: alternate schedules mirrored images, but digits never mirrors its images"),
    ],
)
def test_config_invalid_value_names_field(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(DataError) as info:
        DataConfig(**{"name": "digits", **changes})
    assert fragment in str(info.value)
    assert isinstance(info.value, ConfigError)  # also the platform's config error
    assert "\n" not in str(info.value)


def test_config_paths_normalised_and_exported_as_strings(tmp_path: Path) -> None:
    cfg = DataConfig(name="imagefolder", data_dir=str(tmp_path), cache_dir=tmp_path / "c", val_size=500)
    assert cfg.data_dir == tmp_path
    assert cfg.to_dict()["data_dir"] == str(tmp_path)
    assert cfg.replace(batch_size=7).batch_size == 7


def test_registry_lists_every_dataset() -> None:
    assert set(DATASETS.names()) == {"digits", "cifar10", "cifar100", "imagefolder"}
    with pytest.raises(ValueError, match="unknown dataset 'x'; allowed: "):
        DATASETS.get("x")


def test_build_datamodule_rejects_non_config() -> None:
    with pytest.raises(DataError, match="expected a DataConfig"):
        build_datamodule({"name": "digits"})  # type: ignore[arg-type]


# -- digits ----------------------------------------------------------------------------------------------
def test_digits_setup_shapes_and_provenance() -> None:
    dm = build_datamodule(_digits())
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.num_classes
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 16)
    d = dm.describe()
    assert d["splits"] == {"train": 1294, "val": 144, "test": 359}
    assert sum(d["splits"].values()) == 1797
    assert d["selection_split"] == "val" and d["report_split"] == "test"
    assert "carved" in d["test_from"] and "split_seed 0" in d["val_from"]
    assert d["pipeline"] == "device" and d["cache_file"] is None and "load_digits" in d["source"]
    assert d["augment"] == {"random_crop_padding": 2, "horizontal_flip": "never"}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (128,) and y.dtype == torch.int64
    # Normalised with the training split's own statistics: about zero mean, unit std over the split.
    mean, std = d["normalization"]["mean"][0], d["normalization"]["std"][0]
    train_images, _ = dm.split_arrays("train")
    pixels = train_images.astype(np.float64) / 255
    assert mean == pytest.approx(pixels.mean(), abs=1e-12) and std == pytest.approx(pixels.std(), abs=1e-12)


def test_worker_processes_import_scikit_learn_only_for_digits() -> None:
    """Every worker process imports the datasets; scikit-learn (with the pandas and pyarrow it pulls in, over
    a second) is imported only when digits are loaded, not with the module."""
    probe = ("import sys, search.worker; heavy = ('sklearn', 'pandas', 'pyarrow'); "
             "print(sorted(m for m in heavy if m in sys.modules)); "
             "from lightning_modules.data import DataConfig, build_datamodule; "
             "dm = build_datamodule(DataConfig(name='digits')); dm.prepare_data(); dm.setup('fit'); "
             "print('sklearn' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout == "[]\nTrue\n", result.stdout + result.stderr[-2000:]


def test_digits_image_size_option_resizes() -> None:
    dm = build_datamodule(_digits(image_size=8, batch_size=64))
    dm.setup("fit")
    assert dm.image_size == 8
    assert next(iter(dm.val_dataloader()))[0].shape[1:] == (1, 8, 8)


def test_digits_splits_disjoint_covering_and_stable() -> None:
    def splits(seed: int) -> dict[str, np.ndarray]:
        dm = build_datamodule(_digits(split_seed=seed))
        dm.setup("fit")
        return dm.split_indices

    a, b, other = splits(0), splits(0), splits(1)
    assert set(a["train"]).isdisjoint(a["val"]) and set(a["train"]).isdisjoint(a["test"])
    assert set(a["val"]).isdisjoint(a["test"])
    assert sorted(np.concatenate([a["train"], a["val"], a["test"]]).tolist()) == list(range(1797))
    for name in a:
        assert np.array_equal(a[name], b[name])  # stable across runs
    assert np.array_equal(a["test"], other["test"])  # the carved test split ignores split_seed
    assert not np.array_equal(a["val"], other["val"])
    # Stratified: every class is in the validation split in proportion.
    dm = build_datamodule(_digits())
    dm.setup()
    _, val_labels = dm.split_arrays("val")
    assert np.bincount(val_labels, minlength=10).min() >= 13


def test_digits_val_size_count_and_too_large() -> None:
    dm = build_datamodule(_digits(val_size=100))
    dm.setup()
    assert dm.describe()["splits"]["val"] == 100
    with pytest.raises(DataError, match="val_size: cannot hold out 5000 of 1438"):
        build_datamodule(_digits(val_size=5000)).setup()


def test_digits_eval_batches_are_the_split_in_order() -> None:
    dm = build_datamodule(_digits())  # 144 val images: one evaluation batch
    dm.setup()
    images, labels = dm.split_arrays("val")
    loader = dm.val_dataloader()
    loader.batch_size = 100  # two batches, to see order and the kept partial batch
    batches = _batches(loader)
    assert [len(y) for _, y in batches] == [100, 44]  # last partial batch kept
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(y, torch.from_numpy(labels))
    d = dm.describe()["normalization"]
    expected = (torch.from_numpy(images).double() / 255 - d["mean"][0]) / d["std"][0]
    assert torch.allclose(x.double(), expected, atol=1e-5)
    assert torch.equal(torch.cat([b[0] for b in _batches(dm.val_dataloader())]), x)  # same every time


def test_train_loader_reproducible_from_global_seed() -> None:
    dm = build_datamodule(_digits())
    dm.setup("fit")
    pl.seed_everything(3, verbose=False)
    first = _batches(dm.train_dataloader())
    pl.seed_everything(3, verbose=False)
    again = _batches(dm.train_dataloader())
    pl.seed_everything(4, verbose=False)
    other = _batches(dm.train_dataloader())
    assert len(first) == 1294 // 128  # drop-last
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][1], other[0][1])


def test_train_loader_epochs_differ_and_follow_set_epoch() -> None:
    dm = build_datamodule(_digits())
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)
    loader = dm.train_dataloader()
    epoch0, epoch1 = _batches(loader), _batches(loader)  # a plain loop advances the epoch
    assert not torch.equal(epoch0[0][1], epoch1[0][1])
    loader.sampler.set_epoch(0)  # what Lightning's fit loop calls, resumed runs included
    assert torch.equal(_batches(loader)[0][0], epoch0[0][0])
    assert torch.equal(loader.epoch_indices(1), loader.epoch_indices(1))
    assert not torch.equal(loader.epoch_indices(0), loader.epoch_indices(1))


# -- device batch loader: augmentation, sharding ----------------------------------------------------------
def _label_images(n: int = 64, size: int = 16, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image is constant at (label + 1) * 10, so any crop of it shows only its label's value or zero
    padding: label alignment can be read off the pixels."""
    labels = torch.arange(n) % 10
    values = ((labels + 1) * 10).to(torch.uint8)[:, None, None, None]
    images = values.expand(n, channels, size, size).contiguous()
    return images, labels


def test_augmentation_keeps_shapes_and_label_alignment() -> None:
    images, labels = _label_images()
    loader = DeviceBatchLoader(images, labels, batch_size=16, mean=[0.0] * 3, std=[1 / 255] * 3, shuffle=True,
                               augment=True, padding=4, seed=0)
    seen = []
    for x, y in loader:
        assert x.shape == (16, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        for img, label in zip(x, y, strict=True):
            values = set(img.unique().tolist())
            assert values <= {0.0, float((label + 1) * 10)} and float((label + 1) * 10) in values
        seen.append(y)
    assert len(seen) == 4 and sorted(torch.cat(seen).tolist()) == sorted(labels.tolist())


def _served_flips(loader: DeviceBatchLoader, images: torch.Tensor, epoch: int) -> dict[int, bool]:
    """Whether each image came mirrored in ``epoch`` (no crop padding; labels are the images' indices)."""
    loader.set_epoch(epoch)
    served = {}
    for x, ids in loader:
        for img, i in zip(x, ids.tolist(), strict=True):
            plain = images[i].to(torch.float32)
            assert torch.equal(img, plain) or torch.equal(img, plain.flip(-1))
            served[i] = not torch.equal(img, plain)
    return served


def test_alternate_flip_mirrors_each_image_the_other_way_every_epoch() -> None:
    """airbench's derandomised flip: half the images in epoch 0, then each image opposite to its previous
    epoch; the order is the one "random" gives for the same seed. Read from the pixels served."""
    n = 600
    images = torch.randint(0, 256, (n, 1, 6, 6), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ids = torch.arange(n)

    def loader(flip: str, seed: int = 3) -> DeviceBatchLoader:
        return DeviceBatchLoader(images, ids, batch_size=50, mean=[0.0], std=[1 / 255], shuffle=True, augment=True,
                                 padding=0, flip=flip, seed=seed)

    alternate = loader("alternate")
    epochs = [_served_flips(alternate, images, e) for e in range(4)]
    assert all(len(e) == n for e in epochs)  # every image, once, each epoch
    assert 0.4 < sum(epochs[0].values()) / n < 0.6
    for i in range(n):
        assert epochs[1][i] != epochs[0][i] and epochs[2][i] == epochs[0][i] and epochs[3][i] == epochs[1][i]
    assert _served_flips(loader("alternate"), images, 1) == epochs[1]  # seeded
    assert _served_flips(loader("alternate", seed=4), images, 0) != epochs[0]
    # Same seed, same visiting order; the random schedule does not alternate.
    random = loader("random")
    assert torch.equal(random.epoch_indices(2), alternate.epoch_indices(2))
    random_epochs = [_served_flips(random, images, e) for e in range(2)]
    assert sum(random_epochs[1][i] != random_epochs[0][i] for i in range(n)) < 0.6 * n
    assert not any(_served_flips(loader("never"), images, 1).values())
    with pytest.raises(ValueError, match="flip: unknown mode 'sideways'"):
        loader("sideways")


def test_alternate_flip_agrees_across_ranks() -> None:
    """Under DDP each rank serves its own batches, but an image's orientation depends only on the seed."""
    n = 400
    images = torch.randint(0, 256, (n, 1, 6, 6), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    ids = torch.arange(n)
    single = DeviceBatchLoader(images, ids, batch_size=40, mean=[0.0], std=[1 / 255], shuffle=True, augment=True,
                               padding=0, flip="alternate", seed=5)
    ranks = [DeviceBatchLoader(images, ids, batch_size=20, mean=[0.0], std=[1 / 255], shuffle=True, augment=True,
                               padding=0, flip="alternate", seed=5, world_size=2, rank=r) for r in range(2)]
    for epoch in (0, 1):
        whole = _served_flips(single, images, epoch)
        for r in ranks:
            assert all(whole[i] == f for i, f in _served_flips(r, images, epoch).items())


def test_crop_flip_matches_reference_windows() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 10, 12), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 9, (32, 2), generator=g)
    flips = torch.rand(32, generator=g) < 0.5
    out = crop_flip(images, offsets, flips, padding=4)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(32):
        dy, dx = offsets[i].tolist()
        window = padded[i, :, dy : dy + 10, dx : dx + 12]
        assert torch.equal(out[i], window.flip(-1) if flips[i] else window)


def test_train_loader_shards_disjoint_and_equal_across_ranks() -> None:
    n = 1000
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    ids = torch.arange(n)  # the "label" is the image's index
    ranks = [DeviceBatchLoader(images, ids, batch_size=32, mean=[0.0], std=[1.0], shuffle=True, augment=True,
                               padding=1, seed=11, world_size=3, rank=r) for r in range(3)]
    assert [len(r) for r in ranks] == [1000 // 96] * 3
    seen = [torch.cat([y for _, y in r]) for r in ranks]
    assert all(len(s) == 10 * 32 for s in seen)
    assert len(set(torch.cat(seen).tolist())) == 3 * 10 * 32  # disjoint
    assert all(torch.equal(s, r.epoch_indices(0)) for s, r in zip(seen, ranks, strict=True))
    with pytest.raises(ValueError, match="rank"):
        DeviceBatchLoader(images, ids, batch_size=32, mean=[0.0], std=[1.0], shuffle=True, world_size=2,
                          rank=2)


def test_eval_loader_shards_cover_the_split_once_across_ranks() -> None:
    """Evaluation under DDP: each rank serves every third image from its own, partial batches kept, so
    the ranks' shards are disjoint and together hold every image exactly once."""
    n = 1000
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    ids = torch.arange(n)
    ranks = [DeviceBatchLoader(images, ids, batch_size=64, mean=[0.0], std=[1.0], world_size=3, rank=r)
             for r in range(3)]
    seen = [torch.cat([y for _, y in r]) for r in ranks]
    assert [len(s) for s in seen] == [334, 333, 333] and [len(r) for r in ranks] == [6, 6, 6]
    assert sorted(torch.cat(seen).tolist()) == list(range(n))
    assert all(torch.equal(s, r.epoch_indices()) for s, r in zip(seen, ranks, strict=True))


def test_training_split_smaller_than_batch_is_a_data_error() -> None:
    dm = build_datamodule(_digits(batch_size=5000))
    dm.setup()
    with pytest.raises(DataError, match="fewer than one batch of 5000"):
        dm.train_dataloader()


# -- Lightning fits ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_digits_lightning_fit_twice_reuses_loaded_data() -> None:
    """Two trials on one DataModule, each with a new Trainer and model: fit + test work both times, the
    data is loaded once, and the same seed gives the same result."""
    dm = build_datamodule(_digits())
    dm.prepare_data()
    dm.setup("fit")
    results = []
    for _ in range(2):
        pl.seed_everything(0, verbose=False)
        model = _se_model(dm)
        trainer = _trainer()
        trainer.fit(model, datamodule=dm)
        val = float(trainer.callback_metrics["val_accuracy"])
        test = trainer.test(model, datamodule=dm, verbose=False)[0]["test_accuracy"]
        results.append((val, test))
    assert dm.load_count == 1
    # One device copy serves every trial's loaders (CPU here: the host arrays themselves, no copy).
    assert dm.train_dataloader().images.data_ptr() == dm.test_dataloader().images.data_ptr()
    assert results[0] == pytest.approx(results[1])
    assert 0.0 <= results[0][0] <= 1.0 and 0.0 <= results[0][1] <= 1.0


def test_digits_pipeline_is_learnable() -> None:
    """Labels stay aligned with their images through split, augmentation and normalisation: a linear model
    trained on the augmented batches classifies the validation split well above chance (10%)."""
    dm = build_datamodule(_digits(batch_size=64))
    dm.setup()
    pl.seed_everything(0, verbose=False)
    model = torch.nn.Linear(256, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = dm.train_dataloader()
    for _ in range(5):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.flatten(1)), y).backward()
            opt.step()
    with torch.no_grad():
        correct = sum(int((model(x.flatten(1)).argmax(1) == y).sum()) for x, y in dm.val_dataloader())
    assert correct / 144 > 0.85


def test_lightning_default_distributed_sampler_setting_is_safe() -> None:
    """The fast-path loaders are not DataLoaders, so Lightning's sampler injection leaves them alone."""
    dm = build_datamodule(_digits(image_size=8))
    dm.setup()

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = _trainer(use_distributed_sampler=True, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(Linear(), datamodule=dm)
    assert trainer.global_step == 3


class _IndexRecorder(pl.LightningModule):
    """Saves, per rank and epoch, the training images the rank's loader visits (top level: DDP pickles it)."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)
        self.out = out
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")

    def on_train_epoch_start(self) -> None:
        indices = self.trainer.train_dataloader.epoch_indices().numpy()
        np.save(Path(self.out) / f"rank{self.global_rank}-epoch{self.current_epoch}.npy", indices)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            np.save(Path(self.out) / f"rank{self.global_rank}-val.npy",
                    self.trainer.val_dataloaders.epoch_indices().numpy())
        x, y = batch
        self.val_accuracy.update(self.fc(x.flatten(1)), y)
        self.log("val_accuracy", self.val_accuracy, on_epoch=True, batch_size=len(y))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self) -> None:
        # Leave the process group together: Lightning otherwise destroys it from each spawned rank's atexit
        # handler, and a rank whose peer (the store's host) has already gone sometimes aborts there.
        self.trainer.strategy.barrier()
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_see_disjoint_equal_shards(tmp_path: Path) -> None:
    """Two gloo processes under Lightning's DDP: each epoch the ranks train on disjoint, equally many
    images, and the plan changes between epochs; they validate on disjoint shards covering the split."""
    dm = build_datamodule(_digits(batch_size=32, image_size=8))
    dm.setup()
    pl.seed_everything(0, verbose=False)
    trainer = _trainer(max_epochs=2, devices=2, strategy="ddp_spawn")
    model = _IndexRecorder(str(tmp_path))
    trainer.fit(model, datamodule=dm)
    seen = {(r, e): np.load(tmp_path / f"rank{r}-epoch{e}.npy") for r in (0, 1) for e in (0, 1)}
    for epoch in (0, 1):
        a, b = seen[0, epoch], seen[1, epoch]
        assert len(a) == len(b) == (1294 // 64) * 32 and not set(a.tolist()) & set(b.tolist())
    assert not np.array_equal(seen[0, 0], seen[0, 1])
    val = [np.load(tmp_path / f"rank{r}-val.npy").tolist() for r in (0, 1)]
    whole = dm.loader("val", device=torch.device("cpu")).epoch_indices().tolist()
    assert val[0] and val[1] and not set(val[0]) & set(val[1]) and sorted(val[0] + val[1]) == sorted(whole)
    # The accuracy the ranks logged from their shards is the whole split's (the final weights, one process).
    with torch.no_grad():
        hits = [(model.fc(x.flatten(1)).argmax(1) == y) for x, y in dm.loader("val", device=torch.device("cpu"))]
    assert float(trainer.callback_metrics["val_accuracy"]) == pytest.approx(float(torch.cat(hits).float().mean()))


# -- imagefolder -------------------------------------------------------------------------------------------
def _folder_cfg(root: Path, **changes: Any) -> DataConfig:
    return DataConfig(name="imagefolder", **{"data_dir": root, "batch_size": 8, "num_workers": 0, **changes})


def test_imagefolder_small_tree_end_to_end(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "tree")
    dm = build_datamodule(_folder_cfg(root))
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (3, 3, 12)
    d = dm.describe()
    assert d["classes"] == ["ant", "bee", "cat"] and d["source"] == str(root.resolve())
    assert d["splits"] == {"train": 54, "val": 6, "test": 18} and d["test_from"] == "the source's test set"
    assert Path(d["cache_file"]).is_file() and d["cache_file"].startswith(os.environ[CACHE_DIR_ENV])
    assert np.load(d["cache_file"], allow_pickle=False).shape == (78, 3, 12, 12)  # a plain .npy
    assert d["cache_hit"] is False
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 12, 12) and y.shape == (8,)
    # Decoded pixels are the files' pixels, in the sorted order, with the folder's label.
    images, labels = dm.split_arrays("test")
    assert labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    with Image.open(root / "test" / "bee" / "0002.png") as im:
        assert np.array_equal(images[8], np.asarray(im.convert("RGB")).transpose(2, 0, 1))


def test_imagefolder_cache_reused_then_invalidated_by_changed_source(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "tree")
    first = build_datamodule(_folder_cfg(root))
    first.prepare_data()
    first.setup()
    cache = Path(first.describe()["cache_file"])
    written = cache.stat().st_mtime_ns

    second = build_datamodule(_folder_cfg(root))
    second.prepare_data()
    second.setup()
    assert second.describe()["cache_hit"] is True
    assert second.describe()["cache_file"] == str(cache) and cache.stat().st_mtime_ns == written
    assert np.array_equal(second.split_arrays("train")[0], first.split_arrays("train")[0])

    changed = root / "train" / "ant" / "0000.png"
    _image(2, 99, (12, 12)).save(changed)
    os.utime(changed, ns=(written + 10**9, written + 10**9))
    third = build_datamodule(_folder_cfg(root))
    third.setup()
    assert third.describe()["cache_hit"] is False and third.describe()["cache_file"] != str(cache)
    idx = int(np.flatnonzero(third.split_indices["train"] == 0)[0])
    assert not np.array_equal(third.split_arrays("train")[0][idx], first.split_arrays("train")[0][idx])


def test_imagefolder_setup_is_cheap_the_second_time(tmp_path: Path) -> None:
    dm = build_datamodule(_folder_cfg(_write_tree(tmp_path / "tree")))
    dm.prepare_data()
    dm.setup("fit")
    dm.prepare_data()
    dm.setup("test")
    assert dm.load_count == 1


def test_imagefolder_without_test_folder_carves_fixed_split(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "tree", n_train=25, n_test=None)
    a = build_datamodule(_folder_cfg(root, split_seed=1))
    b = build_datamodule(_folder_cfg(root, split_seed=2))
    a.setup()
    b.setup()
    assert a.describe()["splits"] == {"train": 54, "val": 6, "test": 15}
    assert "carved" in a.describe()["test_from"]
    assert np.array_equal(a.split_indices["test"], b.split_indices["test"])
    assert not np.array_equal(a.split_indices["val"], b.split_indices["val"])
    kept = np.concatenate([a.split_indices["train"], a.split_indices["val"]])
    assert set(a.split_indices["test"]).isdisjoint(kept)


def test_imagefolder_image_size_resizes_on_fast_path(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "tree", size=(40, 30), n_train=10, n_test=2, ext="jpg")
    dm = build_datamodule(_folder_cfg(root, image_size=16))
    dm.setup()
    assert dm.image_size == 16 and dm.describe()["pipeline"] == "device"
    assert next(iter(dm.test_dataloader()))[0].shape == (6, 3, 16, 16)


def test_imagefolder_large_images_use_dataloaders(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "tree", size=(80, 70), n_train=10, n_test=2, ext="jpg")
    dm = build_datamodule(_folder_cfg(root, image_size=72, batch_size=4))
    dm.prepare_data()
    dm.setup("fit")
    d = dm.describe()
    assert d["pipeline"] == "dataloader" and (dm.num_classes, dm.in_channels, dm.image_size) == (3, 3, 72)
    assert d["splits"] == {"train": 27, "val": 3, "test": 6} and Path(d["stats_file"]).is_file()
    train = dm.train_dataloader()
    assert isinstance(train, torch.utils.data.DataLoader) and len(train) == 27 // 4
    x, y = next(iter(train))
    assert x.shape == (4, 3, 72, 72) and y.dtype == torch.int64
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 72, 72) and y.tolist() == [0, 0, 1, 1]
    # The statistics file is reused by the next DataModule on the same tree.
    again = build_datamodule(_folder_cfg(root, image_size=72, batch_size=4))
    again.setup()
    assert again.describe()["normalization"] == d["normalization"]


def _served_orientations(loader: torch.utils.data.DataLoader, epoch: int) -> dict[int, bool]:
    """Training image index -> whether it was served mirrored in ``epoch``, read from the pixels of images that
    brighten from left to right (any crop of such a ramp still does, its mirror darkens)."""
    loader.sampler.set_epoch(epoch)
    order = [item[0] if isinstance(item, tuple) else item for item in loader.sampler]
    served = torch.cat([x for x, _ in loader])
    slope = (served[:, :, :, -1] - served[:, :, :, 0]).mean(dim=(1, 2))
    assert bool((slope.abs() > 0.1).all())  # every crop shows its direction
    return {i: bool(s < 0) for i, s in zip(order, slope.tolist(), strict=True)}


def test_imagefolder_large_images_alternate_flips_through_dataloader_workers(tmp_path: Path) -> None:
    """Images too large for the device path go through DataLoader workers, which know neither the image nor
    the epoch: under flip: alternate the sampler hands each index its orientation, so every image is mirrored
    the other way than the epoch before, as on the device path, reproducibly from the seed."""
    ramp = np.repeat(np.linspace(0, 255, 80, dtype=np.uint8)[None, :, None], 70, axis=0).repeat(3, axis=2)
    for cls in ("a", "b"):
        (tmp_path / "tree" / "train" / cls).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(ramp).save(tmp_path / "tree" / "train" / cls / f"{i}.png")

    def train_loader(flip: str, seed: int = 7) -> torch.utils.data.DataLoader:
        # 58 training images: batches of 2 serve them all, every epoch.
        dm = build_datamodule(_folder_cfg(tmp_path / "tree", image_size=72, batch_size=2, flip=flip))
        dm.setup("fit")
        assert dm.describe()["augment"]["horizontal_flip"] == flip
        pl.seed_everything(seed, verbose=False)  # the run's seed, as a trial sets it before fit
        return dm.train_dataloader()

    alternate = train_loader("alternate")
    epochs = [_served_orientations(alternate, e) for e in range(3)]
    n = len(epochs[0])
    assert n == len(alternate.dataset) and all(set(e) == set(epochs[0]) for e in epochs)  # each image, each epoch
    assert 0.3 < sum(epochs[0].values()) / n < 0.7
    assert all(epochs[1][i] != epochs[0][i] and epochs[2][i] == epochs[0][i] for i in epochs[0])
    assert _served_orientations(train_loader("alternate"), 1) == epochs[1]  # seeded
    assert _served_orientations(train_loader("alternate", seed=8), 0) != epochs[0]
    random = train_loader("random")
    random_epochs = [_served_orientations(random, e) for e in range(2)]
    assert sum(random_epochs[1][i] != random_epochs[0][i] for i in random_epochs[0]) < 0.8 * n


def _pillow_square(path: Path, side: int) -> np.ndarray:
    """What the fast path holds for a file: its RGB pixels, resized (bilinear) to side x side if needed."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    if rgb.size != (side, side):
        rgb = rgb.resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(rgb).transpose(2, 0, 1)


def test_imagefolder_small_mixed_sizes_use_fast_path_at_largest_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Small images of mixed sizes (none above 64) stay on the fast path, resized to the largest side, and a
    line says so; they used to fall silently to DataLoaders at 224x224 (100 times the pixels of 20x20). The
    first image is not the largest, so the sizes come from the whole tree, not from it."""
    root = _write_tree(tmp_path / "tree", n_train=4, n_test=None, size=(20, 20))
    _image(0, 50, (24, 24)).save(root / "train" / "bee" / "9999.png")
    dm = build_datamodule(_folder_cfg(root, batch_size=2))
    dm.setup()
    d = dm.describe()
    assert d["pipeline"] == "device" and dm.image_size == 24 and d["cache_hit"] is False
    assert "images come in 2 sizes (20x20, 24x24); resizing them all to 24x24" in capsys.readouterr().err
    cached = np.load(d["cache_file"])  # the training files in sorted order: ant 0-3, bee 0-3 and 9999, cat 0-3
    assert cached.shape == (13, 3, 24, 24)
    assert np.array_equal(cached[4], _pillow_square(root / "train" / "bee" / "0000.png", 24))
    assert np.array_equal(cached[8], _pillow_square(root / "train" / "bee" / "9999.png", 24))  # as it was
    again = build_datamodule(_folder_cfg(root, batch_size=2))
    again.setup()
    assert again.describe()["cache_hit"] is True and again.image_size == 24
    assert "decoding" not in capsys.readouterr().err


def test_imagefolder_mixed_sizes_with_a_large_image_fall_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _write_tree(tmp_path / "tree", n_train=4, n_test=None, size=(20, 20))
    _image(0, 50, (80, 80)).save(root / "train" / "bee" / "9999.png")
    dm = build_datamodule(_folder_cfg(root, batch_size=2))
    dm.setup()
    assert dm.describe()["pipeline"] == "dataloader" and dm.image_size == 224
    capsys.readouterr()
    again = build_datamodule(_folder_cfg(root, batch_size=2))
    again.setup()  # remembered: straight to the DataLoader path, no second decode attempt
    assert again.describe()["pipeline"] == "dataloader" and "decoding" not in capsys.readouterr().err


def test_imagefolder_non_square_images_are_made_square(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``image_size`` is one side, and a network's cost is counted on ``image_size`` squared (search/cost.py):
    a 24x12 tree used to stay 24x12 while ``image_size`` said 12, so its FLOPs were counted on half its
    pixels. Without ``image_size``, non-square images are resized to a square of their longer side."""
    root = _write_tree(tmp_path / "tree", n_train=4, n_test=2, size=(24, 12))
    dm = build_datamodule(_folder_cfg(root, batch_size=4))
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert dm.image_size == 24 and x.shape == (4, 3, 24, 24)
    assert "images are 24x12, not square; resizing them all to 24x24" in capsys.readouterr().err
    images, _ = dm.split_arrays("test")
    assert np.array_equal(images[0], _pillow_square(root / "test" / "ant" / "0000.png", 24))


def test_array_datamodule_refuses_non_square_images() -> None:
    class Wide(ArrayDataModule):
        name = "wide"

        def _load(self) -> SourceArrays:
            return SourceArrays(np.zeros((20, 3, 8, 16), np.uint8), np.arange(20) % 2, None, None, ("a", "b"), "x")

    with pytest.raises(DataError, match="wide: images are 16x8, not square; pass image_size"):
        Wide(_digits()).setup()


# Every pixel format a tree may hold, one class folder each: (PIL mode, extension).
_PIXEL_FORMATS = [("RGB", "png"), ("L", "png"), ("P", "png"), ("RGBA", "png"), ("LA", "png"), ("1", "png"),
                  ("I;16", "png"), ("I;16", "tif"), ("I;16B", "tif"), ("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg")]


def _format_image(mode: str, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    if mode.startswith("I;16"):  # the whole 16-bit range: Pillow's convert("RGB") clipped it to white
        return Image.fromarray(rng.randint(0, 65536, (16, 16)).astype(">u2" if mode == "I;16B" else np.uint16))
    return Image.fromarray(rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)).convert(mode)


def _expected_rgb(path: Path) -> np.ndarray:
    """8-bit RGB (C, H, W) of a file: Pillow's conversion, and for 16-bit greys their high byte."""
    with Image.open(path) as im:
        if im.mode.startswith("I;16"):
            grey = (np.asarray(im) >> 8).astype(np.uint8)
            return np.stack([grey] * 3)
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def test_imagefolder_decoders_agree_on_every_pixel_format(tmp_path: Path) -> None:
    """The fast path's decoder (torchvision for JPEGs, Pillow otherwise) and the DataLoader path's reader
    give the same 8-bit pixels for every format, 16-bit greys scaled by their high byte."""
    root = tmp_path / "tree"
    files = []
    for k, (mode, ext) in enumerate(_PIXEL_FORMATS):
        folder = root / "train" / f"{k:02d}-{mode.replace(';', '_')}-{ext}"
        folder.mkdir(parents=True)
        for i in range(2):
            _format_image(mode, 10 * k + i).save(folder / f"{i}.{ext}")
            files.append(folder / f"{i}.{ext}")
    with Image.open(root / "train" / "06-I_16-png" / "0.png") as im:
        assert im.mode == "I;16"  # a real 16-bit file
    dm = build_datamodule(_folder_cfg(root, batch_size=2, val_size=2))
    dm.setup()
    cached = np.load(dm.describe()["cache_file"])  # in the sorted order of ``files``
    for path, fast in zip(files, cached, strict=True):
        expected = _expected_rgb(path)
        loader = _Files([(path, 0)], PILToTensor())[0][0].numpy()
        assert np.array_equal(fast, expected), path.name
        assert np.array_equal(loader, expected), path.name
    grey16 = cached[2 * _PIXEL_FORMATS.index(("I;16", "png"))]
    assert 100 < grey16.mean() < 155  # uniform 16-bit noise is mid-grey, not white


@pytest.mark.parametrize(("mode", "image_size"), [("I", None), ("F", None), ("I", 72), ("F", 72)])
def test_imagefolder_refuses_32bit_greys_before_training(tmp_path: Path, mode: str, image_size: int | None) -> None:
    """32-bit integer or float greys have no fixed 8-bit scale (per-image min/max would differ from image to
    image): refused, naming the file and the fix, on both paths (72: the DataLoader path's header check)."""
    root = _write_tree(tmp_path / "tree", n_train=5, n_test=2, size=(16, 16))
    bad = root / "train" / "bee" / "0009.tif"
    Image.fromarray((np.arange(256).reshape(16, 16) * 1000).astype(np.int32 if mode == "I" else np.float32)).save(bad)
    dm = build_datamodule(_folder_cfg(root, image_size=image_size))
    with pytest.raises(DataError) as info:
        dm.prepare_data()
        dm.setup("fit")
    message = str(info.value)
    assert str(bad) in message and f"(mode {mode})" in message and "convert it to 8- or 16-bit" in message
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["meta_truncated", "images_truncated"])
def test_imagefolder_damaged_cache_is_rebuilt(tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A cache entry cut short (a copy or rsync interrupted, a full disk on another host) is decoded again
    and rewritten, not a crash (a truncated .npz raised zipfile.BadZipFile)."""
    root = _write_tree(tmp_path / "tree", n_train=5, n_test=2)
    first = build_datamodule(_folder_cfg(root))
    first.setup()
    cache = Path(first.describe()["cache_file"])
    victim = cache if damage == "images_truncated" else meta_path(cache)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    again = build_datamodule(_folder_cfg(root))
    again.setup()
    assert again.describe()["cache_hit"] is False and "ignoring unreadable cache" in capsys.readouterr().err
    assert np.array_equal(again.split_arrays("train")[0], first.split_arrays("train")[0])
    third = build_datamodule(_folder_cfg(root))
    third.setup()
    assert third.describe()["cache_hit"] is True  # rewritten whole


@pytest.mark.parametrize("content", ["", '{"mean": [0.5, 0.5', '{"mean": [0.5]}'])
def test_imagefolder_unreadable_statistics_file_is_recomputed(tmp_path: Path, content: str) -> None:
    """The DataLoader path's statistics file, empty or cut short, is computed and written again."""
    root = _write_tree(tmp_path / "tree", n_train=3, n_test=1, size=(80, 70))
    cfg = _folder_cfg(root, image_size=72, batch_size=2, val_size=1)
    first = build_datamodule(cfg)
    first.setup()
    stats = Path(first.describe()["stats_file"])
    saved = json.loads(stats.read_text())
    stats.write_text(content)
    again = build_datamodule(cfg)
    again.setup()
    assert again.describe()["normalization"] == first.describe()["normalization"]
    assert json.loads(stats.read_text()) == saved


def test_statistics_file_write_is_atomic(tmp_path: Path) -> None:
    """A write that fails midway leaves the previous file whole and no temporary behind."""
    from lightning_modules.data.folder_loaders import _save_json

    path = tmp_path / "cache" / "x.stats.json"
    _save_json(path, {"mean": [0.5]})
    with pytest.raises(TypeError):
        _save_json(path, {"mean": [0.25], "bad": object()})  # fails while writing
    assert json.loads(path.read_text()) == {"mean": [0.5]} and os.listdir(path.parent) == ["x.stats.json"]


@pytest.mark.parametrize("failure", ["disk_full", "cache_dir_is_a_file", "cache_dir_is_a_file_large_images"])
def test_imagefolder_unwritable_cache_warns_and_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], failure: str
) -> None:
    """A cache that cannot be written (full disk, a file where the folder should be) is one warning line
    naming the folder and the variable to change; the study goes on with the images decoded in memory."""
    large = failure.endswith("large_images")
    root = _write_tree(tmp_path / "tree", n_train=4, n_test=2, size=(80, 70) if large else (12, 12))
    cache_dir = tmp_path / "cache"
    if failure == "disk_full":
        def no_space(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(cache_module.os, "fsync", no_space)
    else:
        cache_dir.write_text("not a folder")
    dm = build_datamodule(_folder_cfg(root, cache_dir=cache_dir, batch_size=2, image_size=72 if large else None))
    dm.prepare_data()
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == ((2, 3, 72, 72) if large else (2, 3, 12, 12))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings and all(f"cache folder {cache_dir} (" in w and CACHE_DIR_ENV in w for w in warnings)
    if not large:
        images, _ = dm.split_arrays("test")
        assert np.array_equal(images[0], _pillow_square(root / "test" / "ant" / "0000.png", 12))
    if failure == "disk_full":
        assert [p.suffix for p in cache_dir.iterdir()] == [".lock"]  # no temporaries, no half entry


def test_decode_images_fills_the_given_array(tmp_path: Path) -> None:
    """Train and test decode into views of one array: concatenating two decoded arrays held a cold decode's
    data 2.5 times (the 60,000-image CIFAR-10 copy: 432 MB of peak growth for 176 MB of images, now 260)."""
    root = _write_tree(tmp_path / "tree", n_train=2, n_test=None, size=(12, 12))
    paths = sorted(root.glob("train/*/*.png"))
    whole = np.zeros((len(paths) + 1, 3, 12, 12), np.uint8)
    images, sizes = decode_images(paths, (12, 12), what="t", out=whole[1:])
    assert np.shares_memory(images, whole) and sizes == {(12, 12)} and not whole[0].any()
    assert np.array_equal(whole[1], _pillow_square(paths[0], 12))


def _corrupt(root: Path, ext: str = "png") -> str:
    bad = root / "train" / "bee" / f"0003.{ext}"
    bad.write_bytes(b"this is not an image")
    return str(bad)


@pytest.mark.parametrize(
    ("breakage", "fragments"),
    [
        ("missing", ["does not exist", "--data-dir"]),
        ("no_train", ["has no train/ folder"]),
        ("empty_class", ["class folder", "train/cow holds no images"]),
        ("corrupt", ["cannot decode image", "train/bee/0003.png", "fix or remove"]),
        ("corrupt_jpg", ["cannot decode image", "train/bee/0003.jpg", "fix or remove"]),
        ("corrupt_large", ["cannot decode image", "train/bee/0003.png"]),
        ("mismatch", ["class folders differ", "only in train: cat", "only in test: dog"]),
    ],
)
def test_imagefolder_errors_are_one_line_before_training(
    tmp_path: Path, breakage: str, fragments: list[str]
) -> None:
    root = tmp_path / "tree"
    changes: dict[str, Any] = {}
    ext = "jpg" if breakage == "corrupt_jpg" else "png"
    if breakage != "missing":
        _write_tree(root, n_train=5, n_test=2, ext=ext)
    if breakage == "no_train":
        (root / "train").rename(root / "training")
    elif breakage == "empty_class":
        (root / "train" / "cow").mkdir()
    elif breakage.startswith("corrupt"):
        bad = _corrupt(root, ext)
        fragments = [f.replace(f"train/bee/0003.{ext}", bad) for f in fragments]
        if breakage == "corrupt_large":
            changes["image_size"] = 96
    elif breakage == "mismatch":
        (root / "test" / "cat").rename(root / "test" / "dog")
    dm = build_datamodule(_folder_cfg(root, **changes))
    with pytest.raises(DataError) as info:
        dm.prepare_data()
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message and message.startswith("imagefolder")
    for fragment in fragments:
        assert fragment in message


def _truncate(path: Path) -> str:
    """Cut ``path`` to half (a download or copy cut short): its header still parses, its pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _large_tree(root: Path) -> Path:
    return _write_tree(root, n_train=3, n_test=1, size=(80, 70), ext="jpg")


def test_imagefolder_large_truncated_images_fail_before_training(tmp_path: Path) -> None:
    """On the DataLoader path files cut short passed the header check and, outside the training images the
    statistics sample, setup: every trial trained, then failed when its loader got there (here: testing)."""
    root = _large_tree(tmp_path / "tree")
    bad = _truncate(root / "test" / "bee" / "0000.jpg")
    _truncate(root / "test" / "cat" / "0000.jpg")
    dm = build_datamodule(_folder_cfg(root, image_size=72, batch_size=2, val_size=1))
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith(f"imagefolder {root.resolve()}: cannot decode image {bad} (OSError: image file is "
                              f"truncated") and message.endswith(" (and 1 more); fix or remove the file")


def test_imagefolder_large_images_decode_check_is_recorded_per_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full decode costs about an epoch: done once per tree and recorded, not by every trial or process,
    whatever the image size; a changed file makes a new key, so the tree is checked again."""
    root = _large_tree(tmp_path / "tree")
    first = build_datamodule(_folder_cfg(root, image_size=72, batch_size=2, val_size=1))
    first.setup()
    assert json.loads(Path(first.describe()["decode_check_file"]).read_text()) == {"decoded": 12}
    checked: list[int] = []
    check = folder_loaders.check_images
    monkeypatch.setattr(folder_loaders, "check_images", lambda paths, **kw: (checked.append(len(paths)),
                                                                           check(paths, **kw))[1])
    for size in (72, 80):
        build_datamodule(_folder_cfg(root, image_size=size, batch_size=2, val_size=1)).setup()
    assert checked == []
    bad = _truncate(root / "test" / "ant" / "0000.jpg")
    with pytest.raises(DataError, match=f"cannot decode image {bad} "):
        build_datamodule(_folder_cfg(root, image_size=72, batch_size=2, val_size=1)).setup()
    assert checked == [12]


def test_imagefolder_decode_error_in_loader_worker_is_one_readable_line(tmp_path: Path) -> None:
    """A file damaged after the check fails in a DataLoader worker; torch re-raises the DataError with the
    worker's whole traceback as its message, which ``DataError`` flattened into one 2,000-character line."""
    root = _large_tree(tmp_path / "tree")
    dm = build_datamodule(_folder_cfg(root, image_size=72, batch_size=2, val_size=1, num_workers=1))
    dm.setup()
    bad = _truncate(root / "test" / "bee" / "0000.jpg")
    with pytest.raises(DataError) as info:
        list(dm.test_dataloader())
    message = str(info.value)
    assert message.startswith(f"imagefolder: cannot decode image {bad} (OSError: image file is truncated")
    assert "Traceback" not in message and len(message) < 300


def test_imagefolder_requires_data_dir() -> None:
    with pytest.raises(DataError, match="imagefolder: no data directory given; pass --data-dir"):
        build_datamodule(DataConfig(name="imagefolder"))


def _build_and_report(root: str, cache: str) -> bool | None:
    cfg = DataConfig(name="imagefolder", data_dir=root, cache_dir=cache, batch_size=8)
    dm = build_datamodule(cfg)
    dm.setup()
    return dm.describe()["cache_hit"]


def test_imagefolder_concurrent_workers_decode_once(tmp_path: Path) -> None:
    """Two processes starting on an uncached tree at once: one decodes, the other waits and reads the
    finished cache (never a half-written one); no temporary files are left behind."""
    root = _write_tree(tmp_path / "tree", n_train=60, size=(16, 16))
    cache = tmp_path / "shared-cache"
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
        hits = list(pool.map(_build_and_report, [str(root)] * 2, [str(cache)] * 2))
    assert sorted(hits) == [False, True]
    names = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert len(names) == 2 and names[0].endswith(".meta.npz") and names[1].endswith(".npy")  # no temporaries


# -- cifar ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "classes", "train", "test"), [("cifar10", 10, 150, 30), ("cifar100", 100, 150, 30)]
)
def test_cifar_local_copy_used_as_is(tmp_path: Path, name: str, classes: int, train: int, test: int) -> None:
    _write_fake_cifar(tmp_path / "data", name)
    dm = build_datamodule(DataConfig(name=name, data_dir=tmp_path / "data", batch_size=16, download=False))
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (classes, 3, 32)
    d = dm.describe()
    assert d["splits"]["test"] == test and d["splits"]["train"] + d["splits"]["val"] == train
    assert d["test_from"] == "the source's test set"
    assert d["source"].endswith(("cifar-10-batches-py", "cifar-100-python"))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and int(y.max()) < classes


@pytest.mark.slow
def test_cifar10_local_copy_lightning_fit(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path, "cifar10")
    dm = build_datamodule(DataConfig(name="cifar10", data_dir=tmp_path, batch_size=32, download=False))
    dm.prepare_data()
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)
    model = _se_model(dm)
    trainer = _trainer()
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 135 // 32 and "val_accuracy" in trainer.callback_metrics
    assert "test_accuracy" in trainer.test(model, datamodule=dm, verbose=False)[0]


def test_cifar_pixels_and_labels_follow_torchvision_layout(tmp_path: Path) -> None:
    folder = _write_fake_cifar(tmp_path, "cifar10")
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    dm = build_datamodule(DataConfig(name="cifar10", data_dir=folder, batch_size=16, download=False))
    dm.setup()  # data_dir may also be the batches folder itself
    images, labels = dm.split_arrays("test")
    assert np.array_equal(images, raw["data"].reshape(-1, 3, 32, 32)) and labels.tolist() == raw["labels"]


def test_cifar_image_size_resizes(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path, "cifar10")
    dm = build_datamodule(DataConfig(name="cifar10", data_dir=tmp_path, batch_size=16, image_size=16,
                                     download=False))
    dm.setup()
    assert dm.image_size == 16 and next(iter(dm.val_dataloader()))[0].shape[1:] == (3, 16, 16)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "digits"])
def test_device_only_dataset_refuses_large_image_size_before_reading(tmp_path: Path, name: str) -> None:
    """Datasets held whole on the device refuse ``image_size`` above 64 when the DataModule is built, before
    anything is read or resized: CIFAR-10 at 224 used to be resized whole (9 GB, minutes), then refused."""
    with pytest.raises(DataError) as info:
        build_datamodule(DataConfig(name=name, data_dir=tmp_path, image_size=224, download=False))
    assert str(info.value) == f"{name}: image size 224 is above the fast path's 64; pass image_size <= 64"


def test_cifar_missing_copy_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_datamodule(DataConfig(name="cifar10", download=False)).prepare_data()
    message = str(info.value)
    root = os.environ[DATA_DIR_ENV]
    assert message.startswith(f"cifar10: no copy under {root}")
    assert f"{root}/cifar-10-batches-py" in message and "download is disabled" in message
    assert "--data-dir DIR" in message and DATA_DIR_ENV in message and "\n" not in message


def _network_unreachable() -> bool:
    try:
        with socket.create_connection(("www.cs.toronto.edu", 443), timeout=3):
            return False
    except OSError:
        return True


@pytest.mark.skipif(not _network_unreachable(), reason="CIFAR host reachable: this would download 170 MB")
def test_cifar_failed_download_fails_fast_with_fix(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        build_datamodule(DataConfig(name="cifar100", data_dir=tmp_path / "none", download=True)).setup()
    message = str(info.value)
    assert time.perf_counter() - start < 30
    assert f"no copy under {tmp_path / 'none'}" in message and "the download failed (" in message
    assert "cifar-100-python" in message and "--data-dir" in message and DATA_DIR_ENV in message


def test_cifar_copy_with_numpy_scalar_labels_is_read(tmp_path: Path) -> None:
    """A hand-made or trimmed copy whose labels were written as ``list(np_array)`` (NumPy scalars, pickled
    through ``numpy.core.multiarray.scalar``) is read like the original, not refused as unsafe."""
    folder = _write_fake_cifar(tmp_path, "cifar10")
    for name in ("data_batch_1", "test_batch"):
        batch = read_cifar_batch(folder / name)
        batch["labels"] = list(np.asarray(batch["labels"], dtype=np.int64))
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    assert type(read_cifar_batch(folder / "test_batch")["labels"][0]) is np.int64
    dm = build_datamodule(DataConfig(name="cifar10", data_dir=tmp_path, download=False))
    dm.setup()
    assert dm.num_classes == 10


def test_cifar_refuses_pickles_that_are_not_arrays(tmp_path: Path) -> None:
    folder = _write_fake_cifar(tmp_path, "cifar10")
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": os.system, "labels": []}, f)  # a global a CIFAR batch never holds
    dm = build_datamodule(DataConfig(name="cifar10", data_dir=tmp_path, download=False))
    with pytest.raises(DataError, match=r"cannot read CIFAR file .*data_batch_2 \(UnpicklingError: refusing"):
        dm.setup()


# -- the shared CIFAR-10 JPEG copy --------------------------------------------------------------------------
needs_shared = pytest.mark.skipif(
    not SHARED_CIFAR.is_dir(), reason=f"shared CIFAR-10 JPEG copy not at {SHARED_CIFAR}"
)


@needs_shared
def test_shared_cifar10_jpeg_subset_decodes_like_pillow(tmp_path: Path) -> None:
    """A few hundred files of the shared copy, linked into a tree of our own (a full decode is the slow
    test below)."""
    root = tmp_path / "subset"
    classes = sorted(p.name for p in (SHARED_CIFAR / "train").iterdir())
    for split, n in (("train", 30), ("test", 10)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for f in sorted((SHARED_CIFAR / split / cls).iterdir())[:n]:
                (root / split / cls / f.name).symlink_to(f)
    dm = build_datamodule(_folder_cfg(root, batch_size=32))
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    assert dm.describe()["classes"] == classes
    assert dm.describe()["splits"] == {"train": 270, "val": 30, "test": 100}
    images, labels = dm.split_arrays("test")
    fourth = sorted((SHARED_CIFAR / "test" / classes[4]).iterdir())[3]  # class 4's test images start at 40
    with Image.open(fourth) as im:
        assert np.array_equal(images[43], np.asarray(im.convert("RGB")).transpose(2, 0, 1))
    assert np.array_equal(images[43], _Files([(fourth, 4)], PILToTensor())[0][0].numpy())  # the DataLoader path's
    assert labels[43] == 4
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32)


@needs_shared
@pytest.mark.slow
def test_shared_cifar10_jpeg_full_copy_fit_and_cache(tmp_path: Path) -> None:
    """The whole shared copy: parallel decode once, a short Lightning fit of an SE network, then a second
    DataModule (the next trial's process) reads the cache instead of decoding."""
    cfg = _folder_cfg(SHARED_CIFAR, batch_size=256)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    d = dm.describe()
    assert d["splits"] == {"train": 45000, "val": 5000, "test": 10000} and d["cache_hit"] is False
    assert d["normalization"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465], abs=0.01)
    pl.seed_everything(0, verbose=False)
    model = _se_model(dm)
    trainer = _trainer(limit_train_batches=4, limit_val_batches=2, limit_test_batches=2)
    trainer.fit(model, datamodule=dm)
    assert "val_accuracy" in trainer.callback_metrics
    trainer.test(model, datamodule=dm, verbose=False)

    start = time.perf_counter()
    second = build_datamodule(cfg)
    second.prepare_data()
    second.setup("fit")
    assert second.describe()["cache_hit"] is True
    assert time.perf_counter() - start < 30
    assert np.array_equal(second.split_indices["val"], dm.split_indices["val"])


@pytest.mark.parametrize(("image_size", "expected"), [(8, 16384), (32, 1024)])
def test_eval_loaders_use_large_batches_and_train_loader_the_recipe(image_size: int, expected: int) -> None:
    """Validation and test batches hold 1024 32x32 images' worth of pixels (whole small splits in one batch);
    training keeps the recipe's batch size, and the hand-written loops' ``loader`` does the same."""
    dm = build_datamodule(_digits(image_size=image_size, batch_size=64))
    dm.setup("fit")
    assert dm.eval_batch_size == expected == dm.describe()["eval_batch_size"]
    assert dm.train_dataloader().batch_size == 64
    val = dm.val_dataloader()
    assert val.batch_size == expected and len(val) == -(-144 // expected)
    assert sum(len(y) for _, y in val) == 144
    cpu = torch.device("cpu")
    assert dm.loader("test", device=cpu).batch_size == expected
    assert dm.loader("train", device=cpu, train=True).batch_size == 64
