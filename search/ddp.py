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
group and frees its memory; after any failure the helpers are killed and started afresh for the next trial,
so a trial never inherits a half-finished collective from the one before.

While rank 0 trains, a thread watches the helpers (``_HelperWatch``): a helper that fails (CUDA out of
memory, any exception) or dies ends the trial at once, and rank 0 raises that helper's error, of its type,
instead of waiting in a collective for a rank that will not come (gloo notices only when the peer's sockets
close, NCCL not at all until DDP_TIMEOUT, when its watchdog kills the whole worker).

Backends: NCCL on GPUs (each worker's slot sees its N GPUs through CUDA_VISIBLE_DEVICES), gloo on the
CPU (``--procs-per-trial``, which proves the path without GPUs).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import multiprocessing.connection
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import ClusterEnvironment
from pytorch_lightning.strategies import DDPStrategy

from search.devices import pin_threads

__all__ = ["DDP_TIMEOUT", "RankEnvironment", "RankGroup", "RankGroupError", "abort_process_group", "ddp_strategy",
           "destroy_process_group", "free_memory"]

# A collective that waits longer than this means a rank is gone; the default of 30 minutes would hold a
# GPU idle for half an hour before the trial is failed.
DDP_TIMEOUT = timedelta(minutes=10)
# How long rank 0 waits for the helpers to start (imports, data) and to report after a trial.
STARTUP_TIMEOUT_S = 600.0
REPORT_TIMEOUT_S = 120.0
# How often rank 0's watch looks at its helpers while it trains: the delay before a failed helper ends the trial.
WATCH_INTERVAL_S = 0.2


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


class _StoreDDPStrategy(DDPStrategy):
    """DDP whose ranks meet at rank 0's store, which listens before the helpers learn its port (Lightning would
    bind a port only once training starts, leaving a concurrent trial on this host time to take it, and its
    helpers to join the wrong group). Each helper announces itself there before its process group forms, and
    rank 0 waits for them in Python, where a helper's failure (``failed``) ends the wait: in the rendezvous
    itself rank 0 would wait DDP_TIMEOUT for a helper that died setting up its device, or under NCCL for good."""

    def __init__(self, store: dist.TCPStore, failed: threading.Event | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store, self._failed = store, failed

    def setup_distributed(self) -> None:
        if not dist.is_initialized():
            self._meet()
            # What Lightning's ``_init_dist_connection`` does, with our store in place of MASTER_PORT; Lightning
            # then finds the group initialized and leaves it as it is.
            device_id = self.root_device if self.root_device.type != "cpu" else None
            dist.init_process_group(self.process_group_backend, store=self._store, rank=self.global_rank,
                                    world_size=self.world_size, timeout=self._timeout, device_id=device_id)
        super().setup_distributed()

    def _meet(self) -> None:
        if self.global_rank != 0:
            self._store.set(f"arrived/{self.global_rank}", "1")
            return
        keys = [f"arrived/{rank}" for rank in range(1, self.world_size)]
        deadline = time.monotonic() + DDP_TIMEOUT.total_seconds()
        while not self._store.check(keys):
            if self._failed is not None and self._failed.is_set():
                raise RankGroupError("a DDP helper failed before the process group formed")
            if time.monotonic() > deadline:
                raise RankGroupError(f"DDP helpers did not arrive within {DDP_TIMEOUT}")
            time.sleep(WATCH_INTERVAL_S)


def _backend(accelerator: str) -> str:
    return "nccl" if accelerator in ("gpu", "cuda") else "gloo"


def ddp_strategy(world_size: int, rank: int, store: dist.TCPStore, accelerator: str,
                 failed: threading.Event | None = None) -> DDPStrategy:
    """The strategy of one rank: NCCL on GPUs, gloo on the CPU, meeting at ``store`` (``_listening_store`` on
    rank 0, ``_store_client`` on the helpers); ``failed``: rank 0's sign that a helper failed."""
    return _StoreDDPStrategy(store, failed, cluster_environment=RankEnvironment(world_size, rank, store.port),
                             process_group_backend=_backend(accelerator), timeout=DDP_TIMEOUT)


def _listening_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store, on a port the system picks as it binds; the helpers learn it afterwards."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=DDP_TIMEOUT, wait_for_workers=False)


def _store_client(port: int, world_size: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=DDP_TIMEOUT)


def destroy_process_group() -> None:
    """End this process's DDP group (Lightning leaves it open), so the next trial can start a new one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def abort_process_group() -> None:
    """End this process's DDP group after a failure, without waiting for the other ranks.

    NCCL's ``destroy_process_group`` first flushes pending collectives, which never finish when a rank has
    failed; its abort returns at once (and any collective blocked in another thread fails). Gloo has no abort
    (the call returns but a blocked collective stays blocked); its destroy does not wait for the other ranks."""
    if not dist.is_available():
        return
    if not dist.is_initialized():
        # A rendezvous that failed has still counted its group, which names the next one: this process would
        # call its next group "1" while the restarted helpers call theirs "0", and every later trial would wait
        # out DDP_TIMEOUT in the rendezvous. Ending a group resets the count to 0 the same way.
        dist.distributed_c10d._world.group_count = 0
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch >= 2.5
    if dist.get_backend() == "nccl" and abort is not None:
        abort()
    else:
        dist.destroy_process_group()


def free_memory() -> None:
    """Release what the last trial left: models in reference cycles, and the CUDA cache. Every rank runs it
    after every trial; a helper that did not would hold a GPU's memory for models of trials long finished."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _die_with_parent() -> None:
    """Linux: the kernel kills this helper when its worker dies (even by SIGKILL), so no rank is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


T = TypeVar("T")

# The function a helper runs for its share of one trial: (design, seed, datamodule, strategy) -> summary.
RankFit = Callable[[Any, int, Any, DDPStrategy], dict[str, Any]]

# What a helper sends rank 0 about a failure: the exception itself (None when it cannot travel through the
# pipe), a one-line summary and the formatted traceback. The pipe pickles it, as every message between these
# processes of ours.
ErrorReport = tuple[BaseException | None, str, str]


def _error_report(e: BaseException) -> ErrorReport:
    try:
        pickle.dumps(e)
        travels: BaseException | None = e
    except Exception:  # an exception holding something unpicklable: the summary and traceback still go
        travels = None
    return travels, f"{type(e).__name__}: {e}", "".join(traceback.format_exception(type(e), e, e.__traceback__))


def _helper_error(rank: int, detail: ErrorReport | str) -> Exception:
    """The exception rank 0 raises for a helper's failure: the helper's own, same type and message, when it
    unpickles (so an OutOfMemoryError on a helper is recorded as OOM, as on rank 0), else a RankGroupError.
    Its cause carries the helper's traceback. Only an ``Exception``: a helper's SystemExit must not end the
    worker."""
    if isinstance(detail, str):  # the helper died or did not answer
        return RankGroupError(f"DDP rank {rank}: {detail}")
    error, summary, tb = detail
    if not isinstance(error, Exception):
        error = RankGroupError(f"DDP rank {rank}: {summary}")
    error.__cause__ = RankGroupError(f"DDP rank {rank} failed:\n{tb}")
    return error


def _wait_to_be_ended(conn: mp.connection.Connection) -> None:
    """After reporting a failure a helper waits for rank 0 to kill it rather than exiting: its connections stay
    open, so the other helpers see no peer vanish (and report no error of their own) before rank 0 has read
    the real one. Nor does it end its process group: NCCL's would wait for collectives that never finish."""
    with contextlib.suppress(EOFError, OSError):
        conn.recv()


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
        conn.send(("error", _error_report(e)))
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
            summary = fit(design, seed, datamodule,
                          ddp_strategy(world_size, rank, _store_client(port, world_size), accelerator))
        except BaseException as e:
            conn.send(("error", _error_report(e)))
            _wait_to_be_ended(conn)
            return
        destroy_process_group()
        conn.send(("ok", summary))
        free_memory()  # after the report: rank 0 need not wait for it


def _poll(proc: mp.process.BaseProcess, conn: mp.connection.Connection) -> tuple[str, Any] | None:
    """A helper's report if one has arrived, an error if it died without one, else None."""
    alive = proc.is_alive()  # before the pipe: what a helper sent before it exited is in the pipe by then
    if conn.poll():
        with contextlib.suppress(EOFError, OSError):
            return conn.recv()
    elif alive:
        return None
    proc.join(1)
    return "error", f"process exited with code {proc.exitcode}"


class _HelperWatch:
    """Rank 0's watch over its helpers during one trial: a thread collects each helper's report as it arrives,
    and calls ``on_failure`` at the first failure (an error report, or a helper that died), while rank 0 may
    be blocked in a collective that only ``on_failure`` can end."""

    def __init__(self, procs: list[tuple[mp.process.BaseProcess, mp.connection.Connection]],
                 on_failure: Callable[[], None]) -> None:
        self._procs = dict(enumerate(procs, start=1))
        self._on_failure = on_failure
        self.reports: dict[int, tuple[str, Any]] = {}
        self.failure: Exception | None = None
        self.failed = threading.Event()  # set once ``failure`` is
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="se-search-ddp-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while len(self.reports) < len(self._procs) and not self._stop.is_set():
            pending = {rank: pc for rank, pc in self._procs.items() if rank not in self.reports}
            mp.connection.wait([o for proc, conn in pending.values() for o in (conn, proc.sentinel)],
                               timeout=WATCH_INTERVAL_S)
            for rank, (proc, conn) in pending.items():
                report = _poll(proc, conn)
                if report is not None:
                    self._record(rank, report)

    def _record(self, rank: int, report: tuple[str, Any]) -> None:
        self.reports[rank] = report
        status, detail = report
        if status != "ok" and self.failure is None:
            self.failure = _helper_error(rank, detail)
            self.failed.set()
            self._on_failure()

    def wait(self, timeout: float) -> bool:
        """Wait until every helper has reported or one failed; False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and self.failure is None and time.monotonic() < deadline:
            self._thread.join(WATCH_INTERVAL_S)
        return self.failure is not None or not self._thread.is_alive()

    def stop(self) -> None:
        """End the thread: the pipes are rank 0's again."""
        self._stop.set()
        self._thread.join()


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
                summary = detail if isinstance(detail, str) else detail[1]
                raise RankGroupError(f"DDP rank {rank} failed to start: {summary}")

    @staticmethod
    def _receive(proc: mp.process.BaseProcess, conn: mp.connection.Connection, timeout: float,
                 rank: int) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mp.connection.wait([conn, proc.sentinel], timeout=WATCH_INTERVAL_S)
            report = _poll(proc, conn)
            if report is not None:
                return report
        return "error", f"no answer from rank {rank} within {timeout:.0f} s"

    def run_trial(self, design: Any, seed: int, fit: Callable[[DDPStrategy], T]) -> tuple[T, list[dict[str, Any]]]:
        """Rank 0's side of one trial: send it to the helpers, run ``fit`` with rank 0's strategy, and return
        its result with the helpers' summaries. A helper's failure stops rank 0's fit and is raised in its
        place. After any failure the helpers (possibly blocked in a collective) are ended and restarted for
        the next trial; the process group never outlives the trial."""
        store = self._begin(design, seed)
        watch = _HelperWatch(self._procs, self._stop_collectives)
        try:
            result = fit(ddp_strategy(self.world_size, 0, store, self.accelerator, watch.failed))
        except BaseException as e:
            watch.stop()
            self._abort()
            if watch.failure is not None and isinstance(e, Exception):
                # Rank 0's own error (a closed connection, an aborted communicator) only follows the helper's.
                raise watch.failure from watch.failure.__cause__
            raise
        summaries = self._end(watch)
        destroy_process_group()
        return result, summaries

    def _begin(self, design: Any, seed: int) -> dist.TCPStore:
        """Start the helpers if needed, and send them this trial with the port of rank 0's store."""
        if not self._procs or not all(p.is_alive() for p, _ in self._procs):
            self.close()
            self._start()
        store = _listening_store(self.world_size)
        for _, conn in self._procs:
            conn.send((design, seed, store.port))
        return store

    def _stop_collectives(self) -> None:
        """A helper failed while rank 0 trains (this runs in the watch's thread): make rank 0's collective, now or
        next, fail at once instead of waiting DDP_TIMEOUT for a rank that will not come. Killing the helpers
        closes their sockets, which fails a gloo collective; NCCL does not notice a dead peer, and needs the
        abort (which also keeps its watchdog from ending the worker at the timeout)."""
        for proc, _ in self._procs:
            proc.kill()
        if _backend(self.accelerator) == "nccl":
            with contextlib.suppress(Exception):  # rank 0 may not have its group yet, or be ending it now
                abort_process_group()

    def _end(self, watch: _HelperWatch) -> list[dict[str, Any]]:
        """After rank 0's fit returned: every helper's summary of its part (ranks 1..N-1)."""
        answered = watch.wait(REPORT_TIMEOUT_S)
        watch.stop()
        if watch.failure is not None or not answered:
            self._abort()
            silent = sorted(set(range(1, self.world_size)) - set(watch.reports))
            raise watch.failure or RankGroupError(f"no answer from DDP rank(s) {silent} in {REPORT_TIMEOUT_S:.0f} s")
        return [watch.reports[rank][1] for rank in range(1, self.world_size)]

    def _abort(self) -> None:
        """A trial failed: the helpers may be blocked in a collective; end them (restarted lazily), and rank 0's
        group without waiting for them."""
        self.close(graceful=False)
        abort_process_group()

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
