"""Benchmarks too long for every run (``python -m benchmarks.run --only NAME``)."""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import optuna
import torch

from benchmarks.baseline import hand_written_fit, native_bf16
from benchmarks.harness import LONG, default_params
from benchmarks.record import device_label
from lightning_modules.recipe import TTA_MODES
from search.data import prepare_datamodule
from search.objective import Devices, TrialRunner
from search.study_config import load_study


def _progress(epoch: int, val_accuracy: float) -> None:
    print(f"trial_accuracy: epoch {epoch + 1}: val accuracy {val_accuracy:.4f}", file=sys.stderr, flush=True)


@LONG.register("trial_accuracy")
def trial_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """The accuracy half of target 1 on whatever machine runs it: ``--study``'s default trial (se_placement's:
    fastnet_whiten, its recipe, standard SE) through the hand loop in bf16 (below) on the CIFAR-10 JPEG copy, validation
    accuracy after every epoch and test accuracy at the end, each under every test-time augmentation of
    ``TTA_MODES`` (the same weights). Accuracy does not depend on the device beyond rounding, so a machine
    without a GPU can say whether the recipe reaches 90% in its epochs; on 2 CPU cores it takes 1-2.5 hours a
    seed. ``--seeds`` trains each given seed (default 0); accuracies and curves are their means, the verdict is
    on the mean, and ``by_seed`` keeps each run. Stopped (Ctrl-C, SIGINT) after a seed finished, it returns the
    finished seeds' result marked ``stopped``, so hours of training are not lost to a cut-short run.
    A CPU without native bf16 kernels trains in fp32 instead (``native_bf16``), and the result says so: fp32
    accuracy is close to bf16's but not the same measurement."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cfg = load_study(args.study, dataset="imagefolder", data_dir=args.data_dir)
    dm = prepare_datamodule(cfg)
    design = TrialRunner(cfg, dm, Devices(device.type, 1)).design(optuna.trial.FixedTrial(default_params(cfg)))
    recipe = design.recipe
    others = tuple(tta for tta in TTA_MODES if tta != recipe.tta)
    bf16 = native_bf16(device)
    precision = "bf16" if bf16 else "fp32"
    seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would repeat the same run
    by_seed = {}
    stopped_at = None
    for seed in seeds:
        try:
            r = hand_written_fit(design.arch, recipe, dm, device, seed=seed, bf16=bf16, also_tta=others,
                                 on_epoch=_progress)
        except KeyboardInterrupt:  # Ctrl-C or a time limit: an hour-long seed already done is kept
            if not by_seed:
                raise
            stopped_at = seed
            break
        # hand_written_fit names the recipe's own TTA plainly and the others with a suffix.
        by_seed[seed] = {"test_accuracy": {tta: r["test_accuracy" if tta == recipe.tta else f"test_accuracy_{tta}"]
                                           for tta in TTA_MODES},
                         "val_curves": {tta: r["val_curve" if tta == recipe.tta else f"val_curve_{tta}"]
                                        for tta in TTA_MODES},
                         "seconds": r["seconds"]}
    # One seed is one draw: two runs of one recipe have differed by 0.3 points, so the verdict is on the mean.
    runs = list(by_seed.values())
    accuracy = {tta: statistics.fmean(run["test_accuracy"][tta] for run in runs) for tta in TTA_MODES}
    curves = {tta: [statistics.fmean(epoch) for epoch in zip(*(run["val_curves"][tta] for run in runs), strict=True)]
              for tta in TTA_MODES}
    by_epoch = ", ".join(f"{a:.3f}" for a in curves["none"])
    by_tta = ", ".join(f"{accuracy[tta]:.4f} with tta {tta}" for tta in TTA_MODES)
    done = list(by_seed)
    seed_remarks = ""  # which seeds the figures are the mean of, and where a stopped run stopped
    if len(done) > 1:
        each = ", ".join(f"{run['test_accuracy'][recipe.tta]:.4f}" for run in runs)
        seed_remarks = f" (mean of seeds {', '.join(map(str, done))}; tta {recipe.tta} by seed {each})"
    if stopped_at is not None:
        seed_remarks += f" (stopped during seed {stopped_at}: seeds {', '.join(map(str, done))} of {seeds})"
    return {"summary": f"{cfg.name} ({cfg.backbone}, lr {recipe.lr:g}, label smoothing {recipe.label_smoothing:g}): "
                       f"test accuracy {by_tta}{seed_remarks}, after {recipe.epochs} epochs (study recipe: tta "
                       f"{recipe.tta}); {precision}{'' if bf16 else ' (no native bf16 here)'} on {device.type}; "
                       f"val by epoch (no tta) {by_epoch}",
            "target": ">= 90% test accuracy (target 1's accuracy)", "met": accuracy[recipe.tta] >= 0.90,
            "device": str(device), "ran_on": device_label(str(device)), "precision": precision, "study": cfg.name,
            "arch": str(design.arch), "recipe": str(recipe), "seeds": done, "stopped": stopped_at is not None,
            "test_accuracy": accuracy, "val_curves": curves, "by_seed": by_seed,
            "seconds": sum(run["seconds"] for run in runs)}
