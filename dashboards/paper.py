"""Our ablation studies beside the SE paper's tables: which orderings we reproduce and which we do not.

Hu et al., "Squeeze-and-Excitation Networks" (TPAMI 2019), SE-ResNet-50 on ImageNet, single-crop top-1
error (%). Tables 10, 11 and 14 are quoted in docs/DESIGN.md. Table 13's figures (ResNet-50 23.30,
SE_Stage_2 23.03, SE_Stage_3 23.04, SE_Stage_4 22.68, SE_All 22.28) are quoted from the paper from memory
and should be checked against it before they go into a draft. SE_Stage_2/3/4 are ResNet-50's conv2_x to
conv4_x, its first three stages, so they map to our three CIFAR stages 1-3; the paper's SE_All also
covers conv5_x, a stage our networks do not have.

Values are not comparable (ImageNet and SE-ResNet-50 against CIFAR-10 and a small ResNet); orderings are.
The paper gives no error bars, and several of its differences are a few hundredths of a point, so pairs
the paper separates by less than ``PAPER_MARGIN`` points are reported apart from the clear ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dashboards.results import StudyResults

__all__ = ["PAPER_MARGIN", "PAPER_TABLES", "PaperComparison", "PaperTable", "compare_with_paper"]

PAPER_MARGIN = 0.1  # top-1 error points


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's ablation tables and how a trial of our matching study maps onto its rows."""

    table: str
    question: str
    variant_of: Callable[[pd.Series, int], str | None]  # (export row, stages) -> variant key
    names: dict[str, str]  # variant key -> row name in the paper (or our wording where the paper has none)
    top1_error: dict[str, float]  # variant key -> the paper's top-1 error
    other_name: str = ""  # prefix naming a variant the table does not list


def _same_in_all_stages(choice: str) -> Callable[[pd.Series, int], str | None]:
    def variant(row: pd.Series, stages: int) -> str | None:
        values = {row.get(f"stage{i}_{choice}") for i in range(1, stages + 1)}
        if len(values) != 1:
            return None
        value = values.pop()
        return None if pd.isna(value) else str(value)
    return variant


def _stages_with_se(row: pd.Series, stages: int) -> str:
    placements = [row.get(f"stage{i}_placement") for i in range(1, stages + 1)]
    with_se = [str(i) for i, p in enumerate(placements, start=1) if not pd.isna(p) and p != "none"]
    if not with_se:
        return "none"
    return "all" if len(with_se) == stages else "+".join(with_se)


PAPER_TABLES: dict[str, PaperTable] = {
    "ablation_placement": PaperTable(
        table="Table 14",
        question="where the SE block sits in the residual unit",
        variant_of=_same_in_all_stages("placement"),
        names={"none": "no SE (reference)", "standard": "SE", "pre": "SE-PRE", "post": "SE-POST",
               "identity": "SE-Identity"},
        top1_error={"standard": 22.28, "pre": 22.23, "post": 22.78, "identity": 22.20},
    ),
    "ablation_reduction": PaperTable(
        table="Table 10",
        question="the reduction ratio r",
        variant_of=_same_in_all_stages("reduction"),
        names={str(r): f"r = {r}" for r in (2, 4, 8, 16, 32)},
        top1_error={"2": 22.29, "4": 22.25, "8": 22.26, "16": 22.28, "32": 22.72},
    ),
    "ablation_pooling": PaperTable(
        table="Table 11",
        question="the squeeze operator",
        variant_of=_same_in_all_stages("pooling"),
        names={"avg": "Avg", "max": "Max", "avgmax": "avg+max (CBAM, not in paper)",
               "std": "std (SRM, not in paper)", "gem": "GeM (not in paper)"},
        top1_error={"max": 22.57, "avg": 22.28},
    ),
    "ablation_stages": PaperTable(
        table="Table 13",
        question="which stages get SE blocks",
        variant_of=_stages_with_se,
        names={"none": "ResNet-50 (no SE)", "1": "SE_Stage_2 (our stage 1)", "2": "SE_Stage_3 (our stage 2)",
               "3": "SE_Stage_4 (our stage 3)", "all": "SE_All (all our stages)"},
        top1_error={"none": 23.30, "1": 23.03, "2": 23.04, "3": 22.68, "all": 22.28},
        other_name="SE in our stages ",
    ),
}


@dataclass(frozen=True)
class PaperComparison:
    """Our results per variant beside the paper's, the pairwise orderings, and plain-language findings."""

    table: PaperTable
    metric: str  # the accuracy column ranked: test_accuracy when every variant has one, else val_accuracy
    rows: pd.DataFrame
    pairs: pd.DataFrame
    kendall_tau: float
    findings: list[str]


