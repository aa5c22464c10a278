"""Running the real command lines in subprocesses, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import yaml

from tests.conftest import REPO

T = TypeVar("T")

QUICK_STUDY = """
# A tiny net on 8x8 digits: a trial takes about a second on two cores.
description: quick test study on digits
backbone: resnet20
data: {dataset: digits, val_size: 0.2, image_size: 8}
training: {epochs: 1, batch_size: 128, lr: 0.1, schedule: onecycle}
search_space:
  width_multiplier: [0.25]
  placement: [none, standard, pre, post, identity]
  reduction: [4, 16]
  pooling: [avg, max]
objectives: [val_accuracy, flops]
sampler: {name: tpe}
pruner: {name: median, options: {n_startup_trials: 2, n_warmup_steps: 1}}
trials: 3
seed: 0
"""


def write_study(tmp_path: Path, text: str = QUICK_STUDY, name: str = "quick") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def run_cli(module: str, *args: str, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)


# The smallest real study, for the reliability tests (crashes, faults, DDP, concurrency): QUICK_STUDY's tiny
# network with a random sampler, no pruning and avg pooling only; about 0.3 s per epoch on two idle cores.
# Change it with ``tiny_study``.
def _tiny_study_text() -> str:
    data = yaml.safe_load(QUICK_STUDY)
    data["search_space"].pop("pooling")
    data.update(description="tiny reliability test study on digits", sampler={"name": "random"},
                pruner={"name": "none"}, trials=4)
    return yaml.safe_dump(data, sort_keys=False)


TINY_STUDY = _tiny_study_text()


def tiny_study(tmp_path: Path, name: str = "tiny", **changes: Any) -> Path:
    """TINY_STUDY with top-level keys replaced and sections merged (``training={"epochs": 5}``), written
    to ``tmp_path/<name>.yaml``."""
    data = yaml.safe_load(TINY_STUDY)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return write_study(tmp_path, yaml.safe_dump(data, sort_keys=False), name)


def start_cli(module: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a command line in its own session (process group), as a terminal would: ``os.killpg`` then
    reaches it and every worker, like Ctrl-C. Output goes to ``log`` (a pipe could fill and block it)."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, poll: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def worker_logs(runs: Path, name: str) -> str:
    """Everything the study's workers wrote (runs/logs/<study>/worker-*.log)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted((runs / "logs" / name).glob("worker-*.log")))


def states(study: optuna.Study) -> Counter[str]:
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))
