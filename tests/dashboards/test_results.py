"""``dashboards.results``: labels, fronts, histories and per-choice effects computed from a study."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
import pytest

from dashboards.results import choice_effects, load_results, non_dominated, se_label
from search.pareto import CONSTRAINTS_ATTR, constraints_of, hypervolume
from tests.dashboards.synthetic import ablation_study, per_stage_study


def test_se_label_per_stage_and_tied() -> None:
    row = pd.Series({"stage1_placement": "standard", "stage1_reduction": 16, "stage1_pooling": "avg",
                     "stage2_placement": "none", "stage2_reduction": pd.NA, "stage2_pooling": None,
                     "stage3_placement": "identity", "stage3_reduction": 4, "stage3_pooling": "max"})
    assert se_label(row, 3, tied=False) == "standard/r16/avg | none | identity/r4/max"
    assert se_label(row, 3, tied=False, short=True) == "std/r16/avg | none | id/r4/max"
    assert se_label(row, 3, tied=True) == "standard/r16/avg (all stages)"


def test_non_dominated_keeps_only_the_accuracy_cost_front() -> None:
    df = pd.DataFrame({"val_accuracy": [0.5, 0.6, 0.55, 0.7, 0.6], "flops": [1, 2, 3, 4, 2]})
    assert sorted(non_dominated(df, "flops")) == [0, 1, 3]


def test_front_is_the_study_front_for_multi_objective_studies() -> None:
    study = per_stage_study()
    results = load_results(study)
    assert set(results.front.number) == {t.number for t in study.best_trials}
    assert results.front.flops.is_monotonic_increasing


def test_history_is_hypervolume_non_decreasing_in_completion_order() -> None:
    results = load_results(per_stage_study())
    assert results.history_kind == "hypervolume"
    assert results.history.value.is_monotonic_increasing
    assert results.history.finished.tolist() == list(range(1, 12))  # 11 finished trials


def test_history_is_best_accuracy_for_single_objective_studies() -> None:
    results = load_results(ablation_study("ablation_pooling"))
    assert results.history_kind == "best validation accuracy"
    assert results.history.value.iloc[-1] == pytest.approx(max(results.trials.val_accuracy))


def test_choice_effects_mean_and_95_ci() -> None:
    results = load_results(ablation_study("ablation_placement", repeats=2))
    effects = choice_effects(results).set_index("value")
    assert list(effects.index) == ["none", "standard", "pre", "post", "identity"]  # the paper's order
    post = effects.loc["post"]
    accs = results.completed[results.completed.stage1_placement == "post"].val_accuracy
    sem = accs.std(ddof=1) / math.sqrt(2)
    assert post.n == 2 and post["mean"] == pytest.approx(accs.mean())
    assert (post.ci_low, post.ci_high) == pytest.approx((accs.mean() - 1.96 * sem, accs.mean() + 1.96 * sem))
    assert set(effects.factor_label) == {"placement (all stages)"}  # ratio and pooling did not vary


def test_choice_effects_ignore_ratio_of_stages_without_se() -> None:
    results = load_results(per_stage_study())
    effects = choice_effects(results)
    done = results.completed
    for stage in (1, 2, 3):
        counted = effects[effects.factor == f"stage{stage}_reduction"].n.sum()
        assert counted == (done[f"stage{stage}_placement"] != "none").sum()
    single = effects[effects.n == 1]
    assert single.ci_low.isna().all()


def _study_of(storage: str, objectives: list[str], rows: list[dict], max_flops: int | None = None) -> optuna.Study:
    """A study of ``objectives`` holding one completed trial per row (``val_accuracy``, ``flops``,
    ``params``), each with the constraint value a ``max_flops`` budget gives it, as a worker stores it."""
    directions = ["maximize"] + ["minimize"] * (len(objectives) - 1)
    study = optuna.create_study(storage=storage, directions=directions,
                                sampler=optuna.samplers.TPESampler(seed=0, constraints_func=constraints_of))
    study.set_user_attr("objectives", objectives)
    study.set_user_attr("reference_costs", {"flops": 4e6, "params": 2e5})
    for row in rows:
        trial = study.ask()
        trial.suggest_categorical("stage1.placement", ["none", "standard"])
        attrs = {**row, "macs": row["flops"] // 2, "placements": ["standard"], "reductions": [16], "poolings": ["avg"]}
        if max_flops is not None:
            attrs[CONSTRAINTS_ATTR] = [row["flops"] - max_flops]
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [float(row[o]) for o in objectives])
    return study


@pytest.mark.parametrize("objectives", [["val_accuracy", "flops"], ["val_accuracy"]])
def test_over_budget_trials_stay_off_the_front_the_best_and_the_hypervolume(tmp_path: Path,
                                                                              objectives: list[str]) -> None:
    """A budget (``constraints: {max_flops: ...}``) makes a trial over it infeasible: it holds the best
    accuracy here but is on no front, is no study's best, and adds no hypervolume (README: the front holds
    feasible trials only)."""
    rows = [{"val_accuracy": 0.80, "flops": 1_000_000, "params": 1000},
            {"val_accuracy": 0.95, "flops": 3_000_000, "params": 1000}]
    study = _study_of(f"sqlite:///{tmp_path / 'budget.db'}", objectives, rows, max_flops=2_000_000)
    results = load_results(study)
    assert results.trials.feasible.tolist() == [True, False]
    assert results.front.number.tolist() == [0]
    assert results.feasible.number.tolist() == [0]
    if len(objectives) > 1:
        trials = study.get_trials()
        assert [t.number for t in study.best_trials] == [0]  # Optuna's own front agrees
        assert hypervolume(trials, objectives, {"flops": 4e6}) == pytest.approx(0.80 * (1 - 1 / 4))
        assert results.history.value.iloc[-1] == pytest.approx(0.80 * (1 - 1 / 4))
    else:
        assert study.best_trial.number == 0
        assert results.history.value.tolist() == [0.80, 0.80]


def test_front_of_a_three_objective_study_is_non_dominated_in_accuracy_and_flops() -> None:
    """With (accuracy, FLOPs, params), a trial that saves params is on the study's front though another
    beats it on accuracy and FLOPs; the accuracy-FLOPs figure and table leave it out."""
    rows = [{"val_accuracy": 0.90, "flops": 1_000_000, "params": 100_000},
            {"val_accuracy": 0.85, "flops": 2_000_000, "params": 50_000}]
    study = _study_of(None, ["val_accuracy", "flops", "params"], rows)
    assert len(study.best_trials) == 2
    results = load_results(study)
    assert results.cost == "flops"
    assert results.front.number.tolist() == [0]


def test_hypervolume_scales_costs_over_the_study_range() -> None:
    """With ``cost_ranges`` a cost is scaled to [0, 1] over the space's range, reference point (0, 1.1): the
    cheapest trial at 80% and the costliest at 90% enclose 0.8 x 1.1 + 0.1 x 0.1. An older study's reference
    cost still scales as cost / reference, reference point (0, 1)."""
    study = _study_of(None, ["val_accuracy", "flops"], [{"val_accuracy": 0.80, "flops": 1_000_000, "params": 1},
                                                        {"val_accuracy": 0.90, "flops": 1_010_000, "params": 1}])
    trials = study.get_trials()
    assert hypervolume(trials, ["val_accuracy", "flops"], {"flops": [1_000_000, 1_010_000]}) == pytest.approx(0.89)
    assert hypervolume(trials, ["val_accuracy", "flops"], {"flops": 2_020_000}) == pytest.approx(
        0.80 * (1 - 1_000_000 / 2_020_000) + 0.10 * (1 - 1_010_000 / 2_020_000))
    study.set_user_attr("cost_ranges", {"flops": [1_000_000, 1_010_000]})
    assert load_results(study).history.value.iloc[-1] == pytest.approx(0.89)  # preferred over reference_costs
