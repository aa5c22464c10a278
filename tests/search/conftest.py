"""Fixtures of the storage-backed engine tests: database servers that must be reachable, unique study names."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import optuna
import pytest
import sqlalchemy

from tests.conftest import mysql_url, postgres_url


def _reachable(url: str, what: str, env: str) -> str:
    """``url`` when a connection opens; otherwise the test fails (CI always starts these servers)."""
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # any driver error means the same: no server to test against
        pytest.fail(f"{what} at {url} is unreachable ({type(e).__name__}: {str(e).splitlines()[0]}); start it "
                    f"(.ci/run does) or point ${env} at one", pytrace=False)
    return url


@pytest.fixture(scope="session")
def pg_url() -> str:
    return _reachable(postgres_url(), "PostgreSQL", "SE_SEARCH_TEST_POSTGRES")


@pytest.fixture(scope="session")
def mariadb_url() -> str:
    return _reachable(mysql_url(), "MySQL/MariaDB", "SE_SEARCH_TEST_MYSQL")


@pytest.fixture
def study_name() -> str:
    """A study name no other test (or concurrent test run on the same server) uses."""
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def pg_study(pg_url: str, study_name: str) -> Iterator[str]:
    """A unique study name on the PostgreSQL server, deleted after the test."""
    yield study_name
    drop_study(pg_url, study_name)


@pytest.fixture
def storage_url(request: pytest.FixtureRequest, tmp_path, study_name: str) -> Iterator[str]:
    """The storage named by the test's ``backend`` parameter; the test's study is deleted afterwards on the
    shared servers (only that study: other tests' and other runs' data stay)."""
    backend = request.param
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'studies.db'}"
        return
    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "mariadb_url")
    yield url
    drop_study(url, study_name)


def drop_study(url: str, name: str) -> None:
    storage = optuna.storages.RDBStorage(url)
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass
    finally:
        storage.engine.dispose()
