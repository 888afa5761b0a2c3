"""One Postgres LISTEN connection per API process, feeding the in-memory caches.

Workers and the operator commands send `NOTIFY` inside the transaction that changes a
row, so a notification arrives only after the change is visible. While the listening
connection is down nothing tells a cache about changes, so every subscriber is told to
flush and to stay disabled until the connection is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import asyncpg
import structlog

log = structlog.get_logger("notify")

# Channels and their payloads (comma-separated ids, or "*" for "everything changed").
IMAGE_CHANNEL = "image_changed"
ACCOUNT_CHANNEL = "account_changed"
FLUSH_ALL = "*"

_HEALTH_INTERVAL = 5.0  # seconds between liveness checks of the listening connection
_HEALTH_TIMEOUT = 2.0  # seconds a liveness check may take


class Subscriber:
    """What a cache implements to follow one channel."""

    def on_change(self, ids: list[str]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_flush(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def set_enabled(self, enabled: bool) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class ChangeListener:
    """Keep a LISTEN connection open, reconnecting with backoff, and dispatch payloads."""

    def __init__(self, dsn: str, *, connect_timeout: float, retry_max: float = 5.0):
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._retry_max = retry_max
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._task: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self.reconnects = 0
        self.connect_failures = 0  # failed attempts since the last connection

    def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        self._subscribers.setdefault(channel, []).append(subscriber)
        subscriber.set_enabled(False)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until the listener is connected; return False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="change-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._set_all(enabled=False)

    def _set_all(self, *, enabled: bool) -> None:
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.on_flush()
                subscriber.set_enabled(enabled)

    def _dispatch(self, _connection, _pid, channel: str, payload: str) -> None:
        subscribers = self._subscribers.get(channel, ())
        if payload == FLUSH_ALL:
            for subscriber in subscribers:
                subscriber.on_flush()
            log.info("cache_flushed", channel=channel, reason="notification")
            return
        ids = [part for part in payload.split(",") if part]
        for subscriber in subscribers:
            subscriber.on_change(ids)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(
                    self._dsn,
                    timeout=self._connect_timeout,
                    server_settings={"application_name": "cloudapi-images-listener"},
                )
                closed = asyncio.get_running_loop().create_future()
                connection.add_termination_listener(
                    lambda _c: closed.done() or closed.set_result(None)
                )
                for channel in self._subscribers:
                    await connection.add_listener(channel, self._dispatch)
                # LISTEN is active, so every change from here on is announced: start
                # caching from an empty state.
                self._set_all(enabled=True)
                self._connected.set()
                self.connect_failures = 0
                delay = 0.1
                log.info("listener_connected", channels=sorted(self._subscribers))
                while not closed.done():
                    done, _ = await asyncio.wait({closed}, timeout=_HEALTH_INTERVAL)
                    if done:
                        break
                    await connection.fetchval("SELECT 1", timeout=_HEALTH_TIMEOUT)
                raise ConnectionError("listening connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (any failure means: flush, retry)
                was_connected = self._connected.is_set()
                self._connected.clear()
                self._set_all(enabled=False)
                if was_connected:
                    self.reconnects += 1
                    log.warning("listener_disconnected", error=repr(exc))
                    log.info("cache_flushed", reason="listener_disconnected")
                else:
                    # The first failure is a warning, so a DATABASE_URL that Postgres rejects
                    # shows in the log at startup. Its retries are debug lines.
                    self.connect_failures += 1
                    report = log.warning if self.connect_failures == 1 else log.debug
                    report("listener_connect_failed", error=repr(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._retry_max)
            finally:
                if connection is not None and not connection.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), timeout=1.0)

