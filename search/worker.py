"""A worker process: joins a study and runs trials until the study holds the requested number.

Started by ``search.run`` (one per GPU slot, or ``--workers N`` on the CPU; on each machine that runs the
command). The spec, storage URL included, arrives as JSON on standard input, so no password is visible in
the process list. Trials run through Optuna's ask/tell interface so that every outcome is recorded with its
reason: completed, pruned, diverged, out of memory, any other error (with a traceback summary), or
interrupted (Ctrl-C, SIGTERM). Heartbeats are sent while a trial runs, and stale trials of dead workers are
failed (and re-queued with the same parameters) before each new trial.

The budget: a worker starts a trial while finished (complete or pruned) plus running trials are fewer than
the study's ``trials``. When the rest are running elsewhere it waits instead of leaving, since one of them
may belong to a dead worker and come back as a retry; it stops once ``trials`` have finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

import numpy as np
import optuna
import torch
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from lightning_modules.backbones import BACKBONES
from lightning_modules.classifier import DivergenceError
from search import redact
from search.data import prepare_datamodule
from search.ddp import free_memory as _free_memory  # what every DDP helper rank runs after a trial too
from search.devices import pin_threads
from search.errors import UsageError, UsageParser, cli_main
from search.heartbeat import Heartbeat
from search.objective import PRUNED_REASON_ATTR, Devices, TrialRunner
from search.pruning import make_pruner
from search.storage import fail_stale_trials, masked, open_storage
from search.study_config import load_study
from search.study_store import make_sampler_for
from search.trial_writes import set_user_attrs

__all__ = ["FAIL_REASON_ATTR", "THREADS_ATTR", "WORKER_ATTR", "Budget", "TrialInterrupted", "WorkerSpec", "run_worker",
           "sampler_seed"]

FAIL_REASON_ATTR = "fail_reason"
# A trial asked for a slot other workers filled meanwhile: handed back untrained, not counted as a failure.
SURPLUS_REASON = "surplus: the study already had its trials when this one started"
WORKER_ATTR = "worker"
# The worker's torch thread count: CPU kernels sum in an order that follows it, so ``--rerun-trial`` pins the
# same count to reproduce the trial (one thread instead of two changed a digits trial's accuracy by 1.4 points).
THREADS_ATTR = "torch_threads"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
# A worker whose trials keep failing has a problem no further trial will fix (a broken environment, a bad
# study): it stops instead of filling the study with failures.
MAX_CONSECUTIVE_FAILURES = 5
# Writing a trial's outcome survives a dropped database connection: Optuna's scoped session rolls back and
# raises StorageInternalError; the write is tried again after a pause.
TELL_ATTEMPTS = 4


@dataclass
class WorkerSpec:
    """Everything a worker needs, passed as JSON on its standard input."""

    study: str
    study_name: str
    storage: str
    trials: int
    overrides: dict[str, Any] = field(default_factory=dict)
    accelerator: str = "cpu"
    devices: int = 1
    threads: int | None = None
    heartbeat_interval: int | None = 60
    grace_period: int | None = None
    worker_index: int = 0
    # Trials the study held when the command started; a resumed command's samplers draw new streams from it.
    trials_at_start: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class WorkerGaveUp(RuntimeError):
    """Too many consecutive trials failed in this worker."""


class TrialInterrupted(BaseException):
    """Ctrl-C or SIGTERM arrived while a trial ran. Not a KeyboardInterrupt on purpose: Lightning turns a
    KeyboardInterrupt inside ``fit`` into ``sys.exit(1)``, which would leave the trial RUNNING."""


class _Stop:
    """What the signal handlers saw: the reason to stop, and whether a trial is running right now."""

    reason: str | None = None
    in_trial: bool = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    first = _Stop.reason is None
    _Stop.reason = _Stop.reason or ("interrupted (Ctrl-C)" if signum == signal.SIGINT else "terminated (SIGTERM)")
    if first and _Stop.in_trial:
        raise TrialInterrupted(_Stop.reason)


def install_signal_handlers() -> None:
    """Ctrl-C and SIGTERM end the running trial as FAIL with the reason, then the worker (exit code 130)."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    if _Stop.reason is not None:
        raise TrialInterrupted(_Stop.reason)
    _Stop.in_trial = True
    try:
        yield
    finally:
        _Stop.in_trial = False


