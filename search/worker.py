"""A worker process: joins a study and runs trials until the study holds the requested number.

Started by ``search.run`` (one per GPU slot, or ``--workers N`` on the CPU), or by hand on another machine
with the same arguments. Trials run through Optuna's ask/tell interface so that every outcome is recorded
with its reason: completed, pruned, diverged, out of memory, any other error (with a traceback summary),
or interrupted by Ctrl-C. Heartbeats are sent while a trial runs, and stale trials of dead workers are
failed (and re-queued) before each new trial.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
import torch
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import TrialState

from lightning_modules.backbones import BACKBONES
from lightning_modules.classifier import DivergenceError
from search.data import prepare_datamodule
from search.errors import UsageError
from search.objective import Devices, TrialRunner
from search.pruning import make_pruner
from search.storage import open_storage
from search.study_config import load_study
from search.study_store import make_sampler_for

__all__ = ["FAIL_REASON_ATTR", "WorkerSpec", "budget_left", "run_worker"]

FAIL_REASON_ATTR = "fail_reason"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
# A worker whose trials keep failing has a problem no further trial will fix (a broken environment, a bad
# study): it stops instead of filling the study with failures.
MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class WorkerSpec:
    """Everything a worker needs, passed as JSON on its command line."""

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

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class WorkerGaveUp(RuntimeError):
    """Too many consecutive trials failed in this worker."""


def budget_left(study: optuna.Study, trials: int) -> bool:
    """True while finished + running + queued trials are fewer than ``trials``; failed ones do not count."""
    return len(study.get_trials(deepcopy=False, states=COUNTED)) < trials


def _is_surplus(study: optuna.Study, trial: optuna.Trial, trials: int) -> bool:
    """Two workers may ask at the same moment for the last slot; the later trial number gives way."""
    earlier = [t for t in study.get_trials(deepcopy=False, states=COUNTED) if t.number < trial.number]
    return len(earlier) >= trials


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str, tb: str | None = None) -> None:
    trial.set_user_attr(FAIL_REASON_ATTR, reason[:2000])
    if tb:
        trial.set_user_attr("traceback", tb[-4000:])
    study.tell(trial, state=TrialState.FAIL)
    print(f"trial {trial.number} failed: {reason}", flush=True)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_one(study: optuna.Study, trial: optuna.Trial, runner: TrialRunner) -> bool:
    """Run one trial and record its outcome; False when it failed."""
    try:
        with get_heartbeat_thread(trial._trial_id, study._storage):
            values = runner(trial)
    except optuna.TrialPruned as e:
        trial.set_user_attr("pruned_reason", str(e))
        study.tell(trial, state=TrialState.PRUNED)
    except DivergenceError as e:
        _fail(study, trial, f"diverged: {e}")
        return False
    except torch.cuda.OutOfMemoryError as e:
        _free_memory()
        _fail(study, trial, f"CUDA out of memory: {str(e).splitlines()[0]}")
        return False
    except KeyboardInterrupt:
        _fail(study, trial, "interrupted (Ctrl-C)")
        raise
    except Exception as e:
        _fail(study, trial, f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e, limit=-8)))
        return False
    else:
        study.tell(trial, values)
    return True


def run_worker(spec: WorkerSpec) -> int:
    """Run trials of ``spec.study_name`` until the budget is reached. Returns the number of trials run."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = load_study(spec.study, **spec.overrides)
    storage = open_storage(spec.storage, heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period)
    sampler = make_sampler_for(cfg, BACKBONES.get(cfg.backbone)().num_stages)
    study = optuna.load_study(
        study_name=spec.study_name,
        storage=storage,
        sampler=sampler,
        pruner=None if cfg.multi_objective else make_pruner(cfg.pruner.name, cfg.pruner.options),
    )
    datamodule = prepare_datamodule(cfg)
    runner = TrialRunner(cfg, datamodule, Devices(spec.accelerator, spec.devices))
    ran = failures = 0
    while True:
        if is_heartbeat_enabled(study._storage):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        if not budget_left(study, spec.trials):
            return ran
        trial = study.ask()
        if _is_surplus(study, trial, spec.trials):
            _fail(study, trial, "surplus: the study already had its trials when this one started")
            return ran
        failures = 0 if _run_one(study, trial, runner) else failures + 1
        ran += 1
        _free_memory()
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise WorkerGaveUp(f"{failures} trials in a row failed; the last reason is stored on trial {trial.number}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.worker", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="the worker spec as JSON (written by search.run)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Lightning's per-Trainer banners would repeat for every trial in the worker log.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    try:
        run_worker(WorkerSpec(**json.loads(args.spec)))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerGaveUp as e:
        print(f"error: worker stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
