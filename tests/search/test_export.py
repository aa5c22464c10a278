"""``search.export``: the trials table, its files, and its command line.

Fast tests read a study written directly in the engine's schema (tests/dashboards/synthetic.py); the slow
test exports the study the real engine ran on digits (``engine_run``, shared with the dashboards' tests) and
checks every value against the stored trials.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from search.export import columns, read_trials, trials_dataframe, write_trials
from tests.dashboards.synthetic import ablation_study, per_stage_study
from tests.engine_run import EngineRun
from tests.search.helpers import run_cli

DOCUMENTED = ["number", "state", "stage1_placement", "stage1_reduction", "stage1_pooling", "stage2_placement",
              "stage2_reduction", "stage2_pooling", "stage3_placement", "stage3_reduction", "stage3_pooling",
              "val_accuracy", "test_accuracy", "macs", "flops", "params", "epochs_run", "duration_s", "train_s",
              "seed", "feasible", "pareto", "val_accuracy_curve", "fail_reason", "datetime_start", "datetime_complete"]


@pytest.fixture()
def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


def test_trials_dataframe_columns_are_the_documented_ones() -> None:
    df = trials_dataframe(per_stage_study(with_lr=False))
    assert list(df.columns) == DOCUMENTED
    assert list(trials_dataframe(per_stage_study()).columns) == [*DOCUMENTED[:11], "lr", *DOCUMENTED[11:]]
    assert columns(3, ["lr"]) == [*DOCUMENTED[:11], "lr", *DOCUMENTED[11:]]


def test_trials_dataframe_values_match_the_stored_trials() -> None:
    study = per_stage_study()
    df = trials_dataframe(study).set_index("number")
    front = {t.number for t in study.best_trials}
    for t in study.get_trials():
        row = df.loc[t.number]
        a = t.user_attrs
        assert row.state == t.state.name.lower()
        assert bool(row.pareto) == (t.number in front)
        assert row.val_accuracy_curve == a.get("val_accuracy_curve", [])
        assert row.fail_reason == a["fail_reason"] if "fail_reason" in a else pd.isna(row.fail_reason)
        for key in ("val_accuracy", "test_accuracy", "macs", "flops", "params", "seed"):
            assert row[key] == a[key] if key in a else pd.isna(row[key]), (t.number, key)
        if t.state.is_finished():
            assert row.duration_s == pytest.approx(t.duration.total_seconds())
        for s, placement in enumerate(a.get("placements", []), start=1):
            assert row[f"stage{s}_placement"] == placement
            if placement == "none":  # the builder's placeholder ratio/pooling did not change the network
                assert pd.isna(row[f"stage{s}_reduction"]) and pd.isna(row[f"stage{s}_pooling"])
            else:
                assert row[f"stage{s}_reduction"] == a["reductions"][s - 1]
                assert row[f"stage{s}_pooling"] == a["poolings"][s - 1]
        assert row.lr == t.params["lr"]


def test_trials_dataframe_trial_failed_before_build_uses_its_parameters() -> None:
    study = per_stage_study()
    unbuilt = next(t for t in study.get_trials() if t.state == TrialState.FAIL and "placements" not in t.user_attrs)
    row = trials_dataframe(study).set_index("number").loc[unbuilt.number]
    for s in range(1, 4):
        assert row[f"stage{s}_placement"] == unbuilt.params[f"stage{s}.placement"]
    assert pd.isna(row.flops) and pd.isna(row.seed) and row.fail_reason.startswith("ValueError")


def test_trials_dataframe_tied_study_fills_every_stage() -> None:
    df = trials_dataframe(ablation_study("ablation_reduction"))
    assert (df.stage1_reduction == df.stage3_reduction).all()
    assert sorted(df.stage2_reduction) == [2, 4, 8, 16, 32]
    assert df.pareto.sum() == 1 and df.loc[df.pareto, "val_accuracy"].item() == df.val_accuracy.max()


def test_trials_dataframe_states_filter() -> None:
    study = per_stage_study()
    df = trials_dataframe(study, states=(TrialState.PRUNED, TrialState.FAIL))
    assert sorted(df.state.unique()) == ["fail", "pruned"]
    assert len(df) == 3


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_trials_round_trips(tmp_path: Path, suffix: str) -> None:
    df = trials_dataframe(per_stage_study())
    path = tmp_path / f"trials{suffix}"
    write_trials(df, str(path))
    back = read_trials(path)
    pd.testing.assert_frame_equal(back, df, check_exact=False, rtol=1e-12)
    assert back.val_accuracy_curve.map(type).eq(list).all()


def test_write_trials_csv_holds_curve_as_json(tmp_path: Path) -> None:
    df = trials_dataframe(per_stage_study())
    write_trials(df, str(tmp_path / "t.csv"))
    raw = pd.read_csv(tmp_path / "t.csv")
    assert json.loads(raw.val_accuracy_curve[0]) == df.val_accuracy_curve[0]


def test_trials_dataframe_thousand_trials_takes_seconds() -> None:
    # In memory, so the test times the export and not SQLite inserts; on a SQLite file the same export
    # measured 2.6 s on a loaded 2-core machine, Optuna's loading of the trials included.
    study = optuna.create_study(directions=["maximize", "minimize"])
    template = [t for t in per_stage_study(complete=8).get_trials() if t.state == TrialState.COMPLETE]
    study.add_trials([optuna.trial.create_trial(
        state=TrialState.COMPLETE, params=t.params, distributions=t.distributions, user_attrs=t.user_attrs,
        values=[t.values[0] + 1e-6 * i, t.values[1]]) for i in range(125) for t in template])
    start = time.perf_counter()
    df = trials_dataframe(study)
    elapsed = time.perf_counter() - start
    assert len(df) == 1000
    assert elapsed < 10, f"export of 1000 trials took {elapsed:.1f}s"


def _store_study(storage_url: str) -> None:
    per_stage_study(storage_url, "se_placement-dataset=digits")


def test_export_cli_writes_parquet_and_finds_study_by_file_name(tmp_path: Path, storage_url: str) -> None:
    _store_study(storage_url)
    out = tmp_path / "results.parquet"
    result = run_cli("search.export", "--study", "se_placement", "--storage", storage_url, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert list(pd.read_parquet(out).columns) == [*DOCUMENTED[:11], "lr", *DOCUMENTED[11:]]


def test_export_cli_stdout_csv_with_states(storage_url: str) -> None:
    _store_study(storage_url)
    result = run_cli("search.export", "--study", "se_placement-dataset=digits", "--storage", storage_url,
                     "--out", "-", "--states", "complete,pruned")
    assert result.returncode == 0, result.stderr
    df = read_trials(io.StringIO(result.stdout))
    assert set(df.state) == {"complete", "pruned"} and len(df) == 9


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "x.xlsx"], "must end in .csv or .parquet"),
    (["--out", "-", "--states", "done"], "unknown state 'done'"),
    (["--out", "-", "--study", "nope"], "no study named 'nope'"),
    (["--out", "/no/such/dir/x.csv"], "does not exist"),
    (["--out", "TMP/a-folder.csv"], "is a directory; give a file name in it"),
])
def test_export_cli_bad_input_is_one_line_exit_2(tmp_path: Path, storage_url: str, args: list[str],
                                                 message: str) -> None:
    _store_study(storage_url)
    (tmp_path / "a-folder.csv").mkdir()
    argv = ["--study", "se_placement", "--storage", storage_url, *(a.replace("TMP", str(tmp_path)) for a in args)]
    result = run_cli("search.export", *argv)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_export_cli_missing_sqlite_file_is_refused_without_creating_it(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    result = run_cli("search.export", "--study", "x", "--storage", f"sqlite:///{db}", "--out", "-")
    assert result.returncode == 2 and "no study database" in result.stderr
    assert not db.exists()


def _tables_and_journal(db: Path) -> tuple[list[str], str]:
    with sqlite3.connect(db) as conn:
        tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        return tables, conn.execute("PRAGMA journal_mode").fetchone()[0]


def test_export_cli_leaves_a_database_without_studies_as_it_was(tmp_path: Path) -> None:
    """A ``--storage`` typo naming another application's SQLite file: refused, and the file keeps its tables
    and journal mode (opening it as Optuna does would add Optuna's tables and switch it to WAL)."""
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE results (x)")
    before = _tables_and_journal(db)
    result = run_cli("search.export", "--study", "x", "--storage", f"sqlite:///{db}", "--out", "-")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "holds no Optuna studies" in result.stderr
    assert _tables_and_journal(db) == before == (["results"], "delete")


def test_export_cli_database_of_another_optuna_schema_is_one_line(tmp_path: Path, storage_url: str) -> None:
    """A study database whose schema is not this Optuna's (Optuna's RuntimeError) gets one line that keeps
    Optuna's upgrade command, not a traceback."""
    _store_study(storage_url)
    with sqlite3.connect(tmp_path / "studies.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    result = run_cli("search.export", "--study", "se_placement", "--storage", storage_url, "--out", "-")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "optuna storage upgrade" in result.stderr


# --- against the real engine ----------------------------------------------------------------------------


@pytest.mark.slow
def test_export_of_engine_study_matches_its_trials(engine_run: EngineRun, tmp_path: Path) -> None:
    assert engine_run.returncode == 0, engine_run.output[-3000:]
    url, name = engine_run.storage_url, engine_run.study_name
    out = tmp_path / "results.parquet"
    result = run_cli("search.export", "--study", "se_placement", "--storage", url, "--out", str(out))
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out).set_index("number")
    study = optuna.load_study(study_name=name, storage=url)
    assert list(df.reset_index().columns) == DOCUMENTED
    front = {t.number for t in study.best_trials}
    for t in study.get_trials():
        row, a = df.loc[t.number], t.user_attrs
        assert row.state == t.state.name.lower()
        assert row.flops == a["flops"] == 2 * row.macs and row.params == a["params"] and row.seed == a["seed"]
        assert list(row.val_accuracy_curve) == pytest.approx(a["val_accuracy_curve"])
        assert row.epochs_run == a["epochs_run"] == len(a["val_accuracy_curve"])
        assert bool(row.pareto) == (t.number in front)
        if t.state == TrialState.COMPLETE:
            assert row.val_accuracy == pytest.approx(t.values[0]) and row.test_accuracy == a["test_accuracy"]
            assert row.duration_s >= row.train_s > 0
        for s, (p, r, pool) in enumerate(zip(a["placements"], a["reductions"], a["poolings"], strict=True), 1):
            assert row[f"stage{s}_placement"] == p
            if p == "none":
                assert pd.isna(row[f"stage{s}_reduction"]) and pd.isna(row[f"stage{s}_pooling"])
            else:
                assert (row[f"stage{s}_reduction"], row[f"stage{s}_pooling"]) == (r, pool)
