"""``python -m benchmarks.run [--gpu] [--only NAME]``: measure the performance targets and record them.

Each benchmark returns a dict with ``name``, ``summary``, ``target``, ``met`` and its raw numbers; the run
is written to ``benchmarks/results/<date>-<device>.json`` and the table in ``benchmarks/README.md`` is
rebuilt from every stored run. CPU benchmarks run everywhere; ``--gpu`` adds the GPU ones.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmarks.baseline import hand_written_fit
from benchmarks.record import write_results
from lightning_modules.registry import Registry
from search.data import prepare_datamodule
from search.objective import Devices, TrialRunner
from search.pareto import hypervolume, reference_costs
from search.study_config import load_study
from search.study_store import create_or_load_study

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg"
Benchmark = Callable[[argparse.Namespace], dict[str, Any]]
CPU: Registry[Benchmark] = Registry("benchmark")
GPU: Registry[Benchmark] = Registry("benchmark")

DIGITS_STUDY = """
description: benchmark study on digits (resnet20 at half width)
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


def _study_file(tmp: Path, name: str, **fmt: Any) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(DIGITS_STUDY.format(**{**fmt, "pruner": PRUNERS[fmt["pruner"]]}))
    return path


def _platform_trial(cfg: Any, dm: Any, devices: Devices, storage: Any, params: dict[str, Any]) -> tuple[float, Any]:
    """One trial exactly as a worker runs it (cost, storage writes, pruning callback, test), timed."""
    shape = {"num_classes": dm.num_classes, "in_channels": dm.in_channels, "image_size": dm.image_size}
    attrs = {"reference_costs": reference_costs(cfg, **shape)}
    study = create_or_load_study(storage, f"bench-{time.time_ns()}", cfg, 3, attrs)
    study.enqueue_trial(params)
    runner = TrialRunner(cfg, dm, devices)
    start = time.perf_counter()
    trial = study.ask()
    study.tell(trial, runner(trial))
    seconds = time.perf_counter() - start
    return seconds, study.trials[-1]


def _overhead(args: argparse.Namespace, study: str, overrides: dict[str, Any], device: torch.device) -> dict[str, Any]:
    cfg = load_study(study, **overrides)
    dm = prepare_datamodule(cfg)
    params = {f"stage{i}.placement": "standard" for i in (1, 2, 3)} | {
        f"stage{i}.reduction": cfg.search_space.reduction[0] for i in (1, 2, 3)} | {
        f"stage{i}.pooling": cfg.search_space.pooling[0] for i in (1, 2, 3)}
    devices = Devices("gpu" if device.type == "cuda" else "cpu", 1)
    with tempfile.TemporaryDirectory() as tmp:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}/bench.db")
        runner = TrialRunner(cfg, dm, devices)
        design = runner.design(optuna.trial.FixedTrial(params))
        platform_s, hand_s = [], []
        for _ in range(args.repeats):  # alternate, so drift of the machine hits both alike
            hand = hand_written_fit(design.arch, design.recipe, dm, device, seed=0)
            hand_s.append(hand["seconds"])
            seconds, trial = _platform_trial(cfg, dm, devices, storage, params)
            platform_s.append(seconds)
    ratio = min(platform_s) / min(hand_s)
    return {
        "summary": f"platform {min(platform_s):.2f} s vs hand-written {min(hand_s):.2f} s: ratio {ratio:.3f}",
        "target": "ratio <= 1.05",
        "met": ratio <= 1.05,
        "platform_seconds": platform_s,
        "hand_seconds": hand_s,
        "ratio": ratio,
        "platform_val_accuracy": trial.user_attrs.get("val_accuracy"),
        "hand_val_accuracy": hand["val_accuracy"],
    }


@CPU.register("overhead_cpu")
def overhead_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """Target 2 on the CPU: a trial through the platform vs the hand-written loop (ResNet-20, digits 16x16,
    10 epochs as in the studies' recipes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _study_file(Path(tmp), "overhead", size=16, epochs=10, width=1.0, pruner="none", trials=1)
        return _overhead(args, str(path), {}, torch.device("cpu"))


@CPU.register("quick_study_cpu")
def quick_study_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """Target 6: README's quick digits study, as a user runs it, wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "search.run", "--study", "se_placement", "--dataset", "digits", "--trials", "8",
               "--epochs", "2", "--runs-dir", tmp]
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, env={**os.environ,
                                "SE_SEARCH_STORAGE": ""})
        seconds = time.perf_counter() - start
    ok = result.returncode == 0
    return {"summary": f"{seconds:.0f} s (exit {result.returncode})", "target": "<= 180 s on 2 cores",
            "met": ok and seconds <= 180, "seconds": seconds, "command": " ".join(cmd[1:])}


