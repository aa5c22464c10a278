"""One study the real engine runs on digits while a dashboard refreshes its plots every second: made once per
test process (``engine_run`` in tests/conftest.py) and read by the export, report and dashboard tests."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from tests.conftest import REPO, isolated_env
from tests.dashboards.server import Dashboard, start_dashboard
from tests.search.helpers import QUICK_STUDY, write_study

ENGINE_STUDY_NAME = "se_placement-epochs=1"


@dataclass
class EngineRun:
    """The engine's run of the quick digits study, and the dashboard that watched it."""

    storage_url: str
    study_name: str
    root: Path
    returncode: int
    output: str
    dashboard: Dashboard

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study_name, storage=self.storage_url)


def _has_study(db: Path, name: str) -> bool:
    """Read-only look: opening an Optuna storage here would create its tables, racing the engine that is
    creating them in the same new file ("table ... already exists")."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)) as conn:
            return conn.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone() is not None
    except sqlite3.OperationalError:  # no tables yet
        return False


def _wait_for_study(db: Path, engine: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.poll() is not None:
            return  # finished (or failed) before we looked: the caller checks its exit code
        if db.exists() and _has_study(db, ENGINE_STUDY_NAME):
            return
        time.sleep(0.5)
    engine.kill()
    pytest.fail(f"the engine created no study within {timeout}s:\n{log.read_text()[-3000:]}")


def watched_engine_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineRun]:
    """Runs ``search.run`` on the quick digits study (3 trials, 1 epoch) and, as soon as the study exists,
    the dashboard on the same SQLite file with a one-second refresh, so the run is watched while it writes."""
    root = tmp_path_factory.mktemp("engine-run")
    study_file = write_study(root, QUICK_STUDY, name="se_placement")
    db = root / "studies.db"
    url = f"sqlite:///{db}"
    env = isolated_env(tmp_path_factory)
    log = root / "engine.log"
    with log.open("wb") as fh:
        engine = subprocess.Popen(
            [sys.executable, "-m", "search.run", "--study", str(study_file), "--storage", url,
             "--runs-dir", str(root / "runs"), "--epochs", "1", "--poll", "0.2"],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_for_study(db, engine, log)
        dashboard = start_dashboard(url, root / "artifacts", root / "dashboard.log", env, refresh=1)
        engine.wait(900)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait(10)
    run = EngineRun(url, ENGINE_STUDY_NAME, root, engine.returncode, log.read_text(errors="replace"), dashboard)
    yield run
    dashboard.stop()
