"""The Trainer every trial uses: quiet, no checkpoints or loggers of its own, bf16 on GPUs that have it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ["cuda_has_native_bf16", "default_precision", "make_trainer"]


def cuda_has_native_bf16() -> bool:
    """Whether this process's CUDA device does bf16 arithmetic natively (compute capability 8.0, Ampere, and
    later). Not ``torch.cuda.is_bf16_supported()``: by default it also says yes where bf16 is only emulated
    (a T4), where cuDNN has no bf16 convolutions, and it probes by allocating on GPU 0. The capability is
    read from the device properties, without a tensor on any GPU."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision on CUDA devices with native bf16 (``cuda_has_native_bf16``), full fp32 elsewhere."""
    return "bf16-mixed" if accelerator in ("gpu", "cuda") and cuda_has_native_bf16() else "32-true"


def make_trainer(
    epochs: int,
    *,
    accelerator: str = "auto",
    devices: int | Sequence[int] | str = 1,
    callbacks: Sequence[pl.Callback] = (),
    strategy: str | Any = "auto",
    precision: str | None = None,
    deterministic: bool | str = False,
    **overrides: Any,
) -> pl.Trainer:
    """A ``pl.Trainer`` for one trial. The data modules feed device-resident batches themselves, so
    Lightning must not wrap them in distributed samplers (``use_distributed_sampler=False``)."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    options: dict[str, Any] = {
        "max_epochs": epochs,
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "precision": precision or default_precision(accelerator),
        "callbacks": list(callbacks),
        "deterministic": deterministic,
        # cuDNN autotuning: every trial trains fixed shapes for hundreds of steps, so the one-off search pays
        # (channels_last bf16 convolutions have several algorithms and the default pick is often not the
        # fastest). Off when determinism is asked for, since the chosen algorithm may vary run to run.
        "benchmark": accelerator in ("gpu", "cuda") and not deterministic,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,
    }
    options.update(overrides)
    return pl.Trainer(**options)