class _TimedStorage:
    """Wraps every public method of a storage to add up the seconds spent in it."""

    def __init__(self, storage: Any) -> None:
        self.seconds = 0.0
        for name in dir(storage):
            attr = getattr(storage, name)
            if name.startswith("_") or not callable(attr):
                continue
            setattr(storage, name, self._timed(attr))

    def _timed(self, fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper


@CPU.register("storage_share")
def storage_share(args: argparse.Namespace) -> dict[str, Any]:
    """Target 6: the share of a trial's time spent in storage calls, on SQLite and PostgreSQL."""
    urls = {"sqlite": None, "postgresql": os.environ.get("SE_SEARCH_TEST_POSTGRES",
                                                          "postgresql+psycopg://postgres@127.0.0.1:5432/test")}
    shares = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = _study_file(Path(tmp), "share", size=16, epochs=3, width=1.0, pruner="median", trials=4)
        cfg = load_study(str(path))
        dm = prepare_datamodule(cfg)
        for name, url in urls.items():
            storage = optuna.storages.RDBStorage(url or f"sqlite:///{tmp}/share.db", heartbeat_interval=60)
            timer = _TimedStorage(storage)
            study = create_or_load_study(storage, f"share-{time.time_ns()}", cfg, 3)
            runner = TrialRunner(cfg, dm, Devices("cpu", 1))
            timer.seconds = 0.0
            start = time.perf_counter()
            for _ in range(4):
                trial = study.ask()
                try:
                    study.tell(trial, runner(trial))
                except optuna.TrialPruned:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            shares[name] = timer.seconds / (time.perf_counter() - start)
    worst = max(shares.values())
    return {"summary": ", ".join(f"{k} {v:.2%}" for k, v in shares.items()), "target": "< 2% of trial time",
            "met": worst < 0.02, "shares": shares}


@CPU.register("pruning_pays")
def pruning_pays(args: argparse.Namespace) -> dict[str, Any]:
    """Target 4: epochs saved by pruning, and the final front's hypervolume against an unpruned run."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pruner in ("median", "none"):
            path = _study_file(Path(tmp), f"prune_{pruner}", size=8, epochs=6, width=0.5, pruner=pruner, trials=24)
            db = f"sqlite:///{tmp}/{pruner}.db"
            result = subprocess.run([sys.executable, "-m", "search.run", "--study", str(path), "--storage", db,
                                     "--runs-dir", tmp], cwd=REPO, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            study = optuna.load_study(study_name=f"prune_{pruner}", storage=db)
            trials = study.get_trials()
            epochs = sum(t.user_attrs.get("epochs_run", 0) for t in trials)
            hv = hypervolume(trials, ["val_accuracy", "flops"], study.user_attrs["reference_costs"])
            runs[pruner] = {"epochs": epochs, "hypervolume": hv,
                            "pruned": sum(t.state.name == "PRUNED" for t in trials)}
    saved = 1 - runs["median"]["epochs"] / runs["none"]["epochs"]
    hv_ratio = runs["median"]["hypervolume"] / runs["none"]["hypervolume"]
    return {"summary": f"{saved:.0%} epochs saved, hypervolume {hv_ratio:.3f} of unpruned",
            "target": ">= 40% epochs saved, hypervolume within 2%", "met": saved >= 0.4 and hv_ratio >= 0.98,
            "runs": runs, "epochs_saved": saved, "hypervolume_ratio": hv_ratio}


@GPU.register("overhead_gpu")
def overhead_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Target 2 on the GPU: se_placement's fast backbone on CIFAR-10 (JPEG copy), platform vs hand loop."""
    return _overhead(args, "se_placement", {"dataset": "imagefolder", "data_dir": args.data_dir}, torch.device("cuda"))


@GPU.register("trial_speed")
def trial_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Target 1: the se_placement default trial (standard SE, r16, avg everywhere) reaches >= 90% test
    accuracy within 10 s (model build + training, not the one-time data cache)."""
    result = _overhead(argparse.Namespace(repeats=1), "se_placement",
                       {"dataset": "imagefolder", "data_dir": args.data_dir}, torch.device("cuda"))
    seconds, acc = min(result["platform_seconds"]), result["platform_val_accuracy"]
    return {"summary": f"{seconds:.1f} s, val accuracy {acc:.4f}", "target": ">= 90% in <= 10 s",
            "met": acc >= 0.90 and seconds <= 10, **result}


@GPU.register("full_devices")
def full_devices(args: argparse.Namespace) -> dict[str, Any]:
    """Target 3: trials per hour with --trials-per-gpu 4 against 1, on one GPU."""
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 4):
            db = f"sqlite:///{tmp}/k{k}.db"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "search.run", "--study", "se_placement", "--dataset", "imagefolder",
                            "--data-dir", args.data_dir, "--trials", "8", "--epochs", "3", "--gpus", "0",
                            "--trials-per-gpu", str(k), "--storage", db, "--runs-dir", tmp], cwd=REPO, check=True,
                           capture_output=True)
            rates[k] = 8 / (time.perf_counter() - start) * 3600
    gain = rates[4] / rates[1]
    return {"summary": f"{rates[1]:.0f} vs {rates[4]:.0f} trials/h: {gain:.2f}x", "target": ">= 2x with K=4",
            "met": gain >= 2, "trials_per_hour": rates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="also run the GPU benchmarks")
    parser.add_argument("--only", action="append", help="run only this benchmark (repeatable)")
    parser.add_argument("--data-dir", default=str(SHARED_CIFAR), help="CIFAR-10 JPEG tree for the GPU benchmarks")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    registries = [CPU, GPU] if args.gpu else [CPU]
    chosen = [(name, reg.get(name)) for reg in registries for name in reg if not args.only or name in args.only]
    unknown = set(args.only or ()) - {n for n, _ in chosen}
    if unknown:
        print(f"error: unknown benchmark(s) {sorted(unknown)}; known: {[*CPU, *GPU]}", file=sys.stderr)
        return 2
    results = []
    for name, bench in chosen:
        print(f"== {name}", flush=True)
        try:
            result = {"name": name, **bench(args)}
        except Exception as e:  # a broken benchmark is recorded as such, the others still run
            result = {"name": name, "summary": f"error: {type(e).__name__}: {e}"[:300], "target": "-", "met": None}
        print(f"   {result['summary']}  (target {result['target']})", flush=True)
        results.append(result)
    print(f"results: {write_results(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
