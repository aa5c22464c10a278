"""One trial over several devices: Lightning DDP with the worker as rank 0, proven on the CPU (gloo).

The same code path serves ``--gpus-per-trial N`` on GPUs (NCCL); here two CPU processes per trial
(``--procs-per-trial 2``) train real networks with real collectives.
"""

from __future__ import annotations

import functools
import gc
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import torch.distributed as dist
from optuna.trial import TrialState

from lightning_modules.classifier import SEClassifier
from search import ddp, objective
from search.data import data_config, prepare_datamodule, ready_datamodule
from search.pruning import PruningCallback
from search.storage import open_storage
from search.study_config import load_study
from search.study_store import create_or_load_study
from search.worker import FAIL_REASON_ATTR, WorkerSpec, run_worker
from tests.search.helpers import load, run_cli, tiny_study

pytestmark = pytest.mark.slow

# The helper-rank functions below run in the spawned helper processes, which import them from this module.


class _OutOfMemoryAtSecondBatch(PruningCallback):
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 1:  # after a step's collectives: rank 0 is training, not waiting to rendezvous
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated, rank 1)")


def _failing_helper_fit(accelerator: str, world_size: int, design: Any, seed: int, datamodule: Any,
                        strategy: Any) -> dict[str, Any]:
    """``_helper_rank_fit`` that fails trial 0 (seed 0) mid-training with CUDA out of memory, and trial 1 while
    setting up its device, before its process group forms; trial 2 trains."""
    if seed == 1:
        raise RuntimeError("CUDA error: no CUDA-capable device is detected (simulated, rank 1)")
    callback = _OutOfMemoryAtSecondBatch(None, None) if seed == 0 else PruningCallback(None, None)
    return objective.train_and_test(design, seed, datamodule, accelerator=accelerator, devices=world_size,
                                    strategy=strategy, callback=callback)


def _counting_helper_fit(design: Any, seed: int, datamodule: Any, strategy: Any) -> dict[str, Any]:
    """``_helper_rank_fit`` that first counts the models this helper still holds from earlier trials."""
    held = sum(isinstance(o, SEClassifier) for o in gc.get_objects())
    return {**objective._helper_rank_fit("cpu", 2, design, seed, datamodule, strategy), "models_held": held}


def _no_data() -> None:
    return None


def _port_probe(design: Any, seed: int, datamodule: Any, strategy: Any) -> dict[str, Any]:
    """What a concurrent trial on this host would do once the port is handed over: try to take it."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", strategy.cluster_environment.main_port))
        except OSError:
            return {"port_taken": True}
    return {"port_taken": False}


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


def test_ddp_helper_failure_fails_the_trial_with_its_error_and_the_worker_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper rank that fails ends rank 0's trial at once with the helper's own error: CUDA out of memory on
    a helper is recorded as out of memory, as on rank 0 (rank 0 used to see only gloo's "Connection closed by
    peer", and under NCCL to wait in the all-reduce until its watchdog killed the worker). A helper failing
    before the process group forms used to leave rank 0 waiting DDP_TIMEOUT in the rendezvous (shortened here,
    so that wait shows as a slow trial, not as a hung test). The worker restarts its helpers and goes on."""
    monkeypatch.setattr(objective, "_helper_rank_fit", _failing_helper_fit)
    monkeypatch.setattr(ddp, "DDP_TIMEOUT", timedelta(seconds=90))
    study_file = tiny_study(tmp_path, trials=1)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    create_or_load_study(open_storage(url, heartbeat_interval=None), "tiny", load_study(str(study_file)), 3)
    run_worker(WorkerSpec(study=str(study_file), study_name="tiny", storage=url, trials=1, devices=2,
                          heartbeat_interval=None))
    oom, no_device, trained = load(url, "tiny").trials
    assert oom.state == TrialState.FAIL
    assert oom.user_attrs[FAIL_REASON_ATTR] == "CUDA out of memory. Tried to allocate 2.00 GiB (simulated, rank 1)"
    assert no_device.state == TrialState.FAIL
    assert no_device.datetime_complete - no_device.datetime_start < timedelta(seconds=45)  # restarting helpers too
    assert no_device.user_attrs[FAIL_REASON_ATTR] == (
        "RuntimeError: CUDA error: no CUDA-capable device is detected (simulated, rank 1)")
    assert "DDP rank 1 failed" in no_device.user_attrs["traceback"]  # the helper's own traceback, as the cause
    assert trained.state == TrialState.COMPLETE and trained.user_attrs["ddp_rank_epochs"] == [1, 1]


