"""Helpers of the fault tests: settings on private servers, workers in this process or
as `python -m workers` subprocesses, broker inspection through rabbitmqctl, and the
read model expected from the events a test published."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import orjson

from service.migrate import migrate
from service.settings import Settings
from tests.helpers import manifest
from tests.support.instances import PrivatePostgres, PrivateRabbit
from workers.contract import apply_imgapi_defaults
from workers.health import start_health_server
from workers.hooks import TestHooks
from workers.producer import EventPublisher, image_event

ROOT = Path(__file__).resolve().parents[2]

# Maximum seconds a fault test waits for the system to converge after a fault.
CONVERGE_TIMEOUT = 60.0


async def poll(condition, *, timeout: float = CONVERGE_TIMEOUT, interval: float = 0.1, message: str = "condition"):
    """Call `condition` (sync or async) until it returns a truthy value; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = condition()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}; last value: {last!r}")
        await asyncio.sleep(interval)


# Databases and settings.


async def fresh_database(postgres: PrivatePostgres) -> str:
    """Create and migrate a database of its own on `postgres`; return its DSN."""
    dsn = await asyncio.to_thread(postgres.create_database, f"faults_{secrets.token_hex(4)}")
    await migrate(dsn)
    return dsn


def fault_settings(database_url: str, amqp_url: str, **overrides: Any) -> Settings:
    """Settings with exchange and queue names of their own, for one test."""
    prefix = f"faults-{secrets.token_hex(4)}"
    values: dict[str, Any] = {
        "database_url": database_url,
        "amqp_url": amqp_url,
        "amqp_exchange": f"{prefix}.images",
        "amqp_queue": f"{prefix}.images.read-model",
        "metrics_port": 0,
        "worker_http_port": 0,
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


def worker_environment(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment of a `python -m workers` subprocess that uses `settings`."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CLOUDAPI_TEST_", "WORKER_", "AMQP_", "DATABASE_", "DB_"))
    }
    environment.update(
        {
            "DATABASE_URL": settings.database_url,
            "AMQP_URL": settings.amqp_url,
            "AMQP_EXCHANGE": settings.amqp_exchange,
            "AMQP_QUEUE": settings.amqp_queue,
            "AMQP_DELIVERY_LIMIT": str(settings.amqp_delivery_limit),
            "WORKER_PREFETCH": str(settings.worker_prefetch),
            "WORKER_BATCH_SIZE": str(settings.worker_batch_size),
            "WORKER_BATCH_WAIT_MS": str(int(settings.worker_batch_wait)),
            "WORKER_SHUTDOWN_TIMEOUT": str(int(settings.worker_shutdown_timeout)),
            "WORKER_HTTP_PORT": "0",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
            "PYTHONPATH": str(ROOT),
        }
    )
    environment.update(extra)
    return environment


# Events and the read model they lead to.


def image_histories(images: int, revisions: int, *, delete_every: int = 0, name_prefix: str = "rev") -> list[dict[str, Any]]:
    """Return events for `images` images with `revisions` revisions each, shuffled.

    Every `delete_every`-th image ends with `image.deleted` (0: none). Revisions of one
    image are published out of order on purpose: the highest one must win.
    """
    events = []
    for index in range(images):
        image = manifest()
        for revision in range(1, revisions + 1):
            if delete_every and index % delete_every == 0 and revision == revisions:
                events.append(image_event("image.deleted", image_uuid=image["uuid"], revision=revision))
            else:
                events.append(image_event("image.updated", {**image, "name": f"{name_prefix}-{revision}"}, revision=revision))
    random.shuffle(events)
    return events


def expected_read_model(events: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, Any]]:
    """Return per image UUID (revision, manifest or None when deleted) of the highest revision."""
    newest: dict[str, Mapping[str, Any]] = {}
    for event in events:
        if not event["type"].startswith("image."):
            continue
        current = newest.get(event["image_uuid"])
        if current is None or event["revision"] > current["revision"]:
            newest[event["image_uuid"]] = event
    return {
        image_uuid: (event["revision"], apply_imgapi_defaults(event["manifest"]) if "manifest" in event else None)
        for image_uuid, event in newest.items()
    }


async def read_model(dsn: str, image_uuids: Iterable[str]) -> dict[str, tuple[int, Any]]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await connection.fetch(
            "SELECT uuid::text, revision, manifest::text FROM images WHERE uuid = ANY($1::uuid[])", list(image_uuids)
        )
    finally:
        await connection.close()
    return {row["uuid"]: (row["revision"], orjson.loads(row["manifest"]) if row["manifest"] else None) for row in rows}


