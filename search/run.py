"""``python -m search.run --study se_placement``: run an Optuna study of SE networks to the end.

Validates everything first (study file, flags, storage, devices, data) so bad input exits with one line and
code 2 before anything is written; then creates or resumes the study, starts one worker process per device
slot, shows progress, and prints the Pareto front of validation accuracy against FLOPs with its hypervolume.

Many machines: run the same command with the same PostgreSQL (or MySQL) ``--storage`` on each; every
machine's workers join the study by name and together stop at ``--trials`` finished trials. A crashed run
resumes by running the command again: trials whose worker died are failed once their heartbeat is older
than the grace period and retried with the same parameters and seed. Ctrl-C (or SIGTERM) stops the workers
cleanly, marking their running trials FAIL with the reason, and exits with code 130. Storage passwords are
masked in everything printed or logged, and reach the workers on standard input, not their command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from search.errors import UsageParser, at_least, cli_main

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="python -m search.run", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, help="study name in studies/ or a path to a study file")
    p.add_argument("--study-name", help="name of the study in the storage (default: the file's name plus overrides)")
    p.add_argument("--storage", help="SQLAlchemy URL (default: $SE_SEARCH_STORAGE or sqlite:///RUNS/studies.db)")
    p.add_argument("--runs-dir", help="directory for the default SQLite file and worker logs (default: ./runs)")
    p.add_argument("--trials", type=at_least(1),
                   help="total finished trials the study should hold (overrides the file)")
    p.add_argument("--epochs", type=at_least(1), help="epochs per trial (overrides the study file)")
    p.add_argument("--dataset", help="dataset name (overrides the study file)")
    p.add_argument("--data-dir", help="where the dataset lives (overrides the study file and $SE_SEARCH_DATA_DIR)")
    p.add_argument("--seed", type=int, help="study seed (overrides the study file)")
    p.add_argument("--gpus", help="'all' or GPU indices like 0,1 (default: all GPUs when CUDA is present)")
    p.add_argument("--trials-per-gpu", type=at_least(1), default=1, help="worker processes per GPU (default 1)")
    p.add_argument("--workers", type=at_least(1), help="CPU worker processes when no GPU is used (default 1)")
    p.add_argument("--gpus-per-trial", type=at_least(1), default=1,
                   help="train each trial with DDP over N GPUs; N must divide the GPUs used (default 1)")
    p.add_argument("--procs-per-trial", type=at_least(1), default=1,
                   help="CPU runs: train each trial with DDP over N CPU processes on gloo (default 1)")
    p.add_argument(
        "--heartbeat-interval",
        type=at_least(0),
        default=60,
        help="seconds between trial heartbeats; 0 disables crash detection (default 60)",
    )
    p.add_argument("--grace-period", type=at_least(1),
                   help="seconds without heartbeat before a trial is failed and retried")
    p.add_argument("--rerun-trial", type=int, metavar="N", help="retrain stored trial N and compare its accuracy")
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    return p


def _run(args: argparse.Namespace) -> int:
    # Imported only once the flags have parsed, and in two steps: the study file is checked with torch alone
    # (its registries), before search.study_run imports Lightning and torchmetrics (several seconds more).
    from search.study_config import load_study

    # The flags that override the study file (None: the file's value); --trials is not part of the
    # study's default name.
    overrides = {"dataset": args.dataset, "data_dir": args.data_dir, "epochs": args.epochs, "seed": args.seed}
    cfg = load_study(args.study, trials=args.trials, **overrides)
    from search.study_run import run

    return run(args, cfg, overrides)


def main(argv: list[str] | None = None) -> int:
    return cli_main(_run, build_parser(), argv)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
