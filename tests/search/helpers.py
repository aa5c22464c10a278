"""Running the real command lines in subprocesses, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

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


def run_cli(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)