@dataclass(frozen=True)
class Budget:
    """What one read of the study's trials says about its budget of ``trials``. The worker reads it once per
    pass of its loop: each read of the trials costs a few milliseconds on PostgreSQL, a visible share of
    short trials when it was done three times per trial."""

    trials: int
    finished: int  # complete or pruned
    running: int
    counted_numbers: tuple[int, ...]  # numbers of finished, running and waiting trials: what the budget counts
    last_number: int  # the highest trial number in the study, failed trials included (-1: none)

    @classmethod
    def read(cls, study: optuna.Study, trials: int) -> Budget:
        all_trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state for t in all_trials)
        return cls(trials, counts[TrialState.COMPLETE] + counts[TrialState.PRUNED], counts[TrialState.RUNNING],
                   tuple(t.number for t in all_trials if t.state in COUNTED),
                   max((t.number for t in all_trials), default=-1))

    @property
    def done(self) -> bool:
        return self.finished >= self.trials

    @property
    def left(self) -> bool:
        """Finished + running trials are fewer than ``trials``; failed ones do not count, and waiting ones
        (queued retries) are what the next ``ask`` takes."""
        return self.finished + self.running < self.trials

    def surely_not_surplus(self, trial: optuna.Trial) -> bool:
        """True when ``trial`` (asked after this read) cannot be over the budget, so no new read is needed.

        Counted trials numbered below it are at most those counted here, plus every trial created since
        (numbers above ``last_number``). Only near the end of the budget, within the trials running here
        plus one (other workers' asks in flight), is the bound too close and the trials read again."""
        counted_before = sum(1 for number in self.counted_numbers if number < trial.number)
        created_since = max(0, trial.number - 1 - self.last_number)
        return counted_before + created_since + self.running + 1 < self.trials


def _is_surplus(study: optuna.Study, trial: optuna.Trial, trials: int) -> bool:
    """Two workers may ask at the same moment for the last slot; the later trial number gives way."""
    earlier = [t for t in study.get_trials(deepcopy=False, states=COUNTED) if t.number < trial.number]
    return len(earlier) >= trials


def sampler_seed(study_seed: int, worker_index: int, host: str | None = None, trials_at_start: int = 0) -> int:
    """The seed of one worker's sampler. Workers seeded alike would suggest the same parameters at the
    same moment (every random start-up trial of TPE, every random pick of the grid), so the seed mixes in
    the worker's index and its machine: reproducible for the same command on the same machine, distinct
    across workers and machines. A resumed command (the study held ``trials_at_start`` trials when it
    started) mixes that in too; otherwise its workers would replay the first run's random proposals and
    train those parameters again. A new study's seeds are the same as before that count was added.
    Training seeds do not depend on it (``trial_seed``)."""
    host = host if host is not None else socket.gethostname()
    entropy = [study_seed % 2**32, zlib.crc32(host.encode()), worker_index]
    if trials_at_start:
        entropy.append(trials_at_start)
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _retrying(write: Callable[[], None], what: str) -> None:
    """Run a storage write, again after a pause when the database dropped the connection or deadlocked."""
    for attempt in range(1, TELL_ATTEMPTS + 1):
        try:
            write()
            return
        except optuna.exceptions.StorageInternalError as e:
            if attempt == TELL_ATTEMPTS:
                raise
            _log(f"storage error while {what} (attempt {attempt}/{TELL_ATTEMPTS}), retrying: {e}")
            time.sleep(2.0 * attempt)


