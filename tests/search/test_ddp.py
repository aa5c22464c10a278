"""One trial over several devices: Lightning DDP with the worker as rank 0, proven on the CPU (gloo).

The same code path serves ``--gpus-per-trial N`` on GPUs (NCCL); here two CPU processes per trial
(``--procs-per-trial 2``) train real networks with real collectives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.storage import open_storage
from search.study_config import load_study
from search.study_store import create_or_load_study
from search.worker import WorkerSpec, run_worker
from tests.search.helpers import load, run_cli, tiny_study

pytestmark = pytest.mark.slow


def test_ddp_cpu_trial_two_processes_completes_once(tmp_path: Path) -> None:
    """End to end: each trial trains on two ranks, and only rank 0 talks to the study. Lightning's default
    DDP launcher would re-run the worker command for rank 1, which would ask for trials of its own: the
    study holding exactly the requested trials, each trained by both ranks, shows that did not happen."""
    study_file = tiny_study(tmp_path, training={"epochs": 2}, trials=2)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    result = run_cli("search.run", "--study", str(study_file), "--storage", url, "--runs-dir", str(tmp_path / "runs"),
                     "--workers", "1", "--procs-per-trial", "2", "--poll", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 DDP processes per trial" in result.stdout
    trials = load(url, "tiny").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        assert t.user_attrs["ddp_world_size"] == 2
        assert t.user_attrs["ddp_rank_epochs"] == [2, 2]
        assert len(t.user_attrs["val_accuracy_curve"]) == 2
        assert 0.0 <= t.user_attrs["test_accuracy"] <= 1.0


def test_ddp_pruned_trial_stops_on_every_rank(tmp_path: Path) -> None:
    """A pruner that prunes every trial after its first epoch (accuracy can never reach 1.1): rank 0 decides,
    broadcasts, and both ranks stop after epoch 1 of 4; the helper reports back, so none is left training."""
    study_file = tiny_study(tmp_path, training={"epochs": 4}, objectives=["val_accuracy"], trials=1,
                            pruner={"name": "threshold", "options": {"lower": 1.1}})
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    create_or_load_study(open_storage(url, heartbeat_interval=None), "tiny", load_study(str(study_file)), 3)
    run_worker(WorkerSpec(study=str(study_file), study_name="tiny", storage=url, trials=1, devices=2,
                          heartbeat_interval=None))
    (trial,) = load(url, "tiny").trials
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["pruned_reason"] == "pruned after epoch 1"
    assert trial.user_attrs["ddp_rank_epochs"] == [1, 1]
    assert len(trial.intermediate_values) == 1  # one report: after the first epoch


def test_ddp_trains_frozen_bn_scales_and_a_whitening_stem(tmp_path: Path) -> None:
    """Frozen parameters under DDP: the recipe freezes the BN scales before DDP wraps the network (frozen
    after, DDP would wait for their gradients and fail the second step) and every rank fits the whitening
    stem on the same images."""
    study_file = tiny_study(tmp_path, backbone="fastnet_whiten", trials=1,
                            training={"epochs": 2, "freeze_bn_scale": True, "bn_bias_lr_scale": 64},
                            search_space={"width_multiplier": [0.125], "placement": ["standard"], "reduction": [4]})
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    runs = tmp_path / "runs"
    result = run_cli("search.run", "--study", str(study_file), "--storage", url, "--runs-dir", str(runs),
                     "--workers", "1", "--procs-per-trial", "2", "--poll", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    (trial,) = load(url, "tiny").trials
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["ddp_rank_epochs"] == [2, 2]
