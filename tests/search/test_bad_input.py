"""Bad input: one line on stderr, exit code 2, and nothing written to the storage."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.search.helpers import run_cli, write_study


def _study_count(db: Path) -> int:
    import sqlite3

    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--study", "no_such_study"], "unknown study 'no_such_study'"),
        (["--study", "QUICK", "--trials", "0"], "--trials: must be >= 1"),
        (["--study", "QUICK", "--epochs", "-1"], "--epochs: must be >= 1"),
        (["--study", "QUICK", "--trials", "many"], "--trials: invalid int value"),
        (["--study", "QUICK", "--storage", "not a url"], "--storage: 'not a url' is not a SQLAlchemy URL"),
        (["--study", "QUICK", "--storage", "postgresql+psycopg://u:s3cret@127.0.0.1:1/x"], "--storage: cannot open"),
        (["--study", "QUICK", "--gpus", "7"], "--gpus: GPU 7 does not exist"),
        (["--study", "QUICK", "--gpus", "zero"], "--gpus: expected 'all' or comma-separated"),
        (["--study", "QUICK", "--workers", "0"], "--workers: must be >= 1"),
        (["--study", "QUICK", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--study", "QUICK", "--dataset", "imagefolder", "--data-dir", "/nonexistent/tree"], "/nonexistent/tree"),
        (["--study", "QUICK", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_run_bad_input_one_line_exit_2_no_write(tmp_path: Path, args: list[str], expected: str) -> None:
    study = write_study(tmp_path)
    db = tmp_path / "studies.db"
    args = [str(study) if a == "QUICK" else a for a in args]
    if "--storage" not in args:
        args += ["--storage", f"sqlite:///{db}"]
    result = run_cli("search.run", *args, "--runs-dir", str(tmp_path / "runs"), timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "s3cret" not in result.stderr + result.stdout
    assert _study_count(db) == 0
