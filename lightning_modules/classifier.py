"""The classification LightningModule that every trial trains (its recipe: ``lightning_modules.recipe``).

One constant, ``VAL_ACCURACY``, names the monitored metric everywhere (DESIGN.md convention 5): the pruning
callback, the objective and the exports all read it. ``TEST_ACCURACY`` is logged only by ``trainer.test``,
for reporting; nothing selects on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics

from lightning_modules.config import ArchConfig, ConfigError
from lightning_modules.recipe import OPTIMIZERS, SCHEDULES, TTA_MODES, TrainingRecipe, build_trainable, eval_logits
from lightning_modules.whitening import MAX_IMAGES, fit_whitening, needs_whitening

# The recipe's names stay importable from here, where they lived before lightning_modules.recipe.
__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TEST_ACCURACY",
    "TRAIN_LOSS",
    "TTA_MODES",
    "VAL_ACCURACY",
    "DivergenceError",
    "SEClassifier",
    "TrainingRecipe",
    "build_trainable",
    "eval_logits",
]

VAL_ACCURACY = "val_accuracy"
TEST_ACCURACY = "test_accuracy"
TRAIN_LOSS = "train_loss"


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite; the trial cannot produce a meaningful result."""


class SEClassifier(pl.LightningModule):
    """Trains ``build_trainable(arch, recipe)`` with cross-entropy; logs ``val_accuracy`` per epoch and
    ``test_accuracy`` on test. On CUDA the network runs channels_last (cuDNN's fast NHWC kernels under
    bf16); precision itself is the Trainer's (see ``make_trainer``)."""

    def __init__(self, arch: ArchConfig, recipe: TrainingRecipe) -> None:
        super().__init__()
        self.arch, self.recipe = arch, recipe
        self.save_hyperparameters({"arch": arch.to_dict(), "recipe": dataclasses.asdict(recipe)})
        self.net = build_trainable(arch, recipe)
        # validate_args=False: the argument checks look at tensor values on the host, a device sync on every
        # evaluation batch; the labels come from our own validated data modules.
        accuracy = {"num_classes": arch.num_classes, "average": "micro", "validate_args": False}
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(**accuracy)
        self.test_accuracy = torchmetrics.classification.MulticlassAccuracy(**accuracy)
        # nan_strategy="disable": a NaN loss must reach the divergence check, not be dropped from the mean.
        self.train_loss = torchmetrics.MeanMetric(nan_strategy="disable")
        self._channels_last = False

    def on_fit_start(self) -> None:
        self.on_test_start()
        if needs_whitening(self.net):
            # After a checkpoint restore (resumed trials) the filters are already fitted and this is skipped.
            sample = getattr(self.trainer.datamodule, "spread_sample", None)
            if sample is None:
                raise ConfigError("stem: the whitening stem is fitted on the training images; fit with a "
                                  "datamodule of lightning_modules.data (datamodule=...)")
            fit_whitening(self.net, sample("train", MAX_IMAGES, device=self.device))

    def on_test_start(self) -> None:
        self._channels_last = self.device.type == "cuda"
        if self._channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.recipe.label_smoothing)
        # Accumulated on the device and logged once per epoch: ``self.log`` on every step costs Lightning's
        # logging machinery per step, measurable on short trials.
        # No per-batch weight: training batches are all the same size (drop-last), and an int weight would be
        # copied to the device, blocking, on every step (MeanMetric with nan_strategy="disable" ignores it
        # anyway).
        self.train_loss.update(loss.detach())
        return loss

    def on_train_epoch_end(self) -> None:
        loss = self.train_loss.compute()  # synced across DDP ranks
        self.train_loss.reset()
        self.log(TRAIN_LOSS, loss, on_step=False, on_epoch=True)
        if not torch.isfinite(loss):
            raise DivergenceError(f"training loss is {loss.item()} in epoch {self.current_epoch}")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy.update(eval_logits(self, x, self.recipe.tta), y)
        self.log(VAL_ACCURACY, self.val_accuracy, on_step=False, on_epoch=True, batch_size=x.shape[0])

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy.update(eval_logits(self, x, self.recipe.tta), y)
        self.log(TEST_ACCURACY, self.test_accuracy, on_step=False, on_epoch=True, batch_size=x.shape[0])

    def configure_optimizers(self) -> Any:
        optimizer = OPTIMIZERS.get(self.recipe.optimizer)(self.net, self.recipe)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = SCHEDULES.get(self.recipe.schedule)(optimizer, self.recipe, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