def _variant_rows(results: StudyResults, table: PaperTable) -> tuple[pd.DataFrame, str]:
    done = results.completed.copy()
    done["variant"] = [table.variant_of(row, results.stages) for _, row in done.iterrows()]
    done = done.dropna(subset=["variant"])
    metric = "test_accuracy" if len(done) and done.test_accuracy.notna().all() else "val_accuracy"
    grouped = done.groupby("variant").agg(
        n=("number", "size"), val_accuracy=("val_accuracy", "mean"), test_accuracy=("test_accuracy", "mean"),
        ours_sd=(metric, "std"), trials=("number", lambda s: ", ".join(str(n) for n in sorted(s))))
    grouped["ours"] = done.groupby("variant")[metric].mean()
    keys = [k for k in table.names if k in grouped.index] + [k for k in grouped.index if k not in table.names]
    rows = grouped.loc[keys].reset_index()
    rows["name"] = [table.names.get(k, f"{table.other_name}{k}") for k in rows.variant]
    rows["paper_error"] = [table.top1_error.get(k, math.nan) for k in rows.variant]
    rows["our_rank"] = rows.ours.rank(ascending=False, method="min").astype("Int64")
    ranked = rows.paper_error.notna() & rows.ours.notna()
    rows["paper_rank"] = rows.paper_error.where(ranked).rank(ascending=True, method="min").astype("Int64")
    rows["our_rank_among_paper"] = rows.ours.where(ranked).rank(ascending=False, method="min").astype("Int64")
    return rows, metric


def _pairs(rows: pd.DataFrame) -> pd.DataFrame:
    both = rows[rows.paper_error.notna() & rows.ours.notna()]
    out = []
    for (_, a), (_, b) in itertools.combinations(both.iterrows(), 2):
        paper_diff = b.paper_error - a.paper_error  # > 0: the paper finds a better (lower error)
        our_diff = 100 * (a.ours - b.ours)  # > 0: we find a better (higher accuracy), in points
        out.append({
            "a": a["name"], "b": b["name"], "paper_diff": paper_diff, "our_diff": our_diff,
            "agree": paper_diff * our_diff > 0, "paper_clear": abs(paper_diff) >= PAPER_MARGIN - 1e-9,
        })
    return pd.DataFrame(out, columns=["a", "b", "paper_diff", "our_diff", "agree", "paper_clear"])


def _kendall_tau(pairs: pd.DataFrame) -> float:
    """Kendall's tau-a between the paper's and our orderings: (concordant - discordant) / pairs."""
    if pairs.empty:
        return math.nan
    return float((np.sign(pairs.paper_diff) * np.sign(pairs.our_diff)).sum() / len(pairs))


def _order(rows: pd.DataFrame, column: str, ascending: bool) -> str:
    ordered = rows.dropna(subset=[column]).sort_values(column, ascending=ascending)
    return " > ".join(ordered["name"])


def _findings(rows: pd.DataFrame, pairs: pd.DataFrame, metric: str, tau: float, table: PaperTable) -> list[str]:
    compared = rows[rows.paper_error.notna() & rows.ours.notna()]
    metric_name = metric.replace("_", " ")
    lines = [f"Paper ordering, best first (top-1 error): {_order(compared, 'paper_error', True)}.",
             f"Our ordering, best first ({metric_name}): {_order(compared, 'ours', False)}."]
    if pairs.empty:
        lines.append("Too few variants with both our result and a paper figure to compare orderings.")
        return lines
    clear = pairs[pairs.paper_clear]
    lines.append(f"We agree with the paper on {int(pairs.agree.sum())} of {len(pairs)} pairwise orderings "
                 f"(Kendall tau {tau:+.2f}); on the {len(clear)} pairs the paper separates by at least "
                 f"{PAPER_MARGIN} points, on {int(clear.agree.sum())}.")
    for _, p in pairs.sort_values("paper_clear", ascending=False).iterrows():
        if p.agree:
            continue
        paper_better, paper_worse = (p.a, p.b) if p.paper_diff > 0 else (p.b, p.a)
        ours = (f"we find {p.a if p.our_diff > 0 else p.b} better by {abs(p.our_diff):.2f} points of accuracy"
                if p.our_diff else "we find them equal")
        margin = "" if p.paper_clear else f" (the paper's margin is under {PAPER_MARGIN} points, within its noise)"
        lines.append(f"Disagree: the paper finds {paper_better} better than {paper_worse} by "
                     f"{abs(p.paper_diff):.2f} points of error{margin}; {ours}.")
    if (rows.n < 2).any():
        lines.append("Some variants ran once, so our differences carry no error bars: repeat them with other "
                     "seeds before reading much into gaps of a few tenths of a point.")
    extra = rows[rows.paper_error.isna()]
    for _, r in extra.iterrows():
        lines.append(f"{r['name']}: {metric_name} {100 * r.ours:.2f}%, no figure in the paper's {table.table}.")
    return lines


def compare_with_paper(results: StudyResults) -> PaperComparison | None:
    """The comparison for an ablation study (by its study file's name), else None."""
    table = PAPER_TABLES.get(results.file_name)
    if table is None or results.completed.empty:
        return None
    rows, metric = _variant_rows(results, table)
    pairs = _pairs(rows)
    tau = _kendall_tau(pairs)
    return PaperComparison(table, metric, rows, pairs, tau, _findings(rows, pairs, metric, tau, table))
