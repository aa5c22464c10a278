"""What the benchmarks share: their registries, the study files they train, and one platform trial timed
against the hand-written loop (``benchmarks.baseline``) on the same network, data and seed."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml

from benchmarks.baseline import hand_written_fit
from lightning_modules.backbones import BACKBONES
from lightning_modules.registry import Registry
from search import worker
from search.cost import count_cost
from search.data import prepare_datamodule
from search.objective import Devices, TrialRunner
from search.storage import open_storage
from search.study_config import find_study_file, load_study
from search.study_store import create_or_load_study

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg"
Benchmark = Callable[[argparse.Namespace], dict[str, Any]]
CPU: Registry[Benchmark] = Registry("benchmark")
GPU: Registry[Benchmark] = Registry("benchmark")
LONG: Registry[Benchmark] = Registry("benchmark")  # an hour or more: run only when named with --only

DIGITS_STUDY = """
description: benchmark study on digits (resnet20 at a given width)
backbone: resnet20
data: {{dataset: digits, val_size: 0.2, image_size: {size}}}
training: {{epochs: {epochs}, batch_size: 128, lr: 0.1}}
search_space:
  width_multiplier: [{width}]
  placement: [none, standard, pre, post, identity]
  reduction: [4, 16]
  pooling: [avg, max]
objectives: [val_accuracy, flops]
pruner: {pruner}
trials: {trials}
seed: 0
"""


PRUNERS = {"none": "{name: none}", "median": "{name: median, options: {n_startup_trials: 4, n_warmup_steps: 1}}"}


def digits_study_file(tmp: Path, name: str, **fmt: Any) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(DIGITS_STUDY.format(**{**fmt, "pruner": PRUNERS[fmt["pruner"]]}))
    return path


# The CPU targets (the quick study's 3 minutes) are stated for 2 cores; CPU benchmarks' commands get that many.
BENCH_CPUS = 2


def bench_cpus(count: int = BENCH_CPUS) -> list[int]:
    """The CPUs a CPU benchmark's command is pinned to: the first ``count`` this process may use (fewer where
    there are fewer; the benchmark then says its target was not judged)."""
    return sorted(os.sched_getaffinity(0))[:count]


def cpu_only_child(cpus: Sequence[int]) -> dict[str, Any]:
    """``subprocess.Popen`` arguments for a command that must run on ``cpus`` only, without a GPU: ``search.run``
    trains on every visible GPU by default, and sizes its workers' threads by the CPUs it may use (its
    affinity), so both are set before it starts: CUDA hidden, and the affinity set in the child between fork
    and exec (no thread of it can start on another CPU first; its workers inherit it)."""
    chosen = set(cpus)
    return {"env": {**os.environ, "CUDA_VISIBLE_DEVICES": ""},
            "preexec_fn": lambda: os.sched_setaffinity(0, chosen)}


# The overhead's median pair ratio comes with a distribution-free interval of at least this coverage.
OVERHEAD_CONFIDENCE = 0.9
OVERHEAD_LIMIT = 1.05  # target 2: a trial through the platform takes at most 5% more than the hand loop


def overhead(study: str, overrides: dict[str, Any], device: torch.device, pairs: int) -> dict[str, Any]:
    """Target 2: ``pairs`` pairs of the study's default trial, once through a worker's own loop and once
    through the hand loop, on the same network, prepared data module (as a worker of a running study has it
    cached), device and seed (pair ``i``: the study's seed + ``i`` on both sides, what ``trial_seed`` gives
    the worker's trial number ``i``).

    What each side's seconds include:

    - platform: one pass of ``search.worker.run_worker``'s loop for one trial, on ``open_storage``'s storage
      (SQLite, heartbeats on), in one study that keeps the earlier pairs' trials: the stale-trial check, the
      budget read, ask (the sampler takes the enqueued default trial), the first heartbeat, the surplus
      check, ``_run_one`` (heartbeat thread, cost count of a network new to the process, attribute writes,
      Lightning's fit with the pruning callback, the test, result writes, tell) and ``_free_memory``
      (``gc.collect``; ``empty_cache`` on CUDA). Timed from that pass's stale-trial check to the next pass's.
      Not timed: the worker's start-up (opening the storage, loading the study, building the sampler and
      the ``TrialRunner``), which a worker pays once for all its trials.
    - hand loop: ``hand_written_fit``'s seconds: building the network, fitting the whitening stem, the epochs
      with validation after each, and the test: what a hand-written script does for one training.

    Runs alternate hand/platform, platform/hand (ABBA), so an order effect cancels over an even number of
    pairs, and ``gc.collect()`` runs before each, so no run collects the garbage of the run before it. The
    study's pruner is replaced by none: every pair trains the same network with another seed, and a real
    pruner would stop later pairs' trials at its rungs (its read of the study's trials at a rung, a few ms,
    is the one per-trial cost left out).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = str(study_variant(Path(tmp), study, find_study_file(study).stem, pruner={"name": "none"}))
        cfg = load_study(path, **overrides)
        dm = prepare_datamodule(cfg)
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        params = default_params(cfg)
        design = TrialRunner(cfg, dm, Devices(accelerator, 1)).design(optuna.trial.FixedTrial(params))
        url = f"sqlite:///{tmp}/bench.db"
        stored = new_bench_study(url, cfg, "bench")
        spec = worker.WorkerSpec(study=path, study_name=stored.study_name, storage=url, trials=0,
                                 overrides=overrides, accelerator=accelerator)
        # One untimed epoch first: a process's first fit pays one-off set-up (the CUDA context, cuDNN's algorithm
        # search, the allocator's growth, the CPU thread pool) that would otherwise fall on pair 0's first run.
        hand_written_fit(design.arch, dataclasses.replace(design.recipe, epochs=1), dm, device, seed=0)
        seeds = [cfg.seed + i for i in range(pairs)]
        platform_s, hand_runs, order = [], [], []
        for i, seed in enumerate(seeds):
            for side in ("hand", "platform") if i % 2 == 0 else ("platform", "hand"):
                gc.collect()  # the garbage of the run before is not collected inside this one
                order.append(side)
                if side == "hand":
                    hand_runs.append(hand_written_fit(design.arch, design.recipe, dm, device, seed=seed))
                else:
                    stored.enqueue_trial(params)  # the pair's trial: the study's default one
                    platform_s.append(_worker_trial_seconds(dataclasses.replace(spec, trials=i + 1), dm))
        trials = stored.get_trials()
    broken = [t.number for t in trials if t.state != optuna.trial.TrialState.COMPLETE]
    if broken:  # a failed or pruned trial's time is not a trial's time
        raise RuntimeError(f"overhead: platform trials {broken} did not complete")
    return {**_overhead_verdict(platform_s, [h["seconds"] for h in hand_runs]), "order": order, "seeds": seeds,
            "platform_seeds": [t.user_attrs.get("seed") for t in trials],
            "platform_val_accuracy": [t.user_attrs.get("val_accuracy") for t in trials],
            "platform_test_accuracy": [t.user_attrs.get("test_accuracy") for t in trials],
            "platform_train_seconds": [t.user_attrs.get("train_seconds") for t in trials],
            "hand_test_accuracy": [h["test_accuracy"] for h in hand_runs], "hand": hand_runs[-1]}


