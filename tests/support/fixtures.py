"""pytest fixtures that start a private PostgreSQL cluster or RabbitMQ node.

Import them by name into a test module, and pytest picks them up::

    from tests.support.fixtures import private_postgres, private_rabbit

Each fixture has function scope: every test gets a freshly started server
and the server is closed afterwards, also when the test failed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.instances import PrivatePostgres, PrivateRabbit

__all__ = ["private_postgres", "private_rabbit"]


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started PrivatePostgres, closed after the test."""
    with PrivatePostgres() as instance:
        yield instance


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A started PrivateRabbit, closed after the test."""
    with PrivateRabbit() as instance:
        yield instance
