"""``dashboards.results``: labels, fronts, histories and per-choice effects computed from a study."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dashboards.results import choice_effects, load_results, non_dominated, se_label
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
