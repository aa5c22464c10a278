"""Fixtures for the dashboards: a dashboard server process, and one study the real engine runs on digits
while that server refreshes its plots every second (made once for the whole package)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from tests.conftest import REPO, isolated_env
from tests.search.helpers import QUICK_STUDY, write_study

ENGINE_STUDY_NAME = "se_placement-epochs=1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Dashboard:
    """A ``python -m dashboards.serve`` process."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.load(response)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """Ctrl-C, as a user would; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_dashboard(storage_url: str, artifact_dir: Path, log: Path, env: dict[str, str] | None = None,
                    refresh: float = 60, timeout: float = 180) -> Dashboard:
    """Start the dashboard and wait until it answers (or fail with its output)."""
    port = free_port()
    with log.open("wb") as fh:
        process = subprocess.Popen(
            [sys.executable, "-m", "dashboards.serve", "--storage", storage_url, "--port", str(port),
             "--artifact-dir", str(artifact_dir), "--refresh", str(refresh)],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    dashboard = Dashboard(process, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dashboard exited with {process.returncode}:\n{dashboard.output()[-3000:]}")
        try:
            dashboard.get_json("/api/studies")
            return dashboard
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    dashboard.stop()
    pytest.fail(f"dashboard did not answer within {timeout}s:\n{dashboard.output()[-3000:]}")


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


@pytest.fixture(scope="package")
def engine_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineRun]:
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
