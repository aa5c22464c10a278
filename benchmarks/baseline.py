"""The hand-written PyTorch loop the platform's overhead is measured against.

It trains the same network (``build_network``) on the same data pipeline (the DataModule's device-resident
loaders), with the same optimiser, schedule, loss, precision and channels_last choices as
``SEClassifier``, validating after every epoch and testing once at the end, as a trial does; only
Lightning, Optuna, the cost count and the storage are left out.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_modules import ArchConfig, build_network
from lightning_modules.classifier import OPTIMIZERS, SCHEDULES, TrainingRecipe

__all__ = ["hand_written_fit"]


def _accuracy(net: torch.nn.Module, loader: Any, channels_last: bool, autocast: Any) -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad(), autocast():
        for x, y in loader:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += (net(x).argmax(1) == y).sum()
            total += len(y)
    net.train()
    return float(correct) / total


def hand_written_fit(arch: ArchConfig, recipe: TrainingRecipe, dm: Any, device: torch.device, seed: int) -> dict:
    """Train ``arch`` for ``recipe.epochs`` epochs; returns wall seconds and val/test accuracy."""
    pl.seed_everything(seed, workers=True, verbose=False)
    start = time.perf_counter()
    cuda = device.type == "cuda"
    net = build_network(arch).to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    bf16 = cuda and torch.cuda.is_bf16_supported()

    def autocast() -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    train = dm.loader("train", device=device, train=True, seed=seed)
    val, test = dm.loader("val", device=device), dm.loader("test", device=device)
    optimizer = OPTIMIZERS.get(recipe.optimizer)(net, recipe)
    scheduler = SCHEDULES.get(recipe.schedule)(optimizer, recipe, recipe.epochs * len(train))
    curve = []
    for epoch in range(recipe.epochs):
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
        curve.append(_accuracy(net, val, cuda, autocast))
    test_acc = _accuracy(net, test, cuda, autocast)
    if cuda:
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "val_accuracy": curve[-1], "test_accuracy": test_acc}
