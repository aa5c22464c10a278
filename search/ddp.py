"""One trial on several devices: Lightning DDP over N processes, the worker process being rank 0.

Lightning's own ``ddp`` strategy re-launches the current command for ranks 1..N-1, which here would re-run
the whole worker loop (each copy asking the study for trials of its own); ``ddp_spawn`` pickles the
``Trainer`` and callbacks, and with them the Optuna trial, into every rank and returns only some of the
callback state. Instead a worker keeps a ``RankGroup``: N-1 helper processes, started once (``spawn``) and
reused for every trial, each holding its own DataModule. For each trial the worker sends them the design
and seed, every rank builds the same Lightning ``Trainer`` with a ``DDPStrategy`` whose cluster environment
says the processes already exist (so Lightning launches nothing), and rank 0 (the worker) alone holds the
Optuna trial: the pruning callback reports and decides there and broadcasts the decision, so every rank
stops together. Helpers never see the storage URL. After each trial every rank destroys its process
group; after any failure the helpers are killed and started afresh for the next trial, so a trial never
inherits a half-finished collective from the one before.

Backends: NCCL on GPUs (each worker's slot sees its N GPUs through CUDA_VISIBLE_DEVICES), gloo on the
CPU (``--procs-per-trial``, which proves the path without GPUs).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection
import signal
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
from lightning_fabric.plugins.environments import ClusterEnvironment
from pytorch_lightning.strategies import DDPStrategy

from search.devices import pin_threads

__all__ = ["DDP_TIMEOUT", "RankEnvironment", "RankGroup", "RankGroupError", "ddp_strategy", "destroy_process_group"]

# A collective that waits longer than this means a rank is gone; the default of 30 minutes would hold a
# GPU idle for half an hour before the trial is failed.
DDP_TIMEOUT = timedelta(minutes=10)
# How long rank 0 waits for the helpers to start (imports, data) and to report after a trial.
STARTUP_TIMEOUT_S = 600.0
REPORT_TIMEOUT_S = 120.0


class RankGroupError(RuntimeError):
    """A helper rank failed to start, died, or failed its part of a trial."""


class RankEnvironment(ClusterEnvironment):
    """A fixed rank in a single-node group whose processes already exist (Lightning launches none)."""

    def __init__(self, world_size: int, rank: int, port: int) -> None:
        super().__init__()
        self._world_size, self._rank, self._port = world_size, rank, port

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        return self._port

    @staticmethod
    def detect() -> bool:
        return False

    def world_size(self) -> int:
        return self._world_size

    def set_world_size(self, size: int) -> None:  # fixed by construction
        pass

    def global_rank(self) -> int:
        return self._rank

    def set_global_rank(self, rank: int) -> None:  # fixed by construction
        pass

    def local_rank(self) -> int:
        return self._rank

    def node_rank(self) -> int:
        return 0


def ddp_strategy(world_size: int, rank: int, port: int, accelerator: str) -> DDPStrategy:
    """The strategy of one rank: NCCL on GPUs, gloo on the CPU."""
    backend = "nccl" if accelerator in ("gpu", "cuda") else "gloo"
    return DDPStrategy(cluster_environment=RankEnvironment(world_size, rank, port), process_group_backend=backend,
                       timeout=DDP_TIMEOUT)


def destroy_process_group() -> None:
    """End this process's DDP group (Lightning leaves it open), so the next trial can start a new one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: the kernel kills this helper when its worker dies (even by SIGKILL), so no rank is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


T = TypeVar("T")

# The function a helper runs for its share of one trial: (design, seed, datamodule, strategy) -> summary.
RankFit = Callable[[Any, int, Any, DDPStrategy], dict[str, Any]]


