"""``dashboards.paper``: our ablations beside the SE paper's Tables 10, 11, 13 and 14."""

from __future__ import annotations

import pytest

from dashboards.paper import PAPER_TABLES, compare_with_paper
from dashboards.results import load_results
from tests.dashboards.synthetic import ablation_study, per_stage_study


@pytest.mark.parametrize("file_name", sorted(PAPER_TABLES))
def test_compare_with_paper_every_ablation_has_a_table(file_name: str) -> None:
    comparison = compare_with_paper(load_results(ablation_study(file_name)))
    assert comparison is not None
    assert comparison.table.table in {"Table 10", "Table 11", "Table 13", "Table 14"}
    assert comparison.rows.paper_error.notna().sum() == len(comparison.table.top1_error)
    assert comparison.findings[0].startswith("Paper ordering")


def test_compare_with_paper_placement_finds_the_post_disagreement() -> None:
    # Made-up results: SE-POST best, against the paper's clear finding that it is worst (22.78 vs <= 22.28).
    comparison = compare_with_paper(load_results(ablation_study("ablation_placement")))
    assert comparison.metric == "test_accuracy"
    pairs = comparison.pairs
    assert len(pairs) == 6 and pairs.agree.sum() == 3
    post_pairs = pairs[(pairs.a == "SE-POST") | (pairs.b == "SE-POST")]
    assert post_pairs.paper_clear.all() and not post_pairs.agree.any()
    assert comparison.kendall_tau == pytest.approx(0.0)
    text = "\n".join(comparison.findings)
    assert "finds SE better than SE-POST by 0.50 points of error" in text
    assert "no SE (reference)" in text  # Table 14 has no row without SE: reported, not ranked


def test_compare_with_paper_reduction_agrees_where_the_paper_is_clear() -> None:
    comparison = compare_with_paper(load_results(ablation_study("ablation_reduction")))
    clear = comparison.pairs[comparison.pairs.paper_clear]
    assert len(clear) == 4 and clear.agree.all()  # r = 32 worst, as in the paper
    assert comparison.kendall_tau == pytest.approx(0.8)


def test_compare_with_paper_stages_maps_paper_stages_to_ours() -> None:
    comparison = compare_with_paper(load_results(ablation_study("ablation_stages")))
    rows = comparison.rows.set_index("variant")
    assert rows.loc["all", "paper_error"] == 22.28 and rows.loc["none", "paper_error"] == 23.30
    assert rows.loc["1+2", "name"] == "SE in our stages 1+2"
    assert rows.loc[["1+2", "1+3", "2+3"], "paper_error"].isna().all()  # the paper has no such rows


def test_compare_with_paper_none_for_other_studies() -> None:
    assert compare_with_paper(load_results(per_stage_study())) is None