def _overhead_verdict(platform_s: list[float], hand_s: list[float]) -> dict[str, Any]:
    """``overhead``'s summary, target, verdict and timings."""
    verdict = overhead_ratio(platform_s, hand_s)
    low, high = verdict["interval"]
    summary = (f"platform {statistics.median(platform_s):.2f} s vs hand-written {statistics.median(hand_s):.2f} s "
               f"(medians of {len(hand_s)}): median pair ratio {verdict['ratio']:.3f}, "
               f"{verdict['interval_coverage']:.0%} interval {low:.3f}-{high:.3f} (fastest vs fastest "
               f"{verdict['min_ratio']:.3f})")
    if verdict["met"] is None:
        summary += "; " + _inconclusive(verdict)
    return {"summary": summary, "target": f"ratio <= {OVERHEAD_LIMIT}", **verdict, "platform_seconds": platform_s,
            "hand_seconds": hand_s}


def _inconclusive(verdict: dict[str, Any]) -> str:
    if verdict["interval_coverage"] < OVERHEAD_CONFIDENCE:
        return f"inconclusive: too few pairs for a {OVERHEAD_CONFIDENCE:.0%} interval"
    return f"inconclusive: the interval spans {OVERHEAD_LIMIT}"


def new_bench_study(url: str, cfg: Any, prefix: str) -> optuna.Study:
    """A new study in ``url``, created as ``search.run`` creates one, less the hypervolume's cost scale (seconds
    of cost counts, which no worker reads)."""
    return create_or_load_study(open_storage(url), f"{prefix}-{time.time_ns()}", cfg,
                                BACKBONES.get(cfg.backbone)().num_stages)


def _worker_trial_seconds(spec: worker.WorkerSpec, dm: Any) -> float:
    """Run ``search.worker.run_worker`` until the study holds ``spec.trials`` trials (one more than now) and
    return the seconds of its loop's pass for that trial: from the pass's stale-trial check to the next
    pass's, which finds the budget done and returns."""
    passes: list[float] = []
    count_cost.cache_clear()  # a study's next trial is a new network: it pays the cost count
    worker.run_worker(spec, datamodule=dm, on_pass=lambda: passes.append(time.perf_counter()))
    if len(passes) != 2:
        raise RuntimeError(f"overhead: the worker made {len(passes)} passes for one trial (a failed trial?)")
    return passes[1] - passes[0]