def _tell(study: optuna.Study, trial: optuna.Trial, **kwargs: Any) -> bool:
    """``study.tell``; False when the trial was already finished elsewhere (another worker found its
    heartbeat late and failed it, and its retry is queued): this result is then discarded.

    Optuna says so in two ways: ``UpdateFinishedTrialError`` when the other worker's write came during the
    tell, a plain ``ValueError`` ("Cannot tell a FAIL trial.") when it came before, which is the usual case.
    A ``ValueError`` on a trial still running is a real error and propagates."""
    try:
        _retrying(lambda: study.tell(trial, **kwargs), f"recording trial {trial.number}")
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
        if not study._storage.get_trial(trial._trial_id).state.is_finished():
            raise
        _log(f"trial {trial.number} was already finished by another worker (stale heartbeat); result discarded")
        return False
    return True


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str, tb: str | None = None) -> None:
    reason = redact.redact(reason)
    attrs = {FAIL_REASON_ATTR: reason[:2000]} | ({"traceback": redact.redact(tb)[-4000:]} if tb else {})
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs(trial, attrs)
    if _tell(study, trial, state=TrialState.FAIL):
        _log(f"trial {trial.number} failed: {reason}")


def _traceback_summary(e: BaseException) -> str:
    return "".join(traceback.format_exception(e, limit=-8))


def _run_one(study: optuna.Study, trial: optuna.Trial, runner: Callable[[optuna.Trial], Any]) -> bool:
    """Run one trial and record its outcome; False when it failed.

    Interruptions (``TrialInterrupted``, KeyboardInterrupt, SystemExit) mark the trial FAIL with the
    reason and propagate. Memory of a failed trial is freed after the ``except`` block has dropped the
    exception, whose traceback holds the trial's model, optimiser and activations.
    """
    _log(f"trial {trial.number} started")
    failure: tuple[str, str | None] | None = None
    try:
        with Heartbeat(study._storage, trial._trial_id, trial.number, _log), _interruptible():
            values = runner(trial)
    except optuna.TrialPruned as e:
        if PRUNED_REASON_ATTR not in trial.user_attrs:  # TrialRunner stores it with the trial's results
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                trial.set_user_attr(PRUNED_REASON_ATTR, str(e))
        _tell(study, trial, state=TrialState.PRUNED)
    except DivergenceError as e:
        failure = (f"diverged: {e}", None)
    except torch.cuda.OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        failure = (first if first.startswith("CUDA out of memory") else f"CUDA out of memory: {first}", None)
    except TrialInterrupted as e:
        _fail(study, trial, str(e))
        raise
    except KeyboardInterrupt:
        _fail(study, trial, "interrupted (Ctrl-C)")
        raise
    except SystemExit as e:
        _fail(study, trial, f"interrupted (exit {e.code})")
        raise
    except Exception as e:
        failure = (f"{type(e).__name__}: {e}", _traceback_summary(e))
    else:
        _tell(study, trial, values=values)
    if failure is None:
        return True
    _free_memory()  # the exception and its frames are gone now: the memory they held can be released
    _fail(study, trial, *failure)
    return False


def _waiting_for_others(spec: WorkerSpec, budget: Budget, announced: bool) -> bool:
    """The rest of the budget is running elsewhere: wait for it to finish or to come back as a retry."""
    if not announced:
        _log(f"waiting: {budget.running} trial(s) running in other workers")
    time.sleep(max(1, min(spec.heartbeat_interval or 1, 5)))
    return True