def test_ddp_helper_frees_each_trials_memory(tmp_path: Path) -> None:
    """A helper rank frees memory after every trial as rank 0 does: it used to hold every earlier trial's models
    (kept alive by reference cycles until a collection happened to run), on a GPU their memory too."""
    cfg = load_study(str(tiny_study(tmp_path, search_space={"width_multiplier": [0.25], "placement": ["standard"],
                                                            "reduction": [4]})))
    datamodule = prepare_datamodule(cfg)
    ranks = ddp.RankGroup(2, "cpu", functools.partial(ready_datamodule, data_config(cfg)), _counting_helper_fit,
                          threads=1)
    runner = objective.TrialRunner(cfg, datamodule, objective.Devices("cpu", 1))
    held = []
    try:
        for seed in range(3):
            design = runner.design(optuna.trial.FixedTrial({}, seed))
            _, (summary,) = ranks.run_trial(design, seed, lambda strategy, design=design, seed=seed:
                                            objective.train_and_test(design, seed, datamodule, accelerator="cpu",
                                                                     devices=2, strategy=strategy,
                                                                     callback=PruningCallback(None, None)))
            held.append(summary["models_held"])
    finally:
        ranks.close()
    assert held == [0, 0, 0]


def test_ddp_trial_after_a_failed_rendezvous_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0's rendezvous fails (here: nobody joins it): the next trial, with restarted helpers, still trains.
    The failed rendezvous had counted a process group, so rank 0 used to name its next group "1" where the
    new helpers named theirs "0", and every later trial of the worker waited out DDP_TIMEOUT (shortened here)."""
    monkeypatch.setattr(ddp, "DDP_TIMEOUT", timedelta(seconds=20))
    cfg = load_study(str(tiny_study(tmp_path, search_space={"width_multiplier": [0.25], "placement": ["standard"],
                                                            "reduction": [4]})))
    datamodule = prepare_datamodule(cfg)
    design = objective.TrialRunner(cfg, datamodule, objective.Devices("cpu", 1)).design(
        optuna.trial.FixedTrial({}, 0))
    ranks = ddp.RankGroup(2, "cpu", functools.partial(ready_datamodule, data_config(cfg)),
                          functools.partial(objective._helper_rank_fit, "cpu", 2), threads=1)
    nobody = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    try:
        with pytest.raises(dist.DistStoreError):
            ranks.run_trial(design, 0, lambda strategy: dist.init_process_group(
                "gloo", store=nobody, rank=0, world_size=2, timeout=timedelta(seconds=1)))
        result, (helper,) = ranks.run_trial(design, 1, lambda strategy: objective.train_and_test(
            design, 1, datamodule, accelerator="cpu", devices=2, strategy=strategy,
            callback=PruningCallback(None, None)))
    finally:
        ranks.close()
    assert result["epochs_run"] == helper["epochs_run"] == 1


def test_ddp_port_is_taken_before_helpers_learn_it() -> None:
    """Rank 0's rendezvous store listens before the helpers are sent its port, so a concurrent trial on this
    host cannot take that port. A port found free, closed and handed over used to be bound only once rank 0's
    training started: another process (here the helper itself, at once) could bind it first."""
    ranks = ddp.RankGroup(2, "cpu", _no_data, _port_probe, threads=1)
    try:
        _, (summary,) = ranks.run_trial(None, 0, lambda strategy: None)
    finally:
        ranks.close()
    assert summary == {"port_taken": True}
