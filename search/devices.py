"""Worker slots: which processes to start, and on which devices.

``--gpus all|0,1,..`` with ``--trials-per-gpu K`` starts K workers per GPU, each pinned with
CUDA_VISIBLE_DEVICES (several small trials share one GPU: one trial of a small net cannot fill an H200).
Without GPUs, ``--workers N`` starts N CPU workers sharing the cores between them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from search.errors import UsageError

__all__ = ["Slot", "plan_slots"]


@dataclass(frozen=True)
class Slot:
    """One worker process: its visible GPUs ("" hides them on the CPU), accelerator, device count and threads."""

    cuda_visible_devices: str | None
    accelerator: str
    devices: int
    threads: int | None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        return env


def _parse_gpus(gpus: str, available: int) -> list[int]:
    if gpus == "all":
        if available == 0:
            raise UsageError("--gpus all: no CUDA GPU is visible on this machine; leave --gpus out to run on the CPU")
        return list(range(available))
    try:
        indices = [int(g) for g in gpus.split(",") if g.strip() != ""]
    except ValueError:
        raise UsageError(f"--gpus: expected 'all' or comma-separated GPU indices like 0,1, got {gpus!r}") from None
    if not indices:
        raise UsageError("--gpus: give 'all' or at least one GPU index")
    bad = [g for g in indices if not 0 <= g < available]
    if bad:
        have = f"indices 0..{available - 1}" if available else "no CUDA GPU"
        raise UsageError(f"--gpus: GPU {bad[0]} does not exist; this machine has {have}")
    if len(set(indices)) != len(indices):
        raise UsageError(f"--gpus: GPU indices repeat in {gpus!r}")
    return indices


def plan_slots(gpus: str | None, trials_per_gpu: int, workers: int | None) -> list[Slot]:
    """The worker processes to start. GPUs are used when asked for, or by default when CUDA is present."""
    if trials_per_gpu < 1:
        raise UsageError(f"--trials-per-gpu: must be >= 1, got {trials_per_gpu}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers: must be >= 1, got {workers}")
    available = torch.cuda.device_count()
    if gpus is None and available and workers is None:
        gpus = "all"
    if gpus is not None:
        if workers is not None:
            raise UsageError("--workers is for CPU-only runs; with --gpus use --trials-per-gpu")
        return [Slot(str(g), "gpu", 1, None) for g in _parse_gpus(gpus, available) for _ in range(trials_per_gpu)]
    n = workers or 1
    cores = os.cpu_count() or 1
    return [Slot("", "cpu", 1, max(1, cores // n)) for _ in range(n)]
