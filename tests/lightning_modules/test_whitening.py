"""The patch-whitening stem: identity before it sees data, whitened patches after, fitted once per trial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lightning_modules import build_arch, build_network
from lightning_modules.classifier import SEClassifier, TrainingRecipe
from lightning_modules.data import CACHE_DIR_ENV, DATA_DIR_ENV, DataConfig, build_datamodule
from lightning_modules.data.base import spread
from lightning_modules.whitening import EPS, PatchWhitening, fit_whitening, needs_whitening
from search.cost import count_cost


def _smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are strongly correlated (upsampled noise, mixed
    channels), like natural images: their raw 3x3 patches are far from white."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.6, 0.5], [0.0, 0.0, 0.4]])
    return torch.einsum("dc,nchw->ndhw", mix, coarse)


def _patch_covariance(x: torch.Tensor) -> torch.Tensor:
    patches = x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])
    return patches.T @ patches / len(patches)


def test_unfitted_whitening_is_the_identity_patch_extraction() -> None:
    """Before it sees data the layer copies each 3x3 patch as it is: with the 1x1 conv after it, a plain
    3x3 convolution, so a network built without data is a well-defined network."""
    layer = PatchWhitening(3)
    x = torch.randn(4, 3, 10, 10)
    assert torch.equal(layer(x).flatten(2), F.unfold(x, 3, padding=1))
    assert needs_whitening(nn.Sequential(layer)) and not layer.weight.requires_grad


def test_fitted_whitening_decorrelates_the_patches() -> None:
    images = _smooth_images(64)
    raw = _patch_covariance(F.unfold(images, 3).unsqueeze(-1))  # (27, 27) of the raw patches
    assert (raw - torch.diag(raw.diag())).abs().max() > 0.3  # far from white to begin with
    layer = PatchWhitening(3)
    layer.fit([images[:32], images[32:]])
    cov = _patch_covariance(layer(images)[:, :, 1:-1, 1:-1])  # interior: no zero padding in the patches
    eigenvalues = torch.linalg.eigvalsh(raw.double()).flip(0)
    # Whitened up to Page's regulariser: variance eig / (eig + eps) along each eigenvector, no covariance.
    assert torch.allclose(cov.diag().double(), eigenvalues / (eigenvalues + EPS), atol=2e-3)
    assert (cov - torch.diag(cov.diag())).abs().max() < 2e-3
    assert bool(layer.fitted) and not needs_whitening(nn.Sequential(layer))


def test_fit_whitening_uses_the_first_images_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_modules.whitening.MAX_IMAGES", 48)
    images = _smooth_images(64)
    other = _smooth_images(64, seed=1)
    nets = [nn.Sequential(PatchWhitening(3)) for _ in range(3)]
    fit_whitening(nets[0], [(images[:32], None), (images[32:], None), (other, None)])  # loader-style pairs
    nets[1][0].fit([images[:48]])
    nets[2][0].fit([images])
    assert torch.allclose(nets[0][0].weight, nets[1][0].weight, atol=1e-5)
    assert not torch.allclose(nets[0][0].weight, nets[2][0].weight, atol=1e-3)


def test_fit_whitening_reads_no_data_for_a_network_without_or_with_a_fitted_stem() -> None:
    def never() -> object:
        raise AssertionError("the training images were read")
        yield

    fit_whitening(build_network(build_arch("fastnet_page", width_multiplier=0.125)), never())
    net = build_network(build_arch("fastnet_whiten", width_multiplier=0.125))
    fit_whitening(net, [_smooth_images(8)])
    fitted = net.stem[0].weight.clone()
    fit_whitening(net, never())
    assert torch.equal(net.stem[0].weight, fitted)


def test_whitening_filters_and_flag_travel_in_the_state_dict() -> None:
    arch = build_arch("fastnet_whiten", width_multiplier=0.125)
    net = build_network(arch)
    fit_whitening(net, [_smooth_images(16)])
    restored = build_network(arch)
    assert needs_whitening(restored)
    restored.load_state_dict(net.state_dict())
    assert not needs_whitening(restored)
    assert torch.equal(restored.stem[0].weight, net.stem[0].weight)


def test_fastnet_whiten_is_fastnet_page_with_the_whitening_stem() -> None:
    """Only the stem differs: a frozen 3x3 whitening conv to 27 channels and a 1x1 conv to 64 instead of a
    3x3 conv to 64; cost counts the whitening conv's 27 x 3 x 9 MACs per pixel on top."""
    whiten, page = build_network(build_arch("fastnet_whiten")), build_network(build_arch("fastnet_page"))
    rest = [(n, p.shape) for n, p in page.named_parameters() if not n.startswith("stem.")]
    assert [(n, p.shape) for n, p in whiten.named_parameters() if not n.startswith("stem.")] == rest
    assert isinstance(whiten.stem[0], PatchWhitening) and whiten.stem[1].kernel_size == (1, 1)
    assert whiten.stem[1].in_channels == 27 and whiten.stem[1].out_channels == page.stem[0].out_channels
    extra = count_cost(build_arch("fastnet_whiten")).macs - count_cost(build_arch("fastnet_page")).macs
    assert extra == 32 * 32 * 27 * 3 * 9


