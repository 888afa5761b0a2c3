"""Postgres plumbing shared by the API and the workers: named queries, pools, error classes."""

from __future__ import annotations

import asyncio
import collections
import re
from importlib import resources

import asyncpg

# SQLSTATE classes that say nothing about the statement itself: the connection, the
# server or a concurrent transaction got in the way, and the same work may succeed later.
#   08 connection exception, 53 insufficient resources, 57 operator intervention
#   (admin shutdown, crash shutdown, cannot connect now, query canceled), 58 system error,
#   40001 serialization failure, 40P01 deadlock detected.
#   42P01 undefined table and 42883 undefined function: the database lacks a migration of
#   this release (a pod started before the migrations Job finished). Retrying waits for
#   it, where treating it as the statement's fault would dead-letter every event.
#   25006 read-only transaction (a standby, or a primary being demoted in a failover) and
#   42501 insufficient privilege (a role without the grants of the migrations): faults of
#   the setup, which would otherwise dead-letter every event of the batch.
#   55P03 lock not available: a lock_timeout ran out while another transaction held a lock
#   the batch needs, a state of other transactions and not of its events.
_TRANSIENT_CLASSES = ("08", "53", "57", "58")
_TRANSIENT_STATES = ("25006", "40001", "40P01", "42501", "42P01", "42883", "55P03")

_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(filename: str) -> dict[str, str]:
    """Load the named queries of `sql/<filename>` into a dict keyed by name."""
    text = resources.files("sql").joinpath(filename).read_text(encoding="utf-8")
    queries: dict[str, str] = {}
    parts = _QUERY_HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = [line for line in body.strip().splitlines() if not line.startswith("--")]
        queries[name] = "\n".join(lines).strip()
    return queries


def is_transient(exc: BaseException) -> bool:
    """Return True when `exc` is a database or network fault worth retrying unchanged."""
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError)):
        # The client side lost the connection or the pool is closing.
        return True
    if isinstance(exc, asyncpg.InvalidCachedStatementError):
        # A migration changed a table under a prepared statement; asyncpg drops its cache entry.
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state.startswith(_TRANSIENT_CLASSES) or state in _TRANSIENT_STATES
    return isinstance(exc, (OSError, asyncio.TimeoutError, ConnectionError))


async def create_pool(
    dsn: str,
    *,
    size: int,
    connect_timeout: float,
    application_name: str,
    min_size: int | None = None,
    keep_session_state: bool = False,
) -> asyncpg.Pool:
    """Create a pool; connections are opened lazily, so this succeeds while Postgres is down.

    With `keep_session_state`, a released connection skips asyncpg's reset query, which
    costs a round trip on every release. Use it only for statements that leave no session state
    behind: no session-level advisory locks, LISTEN, SET, prepared cursors or temporary
    tables. An open transaction is still rolled back on release either way.
    """
    return await asyncpg.create_pool(
        dsn,
        min_size=0 if min_size is None else min_size,
        max_size=size,
        timeout=connect_timeout,
        max_inactive_connection_lifetime=300,
        server_settings={"application_name": application_name},
        reset=_skip_reset if keep_session_state else None,
        connect=_connect,
    )


class ConnectionRejected(ConnectionError):
    """Error of a connection that Postgres rejected: the database or role does not exist,
    the password is wrong, or the database accepts no connections. A fault of the setup,
    not of a statement, so callers treat it as an outage (`is_transient`)."""


async def _connect(*args, **kwargs) -> asyncpg.Connection:
    """Open a pool's connection, and raise ConnectionRejected when Postgres rejects it.

    Without it, the rejection (3D000 no such database, 28P01 wrong password and others)
    reaches the worker as a PostgresError, which it would blame on the events of the batch
    and dead-letter them one by one. The API would answer 500 instead of 503.
    """
    try:
        return await asyncpg.connect(*args, **kwargs)
    except asyncpg.PostgresError as exc:
        raise ConnectionRejected(f"{type(exc).__name__}: {exc}") from exc


class FairGate:
    """A first-come, first-served limit on concurrent users of a pool.

    asyncio's primitives let a newly arriving task take a freed slot before the tasks
    already waiting for one. Under load a few unlucky requests then wait for a long time,
    which shows as a high p99 with a low median. Here a freed slot is handed to the oldest waiter.
    """

    def __init__(self, slots: int):
        self._free = slots
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as this task was cancelled: pass it on.
                self._release()
            else:
                self._waiters.remove(waiter)
            raise

    async def __aexit__(self, *_exc) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


async def _skip_reset(connection: asyncpg.Connection) -> None:
    """Release a connection without asyncpg's reset query; see `create_pool`."""
