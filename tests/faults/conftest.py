"""Fixtures of the fault tests: private servers that a test may break, and steady
private servers, shared by the session, for the side of a test that is not broken.

Every test module here marks its tests `faults`: run them alone with
`tests/run -m faults`, or skip them with `tests/run -m "not faults"`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fixtures import private_postgres, private_rabbit  # noqa: F401 (fixtures)
from tests.support.instances import PrivatePostgres, PrivateRabbit


@pytest.fixture(scope="session")
def steady_postgres() -> Iterator[PrivatePostgres]:
    """A private Postgres that no test breaks; each test creates its own database on it."""
    # %a puts the application name in the server log, where a test finds which client
    # hit an error.
    with PrivatePostgres(settings={"log_line_prefix": "'%m [%p] %a '"}) as instance:
        yield instance


@pytest.fixture(scope="session")
def steady_rabbit() -> Iterator[PrivateRabbit]:
    """A private RabbitMQ node that no test breaks; each test declares its own queues."""
    with PrivateRabbit() as instance:
        yield instance