def test_kaiming_init_leaves_the_whitening_stem_alone() -> None:
    net = build_network(build_arch("fastnet_whiten").replace(conv_init="kaiming"))
    assert torch.equal(net.stem[0].weight, PatchWhitening(3).weight)


def _digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    dm = build_datamodule(DataConfig(name="digits", batch_size=64, num_workers=0))
    dm.setup()
    return dm


def test_training_fits_the_stem_once_on_the_training_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Lightning fit fits the stem on the training split (the same filters as fitting it directly on
    that split's unaugmented images); resuming from the checkpoint restores them instead of fitting again."""
    dm = _digits(tmp_path, monkeypatch)
    arch = build_arch("fastnet_whiten", placement="standard", num_classes=dm.num_classes,
                      in_channels=dm.in_channels, image_size=dm.image_size, width_multiplier=0.125)
    recipe = TrainingRecipe(epochs=2, batch_size=64, lr=0.05)
    fits = []
    real_fit = PatchWhitening.fit
    monkeypatch.setattr(PatchWhitening, "fit", lambda self, images: (fits.append(1), real_fit(self, images)))

    class StopAfterOneEpoch(pl.Callback):  # an interrupted trial, to be resumed from its checkpoint
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.should_stop = True

    def trainer(*callbacks: pl.Callback) -> pl.Trainer:
        return pl.Trainer(max_epochs=recipe.epochs, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                          callbacks=list(callbacks))

    pl.seed_everything(0, verbose=False)
    model = SEClassifier(arch, recipe)
    first = trainer(StopAfterOneEpoch())
    first.fit(model, datamodule=dm)
    assert first.current_epoch == 1
    assert fits == [1] and not needs_whitening(model.net)
    expected = build_network(arch)
    real_fit(expected.stem[0], (x for x, _ in dm.loader("train", device=torch.device("cpu"))))
    # Still the fitted filters after an epoch of SGD: they did not train.
    assert torch.allclose(model.net.stem[0].weight, expected.stem[0].weight, atol=1e-6)

    checkpoint = first.checkpoint_callback.best_model_path
    resumed = SEClassifier(arch, recipe)
    second = trainer()
    second.fit(resumed, datamodule=dm, ckpt_path=checkpoint)
    assert second.current_epoch == 2
    assert fits == [1]  # restored from the checkpoint, not fitted again
    assert torch.equal(resumed.net.stem[0].weight, model.net.stem[0].weight)


def test_spread_picks_evenly_spaced_items_first_and_last_included() -> None:
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert spread(np.arange(100, 110), 2).tolist() == [100, 109]
    assert spread([1, 2], 5) == [1, 2]  # fewer than asked: all of them


def _class_sorted_tree(root: Path, side: int) -> Path:
    """3 classes of 20 training images, each class a flat colour, in file order class by class."""
    for split, n in (("train", 20), ("test", 3)):
        for label, name in enumerate(("ant", "bee", "cat")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (side, side), (80 * label, 40 + i, 200 - 60 * label)).save(folder / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("side", [12, 72])  # the tensor fast path, and the DataLoader path (above 64 px)
def test_training_fits_the_stem_on_images_spread_over_a_class_sorted_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    """The stem is fitted on ``MAX_IMAGES`` training images spread over the split, not its first ones: a tree's
    split is in file order, class by class, and the first 10,000 of the CIFAR-10 JPEG tree are 3 of its 10
    classes. On the DataLoader path (large images) fitting failed outright ("call setup() first")."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    tree = _class_sorted_tree(tmp_path / "tree", side)
    dm = build_datamodule(DataConfig(name="imagefolder", data_dir=tree, batch_size=8, num_workers=0,
                                     val_size=6, image_size=side if side > 64 else None))
    dm.setup()
    labels = [int(y) for _, ys in dm.spread_sample("train", 6, device=torch.device("cpu")) for y in ys]
    assert len(labels) == 6 and set(labels) == {0, 1, 2}
    monkeypatch.setattr("lightning_modules.classifier.MAX_IMAGES", 6)
    seen = []
    real_fit = PatchWhitening.fit
    monkeypatch.setattr(PatchWhitening, "fit",
                        lambda self, images: (seen.extend(images), real_fit(self, seen)))
    arch = build_arch("fastnet_whiten", num_classes=3, in_channels=3, image_size=dm.image_size,
                      width_multiplier=0.125)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(SEClassifier(arch, TrainingRecipe(epochs=1, batch_size=8, lr=0.05)), datamodule=dm)
    expected = torch.cat([x for x, _ in dm.spread_sample("train", 6, device=torch.device("cpu"))])
    assert torch.equal(torch.cat(seen), expected)
