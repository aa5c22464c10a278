"""Worker slots: which processes to start, and on which devices.

``--gpus all|0,1,..`` with ``--trials-per-gpu K`` starts K workers per GPU, each pinned with
CUDA_VISIBLE_DEVICES (several small trials share one GPU: one trial of a small net cannot fill an H200).
``--gpus-per-trial N`` trains each trial with DDP over N GPUs: the GPUs are cut into groups of N (N must
divide their number), and each group gets K workers, each seeing its group's N GPUs. Without GPUs,
``--workers N`` starts N CPU workers sharing the cores between them, and ``--procs-per-trial P`` trains
each of their trials with DDP over P CPU processes (gloo): the same code path as multi-GPU trials, so it is
tested on machines without GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lightning_modules.data.decode import available_cpus
from search.errors import UsageError, check_at_least

__all__ = ["Slot", "group_gpus", "parse_gpus", "pin_threads", "plan_slots", "visible_gpu_ids"]


@dataclass(frozen=True)
class Slot:
    """One worker process: its visible GPUs ("" hides them on the CPU), accelerator, devices (DDP ranks) per
    trial and torch threads per rank."""

    cuda_visible_devices: str | None
    accelerator: str
    devices: int
    threads: int | None

    def env(self) -> dict[str, str]:
        """The worker's environment; its thread count travels in its spec (``pin_threads`` applies it)."""
        env = dict(os.environ)
        if self.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        return env


def pin_threads(threads: int) -> None:
    """Use ``threads`` torch threads in this process and in every process it starts: the one place a
    worker's (or a DDP rank's) thread count is set. The environment variable matters as much as the call:
    Lightning's DDP set-up resets torch to all cores over the local ranks when ``OMP_NUM_THREADS`` is unset,
    and spawned ranks read it when they import torch."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def visible_gpu_ids(available: int) -> list[str]:
    """What a worker's ``CUDA_VISIBLE_DEVICES`` must say to show it the GPU this process calls ``i``: entry
    ``i`` of this process's own ``CUDA_VISIBLE_DEVICES`` when it has one (SLURM, containers and MIG set it to
    physical indices or UUIDs: ``4,5`` makes GPU 0 here physical GPU 4), else ``i``. A child given plain
    ``0,1`` under ``4,5`` would have trained on other jobs' GPUs."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is None:
        return [str(i) for i in range(available)]
    # CUDA reads the list up to its first invalid entry; the devices it counted are that prefix.
    return [entry.strip() for entry in inherited.split(",")][:available]


def parse_gpus(gpus: str, available: int) -> list[int]:
    """The GPU indices ``--gpus`` names, checked against the ``available`` count."""
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


def group_gpus(indices: list[int], per_trial: int) -> list[list[int]]:
    """``indices`` cut into consecutive groups of ``per_trial`` GPUs, one DDP trial each."""
    if len(indices) % per_trial:
        raise UsageError(f"--gpus-per-trial: {per_trial} does not divide the {len(indices)} GPU(s) given "
                         f"({','.join(map(str, indices))})")
    return [indices[i:i + per_trial] for i in range(0, len(indices), per_trial)]


def _check_at_least_one(**values: int | None) -> None:
    for name, value in values.items():
        check_at_least(name, value, 1)


def plan_slots(gpus: str | None, trials_per_gpu: int, workers: int | None, *, gpus_per_trial: int = 1,
               procs_per_trial: int = 1) -> list[Slot]:
    """The worker processes to start. GPUs are used when asked for, or by default when CUDA is present."""
    _check_at_least_one(trials_per_gpu=trials_per_gpu, workers=workers, gpus_per_trial=gpus_per_trial,
                        procs_per_trial=procs_per_trial)
    available = torch.cuda.device_count()
    if gpus is None and available and workers is None and procs_per_trial == 1:
        gpus = "all"
    if gpus is not None:
        if workers is not None:
            raise UsageError("--workers is for CPU-only runs; with --gpus use --trials-per-gpu")
        if procs_per_trial != 1:
            raise UsageError("--procs-per-trial is for CPU-only runs; with GPUs use --gpus-per-trial")
        groups = group_gpus(parse_gpus(gpus, available), gpus_per_trial)
        # GPU workers share the host's cores too: with every process at torch's default of all cores, their
        # spinning OpenMP threads fight over the cores the Python launch threads need. Each worker runs one
        # process per GPU of its group (DDP ranks), so the cores are split over all of them.
        processes = len(groups) * trials_per_gpu * gpus_per_trial
        threads = max(1, available_cpus() // processes)
        ids = visible_gpu_ids(available)
        return [Slot(",".join(ids[i] for i in g), "gpu", len(g), threads)
                for g in groups for _ in range(trials_per_gpu)]
    if gpus_per_trial != 1:
        raise UsageError("--gpus-per-trial: no CUDA GPU is visible on this machine; for DDP over CPU processes "
                         "use --procs-per-trial")
    n = workers or 1
    cores = available_cpus()  # the CPUs this job may use (a cpuset under SLURM or docker), not the host's
    return [Slot("", "cpu", procs_per_trial, max(1, cores // (n * procs_per_trial))) for _ in range(n)]
