"""``trial_accuracy`` end to end on a few CIFAR-10 JPEGs: the study's default trial through the hand loop, every
test-time augmentation scored on the same weights, at the precision the machine has native kernels for."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import accuracy
from benchmarks.baseline import native_bf16
from lightning_modules.classifier import TTA_MODES
from tests.conftest import REPO, small_cifar

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_trial_accuracy_scores_every_tta_on_the_same_weights_at_the_native_precision(tmp_path: Path) -> None:
    small_cifar(tmp_path / "cifar", train_per_class=16, test_per_class=4)
    spec = yaml.safe_load((REPO / "studies/se_placement.yaml").read_text())
    spec["training"] |= {"epochs": 1, "batch_size": 32}
    study = tmp_path / "tiny_se_placement.yaml"
    study.write_text(yaml.safe_dump(spec))

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
