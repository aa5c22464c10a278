"""Studies written with Optuna directly, in the engine's stored schema, for fast tests of readers.

Trials carry the attributes ``search.objective`` and ``search.worker`` store (costs, seed, per-stage
choices, the validation curve, test accuracy, failure reason); the real engine's output is tested
separately against a study it ran for real.
"""

from __future__ import annotations

import json
import random
import warnings
from datetime import datetime, timedelta

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

PLACEMENTS = ["none", "standard", "pre", "post", "identity"]
REDUCTIONS = [4, 16]
POOLINGS = ["avg", "max"]
STAGES = 3
START = datetime(2025, 1, 1, 12, 0, 0)


def _definition(tie: bool, placements: list[str], reductions: list[int], poolings: list[str],
                objectives: list[str]) -> str:
    return json.dumps({"search_space": {"tie_stages": tie, "placement": placements, "reduction": reductions,
                                        "pooling": poolings}, "objectives": objectives}, sort_keys=True)


def _add(study: optuna.Study, number: int, state: TrialState, params: dict, distributions: dict,
         attrs: dict, values: list[float] | None) -> None:
    start = START + timedelta(minutes=number)
    study.add_trial(optuna.trial.FrozenTrial(
        number=number, state=state, value=None, values=values, datetime_start=start,
        datetime_complete=start + timedelta(seconds=30 + number) if state.is_finished() else None,
        params=params, distributions=distributions, user_attrs=attrs, system_attrs={}, intermediate_values={},
        trial_id=number))