def run_worker(spec: WorkerSpec, *, datamodule: Any = None,
               on_pass: Callable[[], None] | None = None) -> int:
    """Run trials of ``spec.study_name`` until ``spec.trials`` have finished. Returns the number run here.

    Raises ``TrialInterrupted`` when a stop signal arrives (after recording the running trial). For the
    benchmarks, which time this loop in-process: ``datamodule``, one already prepared (as a worker of a
    running study finds it cached); ``on_pass``, called at the start of every pass of the loop.
    """
    if spec.threads:
        pin_threads(spec.threads)
    cfg = load_study(spec.study, **spec.overrides)
    storage = open_storage(spec.storage, heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period)
    sampler = make_sampler_for(cfg.replace(seed=sampler_seed(cfg.seed, spec.worker_index,
                                                             trials_at_start=spec.trials_at_start)),
                               BACKBONES.get(cfg.backbone)().num_stages)
    study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=sampler,
                              pruner=None if cfg.multi_objective else make_pruner(cfg.pruner.name, cfg.pruner.options))
    datamodule = datamodule or prepare_datamodule(cfg)
    runner = TrialRunner(cfg, datamodule, Devices(spec.accelerator, spec.devices),
                         trial_attrs={WORKER_ATTR: f"{socket.gethostname()}:{os.getpid()}",
                                      THREADS_ATTR: torch.get_num_threads()})
    _log(f"worker {socket.gethostname()}:{os.getpid()} joined study {spec.study_name!r} in {masked(spec.storage)} "
         f"({spec.accelerator}, {spec.devices} device(s) per trial)")
    ran = failures = 0
    waiting = False
    try:
        while True:
            if _Stop.reason is not None:
                raise TrialInterrupted(_Stop.reason)
            if on_pass is not None:
                on_pass()
            fail_stale_trials(study)
            budget = Budget.read(study, spec.trials)
            if budget.done:
                return ran
            if not budget.left:
                if not is_heartbeat_enabled(study._storage):
                    return ran  # without heartbeats a dead worker's trial never comes back: nothing to wait for
                waiting = _waiting_for_others(spec, budget, waiting)
                continue
            waiting = False
            trial = study.ask()
            if is_heartbeat_enabled(study._storage):
                # Optuna never finds a trial stale before its first heartbeat: record one at once, so a worker
                # dying before its heartbeat thread starts still leaves a trial that comes back as a retry.
                study._storage.record_heartbeat(trial._trial_id)
            if not budget.surely_not_surplus(trial) and _is_surplus(study, trial, spec.trials):
                _fail(study, trial, SURPLUS_REASON)
                continue
            failures = 0 if _run_one(study, trial, runner) else failures + 1
            ran += 1
            _free_memory()
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise WorkerGaveUp(
                    f"{failures} trials in a row failed; the last reason is stored on trial {trial.number}")
    finally:
        runner.close()


def read_spec(arg: str | None) -> WorkerSpec:
    """The spec from the argument, or from standard input when the argument is absent or ``-``."""
    text = sys.stdin.read() if arg in (None, "-") else arg
    try:
        return WorkerSpec(**json.loads(text))
    except (json.JSONDecodeError, TypeError) as e:
        raise UsageError(f"worker spec: expected the JSON search.run writes, got an error: {e}") from None


def quiet_trial_logs() -> None:
    """Silence what would repeat for every trial in a worker's log: Lightning's per-Trainer banners (devices,
    tips, "fit stopped"), Optuna's heartbeat-outside-optimize warning (our loop sends the heartbeats itself)
    and a Lightning deprecation warning it raises on its own behalf."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _serve(args: argparse.Namespace) -> int:
    quiet_trial_logs()
    install_signal_handlers()
    try:
        spec = read_spec(args.spec)
        redact.install(spec.storage)
        run_worker(spec)
    except WorkerGaveUp as e:
        print(f"error: worker stopped: {e}", file=sys.stderr)
        return 1
    except (TrialInterrupted, KeyboardInterrupt):
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = UsageParser(prog="python -m search.worker", description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="-",
                        help="the worker spec as JSON; '-' or nothing: read it from standard input (search.run "
                             "does, so the storage URL is not visible in the process list)")
    return cli_main(_serve, parser, argv)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