def _helper_main(rank: int, world_size: int, accelerator: str, make_datamodule: Callable[[], Any],
                 fit: RankFit, threads: int | None, conn: mp.connection.Connection) -> None:
    """Rank ``rank``'s loop: prepare the data once, then train each trial rank 0 sends until told to stop."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it then ends this process
    if threads:
        pin_threads(threads)
    try:
        datamodule = make_datamodule()
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        design, seed, port = job
        try:
            summary = fit(design, seed, datamodule, ddp_strategy(world_size, rank, port, accelerator))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
            return
        finally:
            destroy_process_group()
        conn.send(("ok", summary))


class RankGroup:
    """Ranks 1..N-1 of a worker's trials (see the module docstring); rank 0 is the calling process.

    ``make_datamodule`` and ``fit`` are sent to the helpers, so they must be picklable (module-level
    functions or ``functools.partial`` of them over picklable arguments).
    """

    def __init__(self, world_size: int, accelerator: str, make_datamodule: Callable[[], Any], fit: RankFit,
                 threads: int | None = None) -> None:
        if world_size < 2:
            raise ValueError(f"world_size: a rank group needs >= 2 processes, got {world_size}")
        self.world_size, self.accelerator, self.threads = world_size, accelerator, threads
        self._make_datamodule, self._fit = make_datamodule, fit
        self._procs: list[tuple[mp.process.BaseProcess, mp.connection.Connection]] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        for rank in range(1, self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_helper_main, name=f"se-search-rank{rank}", daemon=True,
                               args=(rank, self.world_size, self.accelerator, self._make_datamodule, self._fit,
                                     self.threads, child))
            proc.start()
            child.close()
            self._procs.append((proc, parent))
        for rank, (proc, conn) in enumerate(self._procs, start=1):
            status, detail = self._receive(proc, conn, STARTUP_TIMEOUT_S, rank)
            if status != "ready":
                self.close()
                raise RankGroupError(f"DDP rank {rank} failed to start: {detail}")

    @staticmethod
    def _receive(proc: mp.process.BaseProcess, conn: mp.connection.Connection, timeout: float,
                 rank: int) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if conn.poll(0.2):
                try:
                    return conn.recv()
                except (EOFError, OSError):
                    break
            if not proc.is_alive():
                return "error", f"process exited with code {proc.exitcode}"
        return "error", f"no answer from rank {rank} within {timeout:.0f} s"

    def run_trial(self, design: Any, seed: int, fit: Callable[[DDPStrategy], T]) -> tuple[T, list[dict[str, Any]]]:
        """Rank 0's side of one trial: send it to the helpers, run ``fit`` with rank 0's strategy, and return
        its result with the helpers' summaries. If rank 0 fails, the helpers (possibly blocked in a
        collective) are ended and restarted for the next trial; the process group never outlives the trial."""
        strategy = self._begin(design, seed)
        try:
            result = fit(strategy)
        except BaseException:
            self._abort()
            raise
        finally:
            destroy_process_group()
        return result, self._end()

    def _begin(self, design: Any, seed: int) -> DDPStrategy:
        """Start the helpers if needed, send them this trial, and return rank 0's strategy."""
        if not self._procs or not all(p.is_alive() for p, _ in self._procs):
            self.close()
            self._start()
        port = free_port()
        for _, conn in self._procs:
            conn.send((design, seed, port))
        return ddp_strategy(self.world_size, 0, port, self.accelerator)

    def _end(self) -> list[dict[str, Any]]:
        """After rank 0's fit returned: every helper's summary of its part (ranks 1..N-1)."""
        summaries = []
        for rank, (proc, conn) in enumerate(self._procs, start=1):
            status, detail = self._receive(proc, conn, REPORT_TIMEOUT_S, rank)
            if status != "ok":
                self.close()
                raise RankGroupError(f"DDP rank {rank}: {detail}")
            summaries.append(detail)
        return summaries

    def _abort(self) -> None:
        """Rank 0 failed mid-trial: the helpers may be blocked in a collective; end them (restarted lazily)."""
        self.close(graceful=False)

    def close(self, graceful: bool = True) -> None:
        for proc, conn in self._procs:
            if graceful and proc.is_alive():
                with contextlib.suppress(OSError, BrokenPipeError):
                    conn.send(None)
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()
        self._procs = []
