"""Sustained trials per second one study's storage holds with several worker processes writing at once.

``python -m benchmarks.concurrency [--storage sqlite postgresql mysql] [--procs 4] [--seconds 20]``

Each process runs the worker's storage work without training, as fast as it can: stale-trial check,
budget read, ask with the per-stage suggestions of a resnet20 study, the pre-training attributes (cost,
seed, stage choices) in one transaction, the curve after the first "epoch", one read of the finished trials
per epoch (what the multi-objective pruner does), a heartbeat, the end-of-fit attributes in one transaction,
and tell. The figure is how many trials per second the
storage sustains before it, not training, becomes the limit: e.g. 4 GPUs running 4 trials each of 10 s
need 1.6 trials/s. Writes its rows to ``benchmarks/results/`` and the table in benchmarks/README.md
(``benchmarks.record``), and prints one line per storage.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import queue as queue_module
import socket
import tempfile
import time
import uuid
from typing import Any

import optuna

from search.pruning import MultiObjectivePruner
from search.storage import fail_stale_trials, masked, open_storage
from search.study_config import load_study
from search.trial_writes import batched_writes, set_user_attrs

__all__ = ["DEFAULT_URLS", "measure", "storage_trial", "summarize"]

DEFAULT_URLS = {
    "postgresql": os.environ.get("SE_SEARCH_TEST_POSTGRES") or "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mysql": os.environ.get("SE_SEARCH_TEST_MYSQL") or "mysql+pymysql://root@127.0.0.1:3306/test",
}
STAGES = 3
EPOCHS = 5
# 4 GPUs running 4 trials each, each trial 10 s (se_placement's target), finish 1.6 trials/s.
TARGET_TRIALS_PER_S = 2.0
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)


@functools.cache
def _flagship_pruner() -> MultiObjectivePruner:
    pruner = load_study("se_placement").pruner
    return MultiObjectivePruner(pruner.name, pruner.options, pruner.pareto_aware)


def storage_trial(study: optuna.Study, epochs: int = EPOCHS) -> int:
    """One trial's storage traffic as a worker makes it, without the training. Returns the trial number."""
    pruner_reads = _flagship_pruner().reads_trials_at
    fail_stale_trials(study)
    study.get_trials(deepcopy=False)  # the budget check (search.worker.Budget)
    trial = study.ask()
    with batched_writes(trial):  # as TrialRunner: the suggestions and the first attributes in one transaction
        for i in range(1, STAGES + 1):
            if trial.suggest_categorical(f"stage{i}.placement", ["none", "standard", "pre", "post", "identity"]) \
                    != "none":
                trial.suggest_categorical(f"stage{i}.reduction", [4, 8, 16])
                trial.suggest_categorical(f"stage{i}.pooling", ["avg", "max"])
        set_user_attrs(trial, {"worker": f"{socket.gethostname()}:{os.getpid()}", "macs": 161236, "flops": 322472,
                               "params": 17440, "seed": trial.number, "placements": ["standard"] * STAGES,
                               "reductions": [16] * STAGES, "poolings": ["avg"] * STAGES})
    curve: list[float] = []
    for epoch in range(epochs):
        curve.append(0.5 + epoch / 100)
        if epoch == 0:  # later epochs are written only every CURVE_WRITE_INTERVAL_S: never in a fast trial
            trial.set_user_attr("val_accuracy_curve", curve)
        if pruner_reads(epoch):  # se_placement's successive halving reads the finished trials at its rungs only
            study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        study._storage.record_heartbeat(trial._trial_id)
    set_user_attrs(trial, {"epochs_run": epochs, "train_seconds": 0.0, "val_accuracy_curve": curve,
                           "val_accuracy": curve[-1], "test_accuracy": curve[-1]})
    study.tell(trial, [curve[-1], 322472.0])
    return trial.number


def _process(url: str, name: str, ready: Any, window: Any, queue: Any) -> None:
    """One worker process: once set up, reports ``ready``, waits for the shared (start, stop) wall-clock
    ``window``, runs storage trials inside it, then sends its counts."""
    import warnings

    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_interval=60))
    ready.put(os.getpid())
    start_at, stop_at = window.get()
    numbers, errors = [], []
    time.sleep(max(0.0, start_at - time.time()))
    while time.time() < stop_at:
        try:
            numbers.append(storage_trial(study))
        except Exception as e:  # counted and reported: the benchmark's point is that there are none
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    queue.put({"numbers": numbers, "errors": errors})


