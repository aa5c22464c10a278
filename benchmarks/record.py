"""Machine-tagged benchmark results: JSON files in ``benchmarks/results/`` and the table in README.md."""

from __future__ import annotations

import json
import os
import platform
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lightning_modules.data.decode import available_cpus
from search.study_store import git_revision

__all__ = ["RESULTS_DIR", "current_commit", "device_label", "machine", "refresh", "render_table", "write_results"]

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
    }


def device_label(device: str = "cpu", cpus: int | None = None) -> str:
    """Where a benchmark ran, as the results table names it: the GPU's name for a CUDA device, else "CPU, N
    cores" with N the CPUs it could use (``cpus``, default this process's)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {cpus or available_cpus()} cores"


def current_commit() -> str:
    """HEAD's short hash (``+dirty`` when the measured tree had uncommitted changes). ``SE_SEARCH_COMMIT``
    names it only where git cannot (a copy sent to a GPU machine has no git history): an exported value left
    in a shell here would otherwise label new code with an old commit."""
    revision = git_revision(short=True)
    if revision == "unknown":
        return os.environ.get("SE_SEARCH_COMMIT") or revision
    return revision


def write_results(results: list[dict[str, Any]], path: Path | None = None, directory: Path | None = None,
                  commit: str | None = None, **tags: Any) -> Path:
    """Write this run's JSON file (a new one in ``directory``, default ``RESULTS_DIR``, or ``path`` again as
    the run adds results; ``commit``: the measured code, default ``current_commit()``; ``tags`` go in as
    they are) and, for ``RESULTS_DIR``, refresh the README table from every stored run."""
    directory = directory or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    info = machine()
    stamp = datetime.now(timezone.utc)
    tag = "gpu-" + info["gpu"].replace(" ", "_") if info["gpu"] else "cpu"
    if path is None:  # a new run: never over another run's file (two runs can start in the same second)
        path = directory / f"{stamp:%Y%m%dT%H%M%S}-{tag}.json"
        copy = 1
        while path.exists():
            copy += 1
            path = directory / f"{stamp:%Y%m%dT%H%M%S}-{tag}-{copy}.json"
    payload = {"date": stamp.isoformat(timespec="seconds"), "commit": commit or current_commit(), "machine": info,
               **tags, "results": results}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if directory == RESULTS_DIR:
        refresh()
    return path


def refresh() -> None:
    """Rebuild README.md's results table from every JSON file in ``results/`` (also ones copied back from
    another machine)."""
    runs = [run for p in sorted(RESULTS_DIR.glob("*.json")) if not (run := json.loads(p.read_text())).get("dry_run")]
    table = render_table(runs)
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    README.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def render_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| date | device | commit | benchmark | result | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        machine_device = run["machine"]["gpu"] or f"CPU, {run['machine']['cores']} cores"
        for r in run["results"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[r.get("met")]
            # A row names where its benchmark ran (``ran_on``: a CPU benchmark in a GPU machine's run ran on
            # its CPUs); rows recorded before it was kept name the machine.
            device = r.get("ran_on") or machine_device
            lines.append(
                f"| {run['date'][:10]} | {device} | {run['commit']} | {r['name']} | {r['summary']} | "
                f"{r['target']} | {met} |"
            )
    return "\n".join(lines)
