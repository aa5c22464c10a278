"""Worker slots: GPUs per worker, GPU groups for DDP trials, CPU workers and CPU DDP processes.

GPU layouts are checked through the pure functions that plan them (``parse_gpus``, ``group_gpus``), since
this machine has no GPU; ``plan_slots`` itself is checked on the CPU it has.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.training import default_precision
from search.devices import Slot, group_gpus, parse_gpus, plan_slots
from search.errors import UsageError
from tests.conftest import REPO


def test_group_gpus_cuts_consecutive_groups() -> None:
    assert group_gpus([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert group_gpus([4, 5, 6, 7], 4) == [[4, 5, 6, 7]]
    assert group_gpus([3], 1) == [[3]]


def test_group_gpus_refuses_group_size_not_dividing() -> None:
    with pytest.raises(UsageError, match=r"--gpus-per-trial: 3 does not divide the 4 GPU\(s\) given \(0,1,2,3\)"):
        group_gpus([0, 1, 2, 3], 3)


def test_parse_gpus_checks_indices_against_machine() -> None:
    assert parse_gpus("all", 2) == [0, 1]
    assert parse_gpus("1,0", 2) == [1, 0]
    with pytest.raises(UsageError, match=r"GPU 2 does not exist; this machine has indices 0\.\.1"):
        parse_gpus("0,2", 2)
    with pytest.raises(UsageError, match="repeat"):
        parse_gpus("0,0", 2)


def test_slot_env_pins_gpu_group() -> None:
    assert Slot("2,3", "gpu", 2, None).env()["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert Slot("", "cpu", 2, 3).env()["CUDA_VISIBLE_DEVICES"] == ""


PIN_THREADS = """
import multiprocessing as mp, torch
from search.devices import pin_threads

def child(queue):
    queue.put(torch.get_num_threads())

if __name__ == "__main__":
    pin_threads(1)
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=child, args=(queue,))
    proc.start()
    print(torch.get_num_threads(), queue.get(timeout=120))
    proc.join()
"""


def test_pin_threads_holds_in_the_process_and_the_ranks_it_spawns(tmp_path: Path) -> None:
    """A worker's thread count reaches the DDP ranks it spawns (they read OMP_NUM_THREADS at import)."""
    script = tmp_path / "pin.py"
    script.write_text(PIN_THREADS)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "1"]


def test_plan_slots_cpu_procs_per_trial_share_cores() -> None:
    slots = plan_slots(None, 1, 2, procs_per_trial=2)
    assert len(slots) == 2
    assert all(s.accelerator == "cpu" and s.devices == 2 and s.cuda_visible_devices == "" for s in slots)
    assert all(s.threads and s.threads >= 1 for s in slots)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus_per_trial": 2}, "--gpus-per-trial: no CUDA GPU is visible"),
        ({"gpus_per_trial": 0}, "--gpus-per-trial: must be >= 1, got 0"),
        ({"procs_per_trial": 0}, "--procs-per-trial: must be >= 1, got 0"),
    ],
)
def test_plan_slots_refuses_bad_ddp_flags(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan_slots(None, 1, None, **kwargs)


def test_plan_slots_gpu_workers_split_the_host_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """K workers per GPU each get their share of the cores, not all of them (their OpenMP threads would
    otherwise spin against each other's launch threads). The GPU count is the only thing faked here: the
    planning is pure, and this machine has no GPU."""
    monkeypatch.setattr("search.devices.torch.cuda.device_count", lambda: 2)
    monkeypatch.setattr("search.devices.available_cpus", lambda: 16)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    slots = plan_slots("all", 4, None)
    assert [s.cuda_visible_devices for s in slots] == ["0"] * 4 + ["1"] * 4
    assert {s.threads for s in slots} == {2}
    assert plan_slots("1", 1, None) == [Slot("1", "gpu", 1, 16)]
    # two workers, each a DDP trial over both GPUs: four processes share the 16 cores
    assert plan_slots("all", 2, None, gpus_per_trial=2) == [Slot("0,1", "gpu", 2, 4)] * 2


@pytest.mark.parametrize(("inherited", "expected"), [
    ("4,5", ["4", "5"]),  # SLURM or a container gave this job physical GPUs 4 and 5
    ("GPU-8c2e1f0a,GPU-77b1d3c9", ["GPU-8c2e1f0a", "GPU-77b1d3c9"]),  # by UUID
    ("6,7,9", ["6", "7"]),  # CUDA counted two (the third is gone): the first two are this job's 0 and 1
])
def test_plan_slots_gpu_workers_keep_the_gpus_this_job_was_given(monkeypatch: pytest.MonkeyPatch, inherited: str,
                                                                  expected: list[str]) -> None:
    """Under an inherited CUDA_VISIBLE_DEVICES, GPU i of this process is entry i of that list: a worker
    must be shown that entry, not ``i``, or it trains on another job's GPU."""
    monkeypatch.setattr("search.devices.torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", inherited)
    assert [s.cuda_visible_devices for s in plan_slots("all", 1, None)] == expected
    assert [s.cuda_visible_devices for s in plan_slots("1", 1, None)] == expected[1:]
    assert [s.cuda_visible_devices for s in plan_slots("all", 1, None, gpus_per_trial=2)] == [",".join(expected)]
    assert plan_slots("0", 1, None)[0].env()["CUDA_VISIBLE_DEVICES"] == expected[0]


def test_plan_slots_share_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    """Threads per worker come from the CPUs the job may run on (its affinity: a cpuset under SLURM or
    docker), not the host's count."""
    probe = ("import os; os.sched_setaffinity(0, {0}); from search.devices import plan_slots; "
             "print(os.cpu_count() > 1, [s.threads for s in plan_slots(None, 1, 1)])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split(" ", 1) == ["True", "[1]\n"]


@pytest.mark.parametrize(("capability", "precision"), [((7, 5), "32-true"), ((8, 0), "bf16-mixed"),
                                                       ((9, 0), "bf16-mixed")])
def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                                 precision: str) -> None:
    """A T4 (7.5) emulates bf16, and cuDNN has no bf16 convolutions there: fp32. Ampere (8.0) and later:
    bf16. Decided from the device's capability, never by ``is_bf16_supported``'s probe (it says yes to
    emulation, and allocates on GPU 0 in every DDP rank). CUDA is faked: this machine has no GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("probed bf16 by allocating"))
    assert default_precision("gpu") == precision
    assert default_precision("cpu") == "32-true"
