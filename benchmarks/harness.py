"""What the benchmarks share: their registries, the study files they train, and one platform trial timed
against the hand-written loop (``benchmarks.baseline``) on the same network, data and seed."""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml

from benchmarks.baseline import hand_written_fit
from lightning_modules.registry import Registry
from search.cost import count_cost
from search.data import prepare_datamodule
from search.objective import Devices, TrialRunner
from search.pareto import reference_costs
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


def platform_trial(cfg: Any, dm: Any, devices: Devices, storage: Any, params: dict[str, Any]) -> tuple[float, Any]:
    """One trial exactly as a worker runs it (cost, storage writes, pruning callback, test), timed."""
    shape = {"num_classes": dm.num_classes, "in_channels": dm.in_channels, "image_size": dm.image_size}
    attrs = {"reference_costs": reference_costs(cfg, **shape)}
    study = create_or_load_study(storage, f"bench-{time.time_ns()}", cfg, 3, attrs)
    study.enqueue_trial(params)
    runner = TrialRunner(cfg, dm, devices)
    count_cost.cache_clear()  # a study's next trial is a new network: it pays the cost count
    start = time.perf_counter()
    trial = study.ask()
    study.tell(trial, runner(trial))
    seconds = time.perf_counter() - start
    return seconds, study.trials[-1]


def overhead(args: argparse.Namespace, study: str, overrides: dict[str, Any], device: torch.device) -> dict[str, Any]:
    cfg = load_study(study, **overrides)
    dm = prepare_datamodule(cfg)
    params = default_params(cfg)
    devices = Devices("gpu" if device.type == "cuda" else "cpu", 1)
    with tempfile.TemporaryDirectory() as tmp:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}/bench.db")
        design = TrialRunner(cfg, dm, devices).design(optuna.trial.FixedTrial(params))
        # One untimed epoch first: a process's first fit pays one-off set-up (the CUDA context, cuDNN's algorithm
        # search, the allocator's growth, the CPU thread pool) that would otherwise fall on pair 0's hand run.
        hand_written_fit(design.arch, dataclasses.replace(design.recipe, epochs=1), dm, device, seed=0)
        platform_s, hand_s, trials = [], [], []
        for _ in range(args.repeats):  # alternate, so drift of the machine hits both alike
            hand = hand_written_fit(design.arch, design.recipe, dm, device, seed=0)
            hand_s.append(hand["seconds"])
            seconds, trial = platform_trial(cfg, dm, devices, storage, params)
            platform_s.append(seconds)
            trials.append(trial)
    verdict = overhead_ratio(platform_s, hand_s)
    return {
        "summary": f"platform {min(platform_s):.2f} s vs hand-written {min(hand_s):.2f} s: median pair ratio "
                   f"{verdict['ratio']:.3f} (pairs {min(verdict['pair_ratios']):.3f}-{max(verdict['pair_ratios']):.3f}"
                   f", fastest vs fastest {verdict['min_ratio']:.3f})",
        "target": "ratio <= 1.05",
        "met": verdict["ratio"] <= 1.05,
        "platform_seconds": platform_s,
        "hand_seconds": hand_s,
        **verdict,
        "platform_val_accuracy": [t.user_attrs.get("val_accuracy") for t in trials],
        "platform_test_accuracy": [t.user_attrs.get("test_accuracy") for t in trials],
        "platform_train_seconds": [t.user_attrs.get("train_seconds") for t in trials],
        "hand": hand,
    }


def overhead_ratio(platform_s: list[float], hand_s: list[float]) -> dict[str, Any]:
    """Target 2's ratio from alternating (hand-written, platform) pairs: the median of each pair's own ratio.

    The two runs of a pair are adjacent in time, so a drift in the machine's speed (several percent between
    half-minute runs on a shared VM, measured) hits both alike and cancels in the pair's ratio; the median
    then ignores one pair caught by a burst. The fastest platform run over the fastest hand-written one
    (``min_ratio``, this benchmark's verdict until 2026-11-30) compares runs minutes apart, so drift alone
    moved it between 1.02 and 1.12 on the same code; it is kept beside the verdict.
    """
    pair_ratios = [p / h for p, h in zip(platform_s, hand_s, strict=True)]
    return {"ratio": statistics.median(pair_ratios), "pair_ratios": pair_ratios,
            "min_ratio": min(platform_s) / min(hand_s)}


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


def run_search(study: str, runs_dir: str, *flags: str, timeout: float | None = None) -> SearchRun:
    """``python -m search.run --study STUDY FLAGS`` as a user runs it, with its default storage (SQLite in
    ``runs_dir``, which should hold no other study). Past ``timeout`` it is stopped with SIGTERM, as a
    scheduler would; a command that fails by itself raises with the end of its stderr."""
    cmd = [sys.executable, "-m", "search.run", "--study", study, "--runs-dir", runs_dir, *flags]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SE_SEARCH_STORAGE": ""})
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