def _wait_ready(ready: Any, workers: list[Any], timeout: float) -> None:
    """Wait until every worker has reported ready; fail at once, naming the exit code, if one died first."""
    deadline, pending = time.time() + timeout, len(workers)
    while pending:
        try:
            ready.get(timeout=1)
            pending -= 1
        except queue_module.Empty:
            dead = [w.exitcode for w in workers if w.exitcode is not None]
            if dead or time.time() > deadline:
                for w in workers:
                    w.kill()
                raise RuntimeError(f"concurrency benchmark: a worker process exited with code {dead[0]} before "
                                   f"it was ready" if dead else f"workers not ready after {timeout:.0f} s") from None


def measure(url: str, procs: int = 4, seconds: float = 20.0, warmup: float = 1.0) -> dict[str, Any]:
    """Run ``procs`` processes on a fresh study in ``url`` for ``seconds``; trials/s, errors, uniqueness.

    The processes start together, ``warmup`` seconds after the last of them has imported and connected, so
    the rate is sustained throughput, not start-up, however long start-up takes on a busy machine (a fixed
    start time once let a loaded CI machine's processes miss the whole window). The study is deleted
    afterwards.
    """
    name = f"bench-concurrency-{uuid.uuid4().hex[:12]}"
    storage = open_storage(url, heartbeat_interval=60)
    optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    ctx = mp.get_context("spawn")
    ready, window, queue = ctx.Queue(), ctx.Queue(), ctx.Queue()
    workers = [ctx.Process(target=_process, args=(url, name, ready, window, queue)) for _ in range(procs)]
    for w in workers:
        w.start()
    _wait_ready(ready, workers, timeout=600)
    start_at = time.time() + warmup
    for _ in workers:
        window.put((start_at, start_at + seconds))
    results = [queue.get(timeout=warmup + seconds + 300) for _ in workers]
    for w in workers:
        w.join(60)
    numbers = [n for r in results for n in r["numbers"]]
    errors = [e for r in results for e in r["errors"]]
    study = optuna.load_study(study_name=name, storage=storage)
    stored = study.get_trials(deepcopy=False)
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in stored)
    optuna.delete_study(study_name=name, storage=storage)
    return {
        "storage": masked(url),
        "procs": procs,
        "seconds": seconds,
        "trials": len(numbers),
        "trials_per_s": round(len(numbers) / seconds, 2),
        "stored_complete": complete,
        "unique_numbers": len(set(numbers)) == len(numbers) == len({t.number for t in stored}),
        "errors": errors[:20],
        "error_count": len(errors),
    }


def summarize(which: str, result: dict[str, Any]) -> dict[str, Any]:
    """One row of the benchmarks table (``benchmarks.record``), with the raw figures."""
    met = result["error_count"] == 0 and result["unique_numbers"] and result["trials_per_s"] >= TARGET_TRIALS_PER_S
    return {
        "name": f"concurrency_{which}",
        "summary": (f"{result['trials_per_s']:.2f} trials/s sustained, {result['procs']} processes, "
                    f"{result['error_count']} storage errors, numbers unique: {result['unique_numbers']}"),
        "target": f">= {TARGET_TRIALS_PER_S} trials/s, 0 errors",
        "met": met,
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.concurrency", description=__doc__.splitlines()[0])
    p.add_argument("--storage", nargs="+", default=["sqlite", "postgresql"],
                   help="sqlite, postgresql, mysql or SQLAlchemy URLs (default: sqlite postgresql)")
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.storage:
            url = {"sqlite": f"sqlite:///{tmp}/bench.db", **DEFAULT_URLS}.get(which, which)
            row = summarize(which if which in ("sqlite", *DEFAULT_URLS) else "url", measure(url, args.procs,
                                                                                             args.seconds))
            rows.append({**row, "load_average_1m": os.getloadavg()[0]})
            print(f"{row['name']:<23} {row['summary']}", flush=True)
    from benchmarks.record import write_results  # imports torch, which the measuring processes never need

    print(f"wrote {write_results(rows)}")
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
