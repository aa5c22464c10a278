"""``python -m benchmarks.run [--gpu] [--only NAME]``: measure the performance targets and record them.

Each benchmark returns a dict with ``name``, ``summary``, ``target``, ``met`` and its raw numbers; the run
is written to ``benchmarks/results/<date>-<device>.json`` and the table in ``benchmarks/README.md`` is
rebuilt from every stored run. CPU benchmarks run everywhere; ``--gpu`` adds the GPU ones.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import optuna

from benchmarks import cpu, gpu  # noqa: F401  (importing registers the benchmarks)
from benchmarks.harness import CPU, GPU, SHARED_CIFAR
from benchmarks.record import write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="also run the GPU benchmarks")
    parser.add_argument("--only", action="append", help="run only this benchmark (repeatable)")
    parser.add_argument("--data-dir", default=str(SHARED_CIFAR), help="CIFAR-10 JPEG tree for the GPU benchmarks")
    parser.add_argument("--repeats", type=int, default=3, help="alternating platform/hand-written pairs (min taken)")
    parser.add_argument("--trials-per-gpu", type=int, default=4, help="workers on the GPU for whole_study")
    parser.add_argument("--study-seconds", type=float, default=900, help="whole_study is stopped after this")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    registries = [CPU, GPU] if args.gpu else [CPU]
    chosen = [(name, reg.get(name)) for reg in registries for name in reg if not args.only or name in args.only]
    unknown = set(args.only or ()) - {n for n, _ in chosen}
    if unknown:
        print(f"error: unknown benchmark(s) {sorted(unknown)}; known: {[*CPU, *GPU]}", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    path = None
    for name, bench in chosen:
        print(f"== {name}", flush=True)
        stop = False
        try:
            result = {"name": name, **bench(args)}
        except KeyboardInterrupt:  # Ctrl-C or a time limit's SIGINT: keep what was measured so far
            result = {"name": name, "summary": "stopped before it finished", "target": "-", "met": None}
            stop = True
        except Exception as e:  # a broken benchmark is recorded as such, the others still run
            result = {"name": name, "summary": f"error: {type(e).__name__}: {e}"[:300], "target": "-", "met": None}
        print(f"   {result['summary']}  (target {result['target']})", flush=True)
        results.append(result)
        path = write_results(results, path)  # after every benchmark, so a cut-short run still leaves its results
        if stop:
            break
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