def median_interval(values: Sequence[float], confidence: float = OVERHEAD_CONFIDENCE) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median of ``values``: the narrowest pair of order
    statistics ``(x_(k), x_(n+1-k))`` that holds the true median with probability at least ``confidence``
    (the number of values below it is Binomial(n, 1/2)). Returns (low, high, its coverage); with too few
    values for ``confidence`` the full range and that range's (lower) coverage."""
    xs = sorted(values)
    n = len(xs)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n

    k = max((k for k in range(1, (n + 1) // 2 + 1) if coverage(k) >= confidence), default=1)
    return xs[k - 1], xs[n - k], coverage(k)


def overhead_ratio(platform_s: list[float], hand_s: list[float], limit: float = OVERHEAD_LIMIT) -> dict[str, Any]:
    """Target 2's ratio from alternating (hand-written, platform) pairs: the median of each pair's own ratio,
    with an order-statistic interval (``median_interval``).

    The two runs of a pair are adjacent in time, so a drift in the machine's speed (several percent between
    half-minute runs on a shared VM, measured) hits both alike and cancels in the pair's ratio; the median
    then ignores one pair caught by a burst. The verdict (``met``) is True when the whole interval is within
    ``limit``, False when all of it is above, and None (inconclusive) otherwise or when there are too few
    pairs for ``OVERHEAD_CONFIDENCE``: three pairs' median alone moved between 0.995 and 1.090 on the same
    code. The fastest platform run over the fastest hand-written one (``min_ratio``, this benchmark's
    verdict until 2026-11-30) compares runs minutes apart; it is kept beside the verdict.
    """
    pair_ratios = [p / h for p, h in zip(platform_s, hand_s, strict=True)]
    low, high, cover = median_interval(pair_ratios)
    met = None
    if cover >= OVERHEAD_CONFIDENCE:
        met = True if high <= limit else False if low > limit else None
    return {"ratio": statistics.median(pair_ratios), "pair_ratios": pair_ratios, "interval": [low, high],
            "interval_coverage": cover, "met": met, "min_ratio": min(platform_s) / min(hand_s)}


def study_variant(tmp: Path, study: str, name: str, **changes: Any) -> Path:
    """A copy of a study file with top-level sections replaced (written as ``tmp/name.yaml``)."""
    spec = yaml.safe_load(find_study_file(study).read_text()) | changes
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def default_params(cfg: Any) -> dict[str, Any]:
    """The study's default trial: standard SE in every stage with the first reduction and pooling listed."""
    return {f"stage{i}.{key}": value for i in (1, 2, 3) for key, value in
            (("placement", "standard"), ("reduction", cfg.search_space.reduction[0]),
             ("pooling", cfg.search_space.pooling[0]))}


@dataclass
class SearchRun:
    """What one ``search.run`` command left: its study, its wall time, and whether it ended by itself (False:
    stopped at the time limit)."""

    study: optuna.Study
    seconds: float
    finished: bool

    @property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials()


def run_search(study: str, runs_dir: str, *flags: str, timeout: float | None = None,
               cpus: Sequence[int] | None = None) -> SearchRun:
    """``python -m search.run --study STUDY FLAGS`` as a user runs it, with its default storage (SQLite in
    ``runs_dir``, which should hold no other study). Past ``timeout`` it is stopped with SIGTERM, as a
    scheduler would; a command that fails by itself raises with the end of its stderr. ``cpus``: run it on
    those CPUs only, with no GPU visible (``cpu_only_child``), as the CPU benchmarks' targets assume."""
    cmd = [sys.executable, "-m", "search.run", "--study", study, "--runs-dir", runs_dir, *flags]
    child = cpu_only_child(cpus) if cpus is not None else {"env": dict(os.environ)}
    child["env"]["SE_SEARCH_STORAGE"] = ""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **child)
    try:
        _, err = proc.communicate(timeout=timeout)
        finished = True
    except subprocess.TimeoutExpired:
        proc.terminate()
        _, err = proc.communicate(timeout=120)
        finished = False
    seconds = time.perf_counter() - start
    if finished and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} exited {proc.returncode}: {err[-1500:]}")
    db = f"sqlite:///{runs_dir}/studies.db"
    name = optuna.get_all_study_names(db)[0]
    return SearchRun(optuna.load_study(study_name=name, storage=db), seconds, finished)
