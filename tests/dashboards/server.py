"""A ``python -m dashboards.serve`` process for the tests: started on a free port, waited for, stopped with Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO


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
