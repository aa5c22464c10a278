"""The hand-written PyTorch loop the platform's overhead is measured against.

It trains the same network (``build_trainable``; a whitening stem fitted on the same images) on the same
data pipeline (the DataModule's device-resident loaders), with the same optimiser, schedule, loss, precision
and channels_last choices as ``SEClassifier``, validating after every epoch and testing once at the end, as
a trial does; only Lightning, Optuna, the cost count and the storage are left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_modules import ArchConfig
from lightning_modules.recipe import OPTIMIZERS, SCHEDULES, TrainingRecipe, build_trainable, eval_logits
from lightning_modules.training import cuda_has_native_bf16
from lightning_modules.whitening import MAX_IMAGES, fit_whitening

__all__ = ["hand_written_fit"]


def _accuracy(net: torch.nn.Module, loader: Any, channels_last: bool, autocast: Any, tta: str) -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad(), autocast():
        for x, y in loader:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += (eval_logits(net, x, tta).argmax(1) == y).sum()
            total += len(y)
    net.train()
    return float(correct) / total


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs on native kernels on ``device``: CUDA devices that support it, and CPUs whose
    oneDNN has bf16 kernels (AVX-512 BF16 or AMX). Elsewhere PyTorch emulates bf16: on an AVX2-only VM one
    convolution's forward and backward took 4.1 s in bf16 against 0.25 s in fp32 (2026-11-30), which turns
    trial_accuracy's hour into most of a day."""
    if device.type == "cuda":
        return cuda_has_native_bf16()
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private; absent: assume emulated
    return bool(supported and supported())


def hand_written_fit(arch: ArchConfig, recipe: TrainingRecipe, dm: Any, device: torch.device, seed: int, *,
                     bf16: bool | None = None, also_tta: Sequence[str] = (),
                     on_epoch: Callable[[int, float], None] | None = None) -> dict:
    """Train ``arch`` for ``recipe.epochs`` epochs; returns wall seconds, val/test accuracy and where the
    time went (build, each epoch's training, all evaluation).

    ``bf16``: autocast to bfloat16 (default: on CUDA devices that have it, as the platform's Trainer does;
    True also on the CPU, to see bf16 training's accuracy where there is no GPU). ``also_tta``: evaluate the
    same weights under these test-time augmentations too (``val_curve_<tta>``, ``test_accuracy_<tta>`` for
    each; their time counts as evaluation). ``on_epoch(epoch, val_accuracy)`` is called after each epoch's
    validation (progress of long runs)."""
    pl.seed_everything(seed, workers=True, verbose=False)
    cuda = device.type == "cuda"
    # As the platform's Trainer does on CUDA (``make_trainer``): cuDNN autotuning for the fixed shapes.
    torch.backends.cudnn.benchmark = cuda

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    start = sync()
    net = build_trainable(arch, recipe).to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    if bf16 is None:
        bf16 = cuda and cuda_has_native_bf16()  # as the platform's Trainer decides (default_precision)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    train = dm.loader("train", device=device, train=True, seed=seed)
    if train.batch_size != recipe.batch_size:  # the schedule, the lr and images/s all assume the recipe's
        raise ValueError(f"recipe batch_size {recipe.batch_size}, but the data module batches "
                         f"{train.batch_size}: build it with the recipe's batch size")
    val, test = dm.loader("val", device=device), dm.loader("test", device=device)
    # As SEClassifier.on_fit_start: the same images spread over the split; nothing without a whitening stem.
    fit_whitening(net, dm.spread_sample("train", MAX_IMAGES, device=device))
    optimizer = OPTIMIZERS.get(recipe.optimizer)(net, recipe)
    scheduler = SCHEDULES.get(recipe.schedule)(optimizer, recipe, recipe.epochs * len(train))
    build_seconds = sync() - start
    curve, epoch_seconds, eval_seconds = [], [], 0.0
    also_curves: dict[str, list[float]] = {tta: [] for tta in also_tta}
    for epoch in range(recipe.epochs):
        # One sync per epoch boundary (for the breakdown) costs nothing next to an epoch's hundreds of steps.
        epoch_start = sync()
        train.set_epoch(epoch)
        for x, y in train:
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                loss = F.cross_entropy(net(x), y, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        eval_start = sync()
        epoch_seconds.append(eval_start - epoch_start)
        curve.append(_accuracy(net, val, cuda, autocast, recipe.tta))
        for tta, also_curve in also_curves.items():
            also_curve.append(_accuracy(net, val, cuda, autocast, tta))
        eval_seconds += time.perf_counter() - eval_start  # _accuracy ends in a host read: synced
        if on_epoch is not None:
            on_epoch(epoch, curve[-1])
    test_start = time.perf_counter()
    test_acc = _accuracy(net, test, cuda, autocast, recipe.tta)
    also = {}
    for tta, also_curve in also_curves.items():
        also |= {f"val_curve_{tta}": also_curve, f"test_accuracy_{tta}": _accuracy(net, test, cuda, autocast, tta)}
    end = sync()
    return {"seconds": end - start, "val_accuracy": curve[-1], "test_accuracy": test_acc, "val_curve": curve,
            **also, "build_seconds": build_seconds, "epoch_seconds": epoch_seconds,
            "eval_seconds": eval_seconds + end - test_start, "images_per_second":
            recipe.epochs * len(train) * recipe.batch_size / sum(epoch_seconds)}