async def logged_event_ids(dsn: str) -> list[str]:
    """Return the event ids of the image events in the event log, one entry per row."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await connection.fetch("SELECT event_id::text FROM event_log WHERE type LIKE 'image.%' ORDER BY seq")
    finally:
        await connection.close()
    return [row["event_id"] for row in rows]


async def assert_read_model(dsn: str, events: list[Mapping[str, Any]]) -> None:
    """Check the read model and the event log against the events published."""
    expected = expected_read_model(events)
    actual = await read_model(dsn, expected)
    wrong = {uuid: (actual.get(uuid), want) for uuid, want in expected.items() if actual.get(uuid) != want}
    assert not wrong, f"{len(wrong)} of {len(expected)} images differ; first: {next(iter(wrong.items()))}"
    logged = await logged_event_ids(dsn)
    assert len(logged) == len(set(logged)), "an event id is in the event log twice"
    assert set(logged) == {event["event_id"] for event in events}


async def wait_all_logged(dsn: str, events: list[Mapping[str, Any]], *, timeout: float = CONVERGE_TIMEOUT) -> None:
    wanted = {event["event_id"] for event in events}

    async def all_logged():
        return wanted <= set(await logged_event_ids(dsn))

    await poll(all_logged, timeout=timeout, interval=0.2, message=f"{len(wanted)} events in the event log")


async def publish(settings: Settings, events: Iterable[Mapping[str, Any]]) -> int:
    async with EventPublisher.connect(settings) as publisher:
        return await publisher.publish_many(events)


# The broker, seen through rabbitmqctl on a private node.


def _rabbitmqctl_json(rabbit: PrivateRabbit, *args: str) -> list[dict[str, Any]]:
    result = rabbit.rabbitmqctl(*args, "--formatter", "json", "--quiet", timeout=30)
    text = result.stdout.strip()
    return orjson.loads(text) if text else []


async def queue_counts(rabbit: PrivateRabbit, queue: str) -> dict[str, int]:
    """Return messages_ready, messages_unacknowledged and consumers of `queue`.

    NOTE: for a quorum queue, RabbitMQ 3.10 refreshes these figures on the queue's tick,
    every 5 s, so they lag behind. Poll them for a steady state (see `until_counts`),
    and use `ready_count` for an exact number of ready messages.
    """
    rows = await asyncio.to_thread(
        _rabbitmqctl_json, rabbit, "list_queues", "name", "messages_ready", "messages_unacknowledged", "consumers"
    )
    for row in rows:
        if row["name"] == queue:
            return {key: int(row[key]) for key in ("messages_ready", "messages_unacknowledged", "consumers")}
    raise AssertionError(f"queue {queue} not found on node {rabbit.node_name}")


async def until_counts(rabbit: PrivateRabbit, queue: str, *, timeout: float = 20.0, **expected: int) -> dict[str, int]:
    """Poll `queue_counts` until every figure named in `expected` has its value; return them."""

    async def matches():
        counts = await queue_counts(rabbit, queue)
        return counts if all(counts[key] == value for key, value in expected.items()) else None

    return await poll(matches, timeout=timeout, interval=0.5, message=f"queue {queue} to reach {expected}")


async def ready_count(settings: Settings, queue: str) -> int:
    """Return the exact number of ready messages in `queue` (a passive declare)."""
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count
    finally:
        await connection.close()


async def consumers(rabbit: PrivateRabbit, queue: str) -> list[dict[str, Any]]:
    """Return the consumers of `queue` with their tags and prefetch counts."""
    rows = await asyncio.to_thread(_rabbitmqctl_json, rabbit, "list_consumers", "queue_name", "consumer_tag", "prefetch_count")
    return [row for row in rows if row["queue_name"] == queue]


async def nothing_settled(rabbit, settings, published: int) -> None:
    """Check that every published message is still in the queue, ready or held.

    A settled message never comes back. So a sum that reaches `published` while nothing
    can commit proves that none was settled. Polled, because the figures lag.
    """
    counts = await queue_counts(rabbit, settings.amqp_queue)
    if counts["messages_ready"] + counts["messages_unacknowledged"] != published:
        await poll(
            lambda: _sum_is(rabbit, settings, published), timeout=20, interval=0.5, message=f"{published} messages in the queue"
        )


async def _sum_is(rabbit, settings, published: int) -> bool:
    counts = await queue_counts(rabbit, settings.amqp_queue)
    return counts["messages_ready"] + counts["messages_unacknowledged"] == published


async def queue_empty(rabbit, settings) -> bool:
    """Return whether the queue is empty: no ready message (exact) and none unacknowledged (lagging)."""
    if await ready_count(settings, settings.amqp_queue):
        return False
    counts = await queue_counts(rabbit, settings.amqp_queue)
    return counts["messages_unacknowledged"] == 0


async def publish_raw(settings: Settings, body: bytes, message_id: str, routing_key: str = "image.updated") -> None:
    """Publish `body` as it is, bypassing the producer's contract check."""
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.amqp_exchange)
        await exchange.publish(
            aio_pika.Message(body, message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=routing_key,
        )
    finally:
        await connection.close()


async def dead_letters(settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """Take every message of the dead-letter queue; return (message id, headers) of each."""
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    taken = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.dead_letter_queue, passive=True)
        while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
            taken.append((message.message_id, dict(message.headers or {})))
    finally:
        await connection.close()
    return taken


# Postgres.


@contextlib.asynccontextmanager
async def images_locked(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold a SHARE lock on `images`, so a worker's batch blocks inside its transaction
    until the block exits (or the connection dies)."""
    connection = await asyncpg.connect(dsn, timeout=10)
    transaction = connection.transaction()
    await transaction.start()
    await connection.execute("LOCK TABLE images IN SHARE MODE")
    try:
        yield connection
    finally:
        with contextlib.suppress(Exception):
            await transaction.rollback()
        with contextlib.suppress(Exception):
            await connection.close(timeout=5)


async def worker_blocked_on_lock(dsn: str) -> bool:
    """Return whether a worker backend waits for a lock, so its batch is inside its transaction."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return bool(
            await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = 'cloudapi-images-worker' AND wait_event_type = 'Lock'"
            )
        )
    finally:
        await connection.close()


