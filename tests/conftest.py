"""Shared fixtures: every test gets its own data, cache and runs directories (never the home directory)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.engine_run import EngineRun

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg"
_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")  # as the test run was started
# Two test processes (pytest-xdist) and the trainings they start share the cores, and busy-waiting OpenMP
# threads take the time slices the others need. Two copies of one training test side by side on two cores took
# 221 s with the default wait policy and 64 s with passive waiting (one alone: 47 s). Set before torch is
# imported, so every process of the run inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment every test runs in: its own data and cache directories (never the home directory).
    Fixtures wider than one test pass it to the subprocesses they start themselves, as the function-scoped
    ``_isolated_dirs`` below is not in force yet when they run."""
    root = tmp_path_factory.getbasetemp()
    # The decoded-data cache is shared by the whole session (as it is by a study's workers); data and runs
    # directories are per test.
    env = {**os.environ, "SE_SEARCH_CACHE_DIR": str(root / "cache"), "SE_SEARCH_DATA_DIR": str(root / "data"),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    env.pop("SE_SEARCH_STORAGE", None)
    # A worker or DDP rank run in this process pins its thread count in os.environ (search.devices.pin_threads);
    # later tests' subprocesses would inherit it and train with other threads than their own workers chose.
    env.pop("OMP_NUM_THREADS", None)
    if _OMP_NUM_THREADS is not None:
        env["OMP_NUM_THREADS"] = _OMP_NUM_THREADS
    return env


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    env = isolated_env(tmp_path_factory)
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)


DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_MYSQL = "mysql+pymysql://root@127.0.0.1:3306/test"


def postgres_url() -> str:
    """The PostgreSQL server the storage tests use: $SE_SEARCH_TEST_POSTGRES (CI sets it), else the local
    default. The tests fail, never skip, when it is unreachable: CI always provides it (.ci/run)."""
    return os.environ.get("SE_SEARCH_TEST_POSTGRES") or DEFAULT_POSTGRES


def mysql_url() -> str:
    """The MySQL/MariaDB server of the storage tests: $SE_SEARCH_TEST_MYSQL (CI sets it), else the local default."""
    return os.environ.get("SE_SEARCH_TEST_MYSQL") or DEFAULT_MYSQL


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP workers
    slow them several-fold. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cifar(tree: Path, train_per_class: int = 12, test_per_class: int = 4) -> None:
    """The first images of each class of the shared CIFAR-10 copy, in the same layout."""
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for class_dir in sorted((SHARED_CIFAR / split).iterdir()):
            target = tree / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / image.name).write_bytes(image.read_bytes())


@pytest.fixture(scope="session")
def engine_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineRun]:
    """The quick digits study as the real engine ran it, watched by a dashboard (tests/engine_run.py), read by
    the export, report and dashboard tests: one run per test process."""
    from tests.engine_run import watched_engine_run

    yield from watched_engine_run(tmp_path_factory)


# pytest-xdist (``-n 2 --dist loadfile --no-loadscope-reorder``, pyproject.toml) sends each test module whole to
# one worker, so its module-scoped fixtures are built once (the device dry run alone takes minutes), and in the
# order collected. A session fixture such as ``engine_run`` is built at most once per worker.
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Runs the modules with most ``slow`` tests first, each kept whole and in its own order: the two workers
    then end together, where a slow module sent last would leave one of them idle for minutes."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    slow = {name: sum(1 for item in tests if item.get_closest_marker("slow")) for name, tests in modules.items()}
    items[:] = [item for name in sorted(modules, key=lambda name: -slow[name]) for item in modules[name]]
