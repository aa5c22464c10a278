"""``trial_accuracy`` end to end on a few CIFAR-10 JPEGs: the study's default trial through the hand loop, every
test-time augmentation scored on the same weights, at the precision the machine has native kernels for."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import accuracy, run
from benchmarks.baseline import native_bf16
from lightning_modules.classifier import TTA_MODES
from tests.conftest import REPO, small_cifar

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_flagship(tmp_path: Path) -> tuple[Path, dict]:
    """se_placement at one epoch and batch 32, and a few CIFAR-10 JPEGs to train it on."""
    small_cifar(tmp_path / "cifar", train_per_class=16, test_per_class=4)
    spec = yaml.safe_load((REPO / "studies/se_placement.yaml").read_text())
    spec["training"] |= {"epochs": 1, "batch_size": 32}
    study = tmp_path / "tiny_se_placement.yaml"
    study.write_text(yaml.safe_dump(spec))
    return study, spec


def test_trial_accuracy_scores_every_tta_on_the_same_weights_at_the_native_precision(tmp_path: Path) -> None:
    study, spec = _tiny_flagship(tmp_path)

    result = accuracy.trial_accuracy(argparse.Namespace(study=str(study), data_dir=str(tmp_path / "cifar"),
                                                        seeds=[0, 1]))

    # A CPU without bf16 kernels (AVX2 only, as some of our CI machines) emulates bf16 16x slower: fp32 there.
    assert result["precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    assert result["precision"] in result["summary"]
    assert sorted(result["test_accuracy"]) == sorted(TTA_MODES) == sorted(result["val_curves"])
    assert all(0.0 <= acc <= 1.0 for acc in result["test_accuracy"].values())
    assert all(len(curve) == 1 for curve in result["val_curves"].values())
    # One run per seed; the figures and the verdict are their means.
    assert result["seeds"] == [0, 1] and sorted(result["by_seed"]) == [0, 1]
    runs = result["by_seed"].values()
    for tta in TTA_MODES:
        assert result["test_accuracy"][tta] == pytest.approx(sum(r["test_accuracy"][tta] for r in runs) / 2)
        by_epoch = zip(*(r["val_curves"][tta] for r in runs), strict=True)
        assert result["val_curves"][tta] == pytest.approx([sum(epoch) / 2 for epoch in by_epoch])
    assert "mean of seeds 0, 1" in result["summary"]
    assert result["met"] == (result["test_accuracy"][spec["training"]["tta"]] >= 0.90)


def test_an_interrupted_multi_seed_run_records_the_seeds_it_finished(tmp_path: Path, monkeypatch) -> None:
    """A seed is an hour on a CPU: Ctrl-C during the second must not throw the first away."""
    study, _ = _tiny_flagship(tmp_path)
    epochs_seen = []

    def interrupt_in_the_second_seed(epoch: int, val_accuracy: float) -> None:
        epochs_seen.append(epoch)
        if len(epochs_seen) == 2:  # one epoch a seed: this is seed 1's
            raise KeyboardInterrupt

    monkeypatch.setattr(accuracy, "_progress", interrupt_in_the_second_seed)
    # The benchmark named after it must not start: Ctrl-C stops the run, as for any other benchmark.
    later = []
    monkeypatch.setitem(run.CPU._entries, "overhead_cpu", lambda args: later.append(args) or {})
    code = run.main(["--only", "trial_accuracy", "--only", "overhead_cpu", "--study", str(study),
                     "--data-dir", str(tmp_path / "cifar"), "--seeds", "0", "1", "2",
                     "--results-dir", str(tmp_path / "results")])

    assert code == 0
    assert len(epochs_seen) == 2 and later == []  # neither seed 2 nor the next benchmark started
    [saved] = (tmp_path / "results").glob("*.json")
    [result] = json.loads(saved.read_text())["results"]
    assert result["name"] == "trial_accuracy" and result["stopped"] is True
    assert result["seeds"] == [0] and list(result["by_seed"]) == ["0"]
    assert result["test_accuracy"] == result["by_seed"]["0"]["test_accuracy"]
    assert "stopped during seed 1: seeds 0 of [0, 1, 2]" in result["summary"]


def test_an_interrupt_before_any_seed_finished_is_recorded_as_stopped(tmp_path: Path, monkeypatch) -> None:
    study, _ = _tiny_flagship(tmp_path)

    def interrupt(epoch: int, val_accuracy: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(accuracy, "_progress", interrupt)
    code = run.main(["--only", "trial_accuracy", "--study", str(study), "--data-dir", str(tmp_path / "cifar"),
                     "--seeds", "0", "1", "--results-dir", str(tmp_path / "results")])

    assert code == 0
    [saved] = (tmp_path / "results").glob("*.json")
    [result] = json.loads(saved.read_text())["results"]
    assert result["summary"] == "stopped before it finished" and result["met"] is None
