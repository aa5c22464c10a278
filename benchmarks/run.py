"""``python -m benchmarks.run [--gpu] [--only NAME]``: measure the performance targets and record them.

Each benchmark returns a dict with ``name``, ``summary``, ``target``, ``met`` and its raw numbers; the run
is written to ``benchmarks/results/<date>-<device>.json`` and the table in ``benchmarks/README.md`` is
rebuilt from every stored run. CPU benchmarks run everywhere; ``--gpu`` adds the GPU ones; ``--gpu
--dry-run`` runs only the GPU ones, on the CPU at toy size, to check them before a GPU machine is used. The
exit status is 1 when a benchmark broke (its error is recorded with the others' results).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmarks import accuracy, cpu, gpu  # noqa: F401  (importing registers the benchmarks)
from benchmarks.harness import CPU, GPU, LONG, SHARED_CIFAR
from benchmarks.record import RESULTS_DIR, current_commit, device_label, write_results
from search.errors import UsageError, at_least
from search.study_config import find_study_file
from search.worker import quiet_trial_logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="also run the GPU benchmarks")
    parser.add_argument("--only", action="append", help="run only this benchmark (repeatable)")
    parser.add_argument("--data-dir", default=str(SHARED_CIFAR), help="CIFAR-10 JPEG tree for the GPU benchmarks")
    parser.add_argument("--study", default="se_placement",
                        help="study (name or file) whose default trial trial_accuracy trains (default se_placement)")
    parser.add_argument("--seeds", type=at_least(0), nargs="+", default=[0],
                        help="trial_accuracy trains one run per seed and judges their mean (default: 0)")
    parser.add_argument("--repeats", type=at_least(1), help="alternating (ABBA) hand-written/platform pairs of "
                        f"overhead_cpu and overhead_gpu/trial_speed (default {cpu.OVERHEAD_PAIRS} on the CPU, "
                        f"{gpu.GPU_PLAN.overhead_pairs} on the GPU, {gpu.DRY.overhead_pairs} with --dry-run)")
    parser.add_argument("--trials-per-gpu", type=at_least(1), default=4, help="workers on the GPU for whole_study")
    parser.add_argument("--study-seconds", type=float, default=900, help="whole_study is stopped after this")
    parser.add_argument("--sweep-seconds", type=at_least(0, float),
                        help="recipe_sweep starts no variant after this many seconds (default: all variants)")
    parser.add_argument("--results-dir", type=Path, help=f"where the results JSON goes (default: {RESULTS_DIR}; "
                        "only that one's results enter the README table)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run (only) the GPU benchmarks' code on the CPU at toy size (one epoch, a few trials) to "
                             "check them before a GPU run; results go to a new temporary directory unless "
                             "--results-dir is given, and never into the README table")
    args = parser.parse_args(argv)
    if args.dry_run and args.results_dir is None:
        args.results_dir = Path(tempfile.mkdtemp(prefix="bench-dry-"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_trial_logs()  # trials run in this process are configured as a worker runs them
    registries = [GPU] if args.dry_run else [CPU, GPU] if args.gpu else [CPU]
    available = {name: reg.get(name) for reg in registries for name in reg}
    unknown = set(args.only or ()) - set(available) - set(LONG)
    if unknown:
        print(f"error: unknown benchmark(s) {sorted(unknown)}; known: {[*CPU, *GPU, *LONG]}", file=sys.stderr)
        return 2
    try:  # a typo in --study fails here, not an hour into trial_accuracy
        find_study_file(args.study)
    except UsageError as e:
        print(f"error: --study: {e}", file=sys.stderr)
        return 2
    # Named benchmarks run in the order named (a short GPU lease puts the targets first); LONG ones only then.
    names = list(dict.fromkeys(args.only)) if args.only else list(available)
    chosen = [(name, available[name] if name in available else LONG.get(name)) for name in names]
    results: list[dict[str, Any]] = []
    path = None
    # The code measured is the code at the start: a long run must not take a commit made while it ran.
    commit = current_commit()
    for name, bench in chosen:
        print(f"== {name}", flush=True)
        stop = False
        try:
            result = {"name": name, **bench(args)}
            stop = bool(result.get("stopped"))  # it kept its finished part of an interrupted run
        except KeyboardInterrupt:  # Ctrl-C or a time limit's SIGINT: keep what was measured so far
            result = {"name": name, "summary": "stopped before it finished", "target": "-", "met": None}
            stop = True
        except Exception as e:  # a broken benchmark is recorded as such, the others still run
            result = {"name": name, "summary": f"error: {type(e).__name__}: {e}"[:300], "target": "-", "met": None}
        # Where it ran, unless it said so itself: CPU benchmarks on the CPU even in a GPU machine's run.
        gpu_row = name not in CPU and not args.dry_run and torch.cuda.is_available()
        result.setdefault("ran_on", device_label("cuda" if gpu_row else "cpu"))
        print(f"   {result['summary']}  (target {result['target']})", flush=True)
        results.append(result)
        # After every benchmark, so a cut-short run still leaves its results.
        path = write_results(results, path, args.results_dir, commit, **({"dry_run": True} if args.dry_run else {}))
        if stop:
            break
    print(f"results: {path}")
    # Non-zero when a benchmark broke, so a dry run (or a script) can tell; its error is in the results.
    return 1 if any(r["summary"].startswith("error:") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