def _cost(placements: list[str], reductions: list[int], width: float = 1.0) -> dict[str, int]:
    se = sum(1000 * (i + 1) // r for i, (p, r) in enumerate(zip(placements, reductions, strict=True)) if p != "none")
    macs = int((1_000_000 + se) * width)
    return {"macs": macs, "flops": 2 * macs, "params": int((50_000 + 10 * se) * width)}


def per_stage_study(storage: str | None = None, name: str = "se_placement-dataset=digits", seed: int = 0,
                    complete: int = 8, with_lr: bool = True) -> optuna.Study:
    """A multi-objective (accuracy, FLOPs) per-stage study: ``complete`` completed trials, then one pruned,
    one failed while training, one failed before its network was built, and one running."""
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy", "flops"])
    study.set_user_attr("definition", _definition(False, PLACEMENTS, REDUCTIONS, POOLINGS, ["val_accuracy", "flops"]))
    study.set_user_attr("study_file_name", name.split("-")[0])
    study.set_user_attr("objectives", ["val_accuracy", "flops"])
    study.set_user_attr("reference_costs", {"flops": 4_000_000.0, "macs": 2_000_000.0, "params": 200_000.0})
    study.set_user_attr("git_revision", "abc123")
    study.set_user_attr("versions", {"optuna": optuna.__version__})
    rng = random.Random(seed)
    states = [TrialState.COMPLETE] * complete + [TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL,
                                                  TrialState.RUNNING]
    for number, state in enumerate(states):
        params, dists = {}, {}
        placements, reductions, poolings = [], [], []
        for s in range(1, STAGES + 1):
            p = rng.choice(PLACEMENTS) if number else "none"  # trial 0: the plain network
            params[f"stage{s}.placement"] = p
            dists[f"stage{s}.placement"] = CategoricalDistribution(PLACEMENTS)
            r, pool = REDUCTIONS[0], POOLINGS[0]  # what the builder fills in for a stage without SE
            if p != "none":
                r, pool = rng.choice(REDUCTIONS), rng.choice(POOLINGS)
                params[f"stage{s}.reduction"], params[f"stage{s}.pooling"] = r, pool
                dists[f"stage{s}.reduction"] = CategoricalDistribution(REDUCTIONS)
                dists[f"stage{s}.pooling"] = CategoricalDistribution(POOLINGS)
            placements.append(p)
            reductions.append(r)
            poolings.append(pool)
        if with_lr:
            params["lr"] = round(rng.uniform(0.01, 0.3), 4)
            dists["lr"] = FloatDistribution(0.01, 0.3, log=True)
        attrs: dict = {}
        values = None
        if number != len(states) - 2:  # the last failed trial died before its network was built
            cost = _cost(placements, reductions)
            attrs = {**cost, "seed": number, "placements": placements, "reductions": reductions,
                     "poolings": poolings}
        if state == TrialState.COMPLETE:
            curve = [round(0.5 + 0.1 * e + 0.01 * rng.random() + 0.02 * number / len(states), 4) for e in range(3)]
            attrs.update(val_accuracy_curve=curve, val_accuracy=curve[-1], test_accuracy=round(curve[-1] - 0.01, 4),
                         epochs_run=3, train_seconds=10.0 + number)
            values = [curve[-1], float(attrs["flops"])]
        elif state == TrialState.PRUNED:
            attrs.update(val_accuracy_curve=[0.3, 0.35], epochs_run=2, train_seconds=5.0,
                         pruned_reason="pruned after epoch 2")
        elif state == TrialState.FAIL:
            if attrs:
                attrs["val_accuracy_curve"] = [0.2]
            attrs["fail_reason"] = "diverged: loss is nan" if "seed" in attrs else "ValueError: bad network"
        elif state == TrialState.RUNNING:
            attrs["val_accuracy_curve"] = [0.4]
        _add(study, number, state, params, dists, attrs, values)
    return study


# Accuracy per variant of each ablation study (made up, ordered to exercise agreement and disagreement).
ABLATION_ACCURACY = {
    "ablation_placement": ("placement", {"none": 0.900, "standard": 0.910, "pre": 0.912, "post": 0.915,
                                         "identity": 0.914}),
    "ablation_reduction": ("reduction", {2: 0.913, 4: 0.915, 8: 0.914, 16: 0.912, 32: 0.905}),
    "ablation_pooling": ("pooling", {"avg": 0.915, "max": 0.910, "avgmax": 0.916, "std": 0.911, "gem": 0.912}),
}


def ablation_study(file_name: str, storage: str | None = None, repeats: int = 1) -> optuna.Study:
    """A tied, single-objective grid study like ``studies/<file_name>.yaml``, with made-up accuracies; or
    for ``ablation_stages`` the eight per-stage subsets of standard SE blocks."""
    study = optuna.create_study(storage=storage, study_name=f"{file_name}-dataset=digits", direction="maximize")
    study.set_user_attr("study_file_name", file_name)
    study.set_user_attr("objectives", ["val_accuracy"])
    number = 0
    if file_name == "ablation_stages":
        study.set_user_attr("definition", _definition(False, ["none", "standard"], [16], ["avg"], ["val_accuracy"]))
        for mask in range(8):
            placements = ["standard" if mask >> s & 1 else "none" for s in range(STAGES)]
            acc = 0.90 + 0.002 * bin(mask).count("1") + 0.001 * (mask >> 2 & 1)
            params = {f"stage{s + 1}.placement": p for s, p in enumerate(placements)}
            dists = {k: CategoricalDistribution(["none", "standard"]) for k in params}
            attrs = {**_cost(placements, [16] * STAGES), "seed": mask, "placements": placements,
                     "reductions": [16] * STAGES, "poolings": ["avg"] * STAGES, "val_accuracy": acc,
                     "test_accuracy": acc - 0.001, "val_accuracy_curve": [acc - 0.1, acc], "epochs_run": 2}
            _add(study, mask, TrialState.COMPLETE, params, dists, attrs, [acc])
        return study
    choice, accuracy = ABLATION_ACCURACY[file_name]
    space = {"placement": ["standard"], "reduction": [16], "pooling": ["avg"]}
    space[choice] = list(accuracy)
    study.set_user_attr("definition", _definition(True, space["placement"], space["reduction"], space["pooling"],
                                                  ["val_accuracy"]))
    for repeat in range(repeats):
        for value, acc in accuracy.items():
            se = {"placement": space["placement"][0], "reduction": space["reduction"][0],
                  "pooling": space["pooling"][0], choice: value}
            acc = acc + 0.001 * repeat
            attrs = {**_cost([se["placement"]] * STAGES, [se["reduction"]] * STAGES), "seed": number,
                     "placements": [se["placement"]] * STAGES, "reductions": [se["reduction"]] * STAGES,
                     "poolings": [se["pooling"]] * STAGES, "val_accuracy": acc, "test_accuracy": acc - 0.002,
                     "val_accuracy_curve": [acc - 0.05, acc], "epochs_run": 2}
            _add(study, number, TrialState.COMPLETE, {choice: value},
                 {choice: CategoricalDistribution(space[choice])}, attrs, [acc])
            number += 1
    return study