# Workers.


@dataclass
class InProcessWorker:
    """A Worker running in this event loop, with its health endpoint on a free port."""

    worker: Any
    task: asyncio.Task
    health_url: str
    http: aiohttp.ClientSession

    async def readiness(self) -> int:
        try:
            async with self.http.get(self.health_url + "/readyz", timeout=aiohttp.ClientTimeout(total=5)) as response:
                await response.read()
                return response.status
        except aiohttp.ClientError:
            return 0

    async def ready_is(self, status: int) -> bool:
        return await self.readiness() == status


@contextlib.asynccontextmanager
async def in_process_worker(settings: Settings, *, stop_timeout: float = 30.0) -> AsyncIterator[InProcessWorker]:
    """Run a Worker (start, then run) in a task; stop it and check it stopped on exit.

    The task is created before `start()` returns, so a test can start a worker while
    RabbitMQ is down.
    """
    from workers.consumer import Worker

    worker = Worker(settings, hooks=TestHooks())
    runner = await start_health_server(worker, "127.0.0.1", 0)
    port = runner.addresses[0][1]

    async def main() -> None:
        await worker.start()
        await worker.run()

    task = asyncio.create_task(main(), name="fault-test-worker")
    http = aiohttp.ClientSession()
    try:
        yield InProcessWorker(worker, task, f"http://127.0.0.1:{port}", http)
        assert not task.done(), f"the worker stopped on its own: {task.exception() if not task.cancelled() else 'cancelled'}"
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=stop_timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise AssertionError(f"the worker did not stop within {stop_timeout:g} s") from None
        finally:
            await http.close()
            await runner.cleanup()


@dataclass
class WorkerProcess:
    """`python -m workers` as a subprocess, its JSON log lines in a file."""

    process: subprocess.Popen
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, settings: Settings, log_path: Path, **extra_env: str) -> WorkerProcess:
        log_file = open(log_path, "ab")  # noqa: SIM115 (closed with the process, in `stop`)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "workers"],
                env=worker_environment(settings, **extra_env),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        finally:
            log_file.close()
        return cls(process, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            os.kill(self.process.pid, signum)

    async def wait(self, timeout: float) -> int:
        """Wait for the process to exit and return its status; fail after `timeout` s."""
        await poll(lambda: not self.running(), timeout=timeout, interval=0.05, message=f"worker {self.pid} to exit")
        return self.process.returncode

    def stop(self) -> None:
        """SIGKILL the process by pid if it still runs, and reap it."""
        if self.running():
            os.kill(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def log_lines(self) -> list[dict[str, Any]]:
        """Return the JSON log lines written so far (other lines are skipped)."""
        lines = []
        for line in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                value = orjson.loads(line)
                if isinstance(value, dict):
                    lines.append(value)
        return lines

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == event]
