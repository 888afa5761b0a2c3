"""The worker: consume events, apply them in batches, settle after the commit.

Flow per batch: take up to `WORKER_BATCH_SIZE` messages (waiting at most
`WORKER_BATCH_WAIT_MS` after the first), decode each (`workers.contract`), apply the
valid ones in one transaction (`workers.projector`), then settle every message as
`workers.settlement` says. Acks go out only after the commit.

A transient database or network error says nothing about the messages: the worker
cancels its consumer (readiness turns false), retries the same batch with backoff, and
consumes again once the commit succeeds; no valid event is dead-lettered because of an
outage. On SIGTERM it cancels the consumer first, finishes the batch in flight, and
closes the channel, which returns every unsettled message to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from service import db
from service.settings import Settings
from workers import topology
from workers.contract import AccountEvent, Event, ImageEvent, InvalidEvent, decode
from workers.metrics import WorkerMetrics
from workers.projector import BatchResult, apply_batch
from workers.settlement import Outcome, Settlement, settlement_for

log = structlog.get_logger("worker")

_RETRY_INITIAL = 0.1  # seconds before the first retry of a batch after a database error
_RETRY_MAX = 5.0  # longest pause between retries
_BROKER_TIMEOUT = 5.0  # seconds any single broker operation may take during shutdown
_DETAIL_LIMIT = 1000  # characters of a rejection's detail kept in the dead-letter header


class ShuttingDown(Exception):
    """The worker is stopping and leaves the current batch for redelivery."""


def _correlation_id(message: AbstractIncomingMessage) -> str | None:
    if message.correlation_id:
        return str(message.correlation_id)
    value = (message.headers or {}).get("x-correlation-id")
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class Worker:
    """One consumer on the event queue, with its pool and its health state."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: WorkerMetrics | None = None,
        apply_account_event=None,
    ):
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        if apply_account_event is None:
            from service.accounts import apply_account_event
        self._apply_account_event = apply_account_event
        self._connection: AbstractRobustConnection | None = None
        self._channel = None
        self._topology: topology.Topology | None = None
        self._pool: asyncpg.Pool | None = None
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._consumer_tag: str | None = None
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._paused = False
        self.database_ok = False
        self.batches = 0
        self._identity = f"{socket.gethostname()}:{os.getpid()}"

    # Health, read by the worker's HTTP endpoint.

    @property
    def consumer_active(self) -> bool:
        return (
            self._consumer_tag is not None
            and self._connection is not None
            and not self._connection.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    @property
    def ready(self) -> bool:
        return self.consumer_active and self.database_ok and not self._stopping.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def check_database(self, timeout: float = 1.0) -> bool:
        """Ping Postgres through the pool; used by readiness."""
        if self._pool is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                async with self._pool.acquire() as connection:
                    await connection.fetchval("SELECT 1")
        except Exception:  # noqa: BLE001 (any failure means "not ready")
            self._set_database_ok(False)
            return False
        self._set_database_ok(True)
        return True

    def _set_database_ok(self, value: bool) -> None:
        self.database_ok = value
        self.metrics.database_available.set(1 if value else 0)

    # Life cycle.

    async def start(self) -> None:
        """Open the pool and the broker connection, declare the topology, start consuming."""
        settings = self.settings
        self._pool = await db.create_pool(
            settings.database_url,
            size=max(2, min(settings.db_pool_size, 4)),
            connect_timeout=settings.db_connect_timeout,
            application_name="cloudapi-images-worker",
        )
        self.metrics.watch_pool(self._pool)
        await self.check_database()
        self._connection = await aio_pika.connect_robust(
            settings.amqp_url,
            client_properties={"connection_name": f"cloudapi-images-worker {self._identity}"},
            timeout=10,
        )
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._channel = await self._connection.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=settings.worker_prefetch)
        self._topology = await topology.declare(self._channel, settings)
        await self._consume()

    async def _consume(self) -> None:
        self._consumer_tag = await self._topology.queue.consume(self._on_message, no_ack=False)
        self.metrics.consumer_active.set(1)
        log.info(
            "consumer_started",
            queue=self.settings.amqp_queue,
            prefetch=self.settings.worker_prefetch,
            consumer_tag=self._consumer_tag,
        )

    async def _cancel_consumer(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        self.metrics.consumer_active.set(0)
        if tag is None or self._topology is None:
            return
        try:
            async with asyncio.timeout(_BROKER_TIMEOUT):
                await self._topology.queue.cancel(tag)
        except Exception as exc:  # noqa: BLE001 (the channel may be gone; nothing to cancel then)
            log.warning("consumer_cancel_failed", error=repr(exc))
        else:
            log.info("consumer_cancelled", consumer_tag=tag)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    def _on_connection_lost(self, *_args) -> None:
        if not self._stopping.is_set():
            log.warning("broker_connection_lost")

    def _on_reconnect(self, *_args) -> None:
        # Messages of the old channel were returned to the queue by the broker when the
        # connection dropped; drop our copies so they are not applied twice for nothing.
        dropped = 0
        while not self._buffer.empty():
            item = self._buffer.get_nowait()
            if item is not None:
                dropped += 1
            else:
                self._buffer.put_nowait(None)
                break
        log.info("broker_reconnected", dropped_buffered=dropped, prefetch=self.settings.worker_prefetch)

    def stop(self) -> None:
        """Ask the worker to stop: finish the batch in flight, leave the rest queued."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._buffer.put_nowait(None)

    async def run(self) -> None:
        """Process batches until `stop()`; then shut down within the configured grace period."""
        try:
            while not self._stopping.is_set():
                batch = await self._next_batch()
                if batch:
                    await self._process(batch)
        finally:
            await self._shutdown()

    async def _next_batch(self) -> list[AbstractIncomingMessage]:
        first = await self._buffer.get()
        if first is None:
            return []
        batch = [first]
        size = self.settings.worker_batch_size
        deadline = time.monotonic() + self.settings.worker_batch_wait / 1000
        while len(batch) < size:
            try:
                item = self._buffer.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._buffer.get()
                except TimeoutError:
                    break
            if item is None:
                # stop() was called; process what we hold, then the loop ends.
                break
            batch.append(item)
        return batch

    async def _shutdown(self) -> None:
        log.info("worker_stopping", grace_seconds=self.settings.worker_shutdown_timeout)
        await self._cancel_consumer()
        if self._connection is not None:
            try:
                async with asyncio.timeout(_BROKER_TIMEOUT):
                    await self._connection.close()
            except Exception as exc:  # noqa: BLE001 (the broker may be down; unsettled messages return anyway)
                log.warning("broker_close_failed", error=repr(exc))
        if self._pool is not None:
            try:
                async with asyncio.timeout(_BROKER_TIMEOUT):
                    await self._pool.close()
            except Exception:  # noqa: BLE001
                self._pool.terminate()
        self._stopped.set()
        log.info("worker_stopped")

    # One batch.

    async def _process(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        self.batches += 1
        self.metrics.batch_size.observe(len(batch))
        decoded: list[tuple[AbstractIncomingMessage, Event]] = []
        outcomes: dict[int, Outcome] = {}
        details: dict[int, tuple[str, str]] = {}
        for message in batch:
            try:
                event = decode(message.body, max_bytes=self.settings.event_max_bytes)
            except InvalidEvent as exc:
                outcomes[id(message)] = Outcome.INVALID
                details[id(message)] = (exc.reason.value, exc.detail)
                continue
            decoded.append((message, event))

        committed_at = None
        try:
            if decoded:
                results = await self._apply_isolating([event for _, event in decoded])
                committed_at = datetime.now(UTC)
                for (message, event), (outcome, detail) in zip(decoded, results):
                    outcomes[id(message)] = outcome
                    if detail is not None:
                        details[id(message)] = ("rejected_by_database", detail)
        except ShuttingDown:
            for message, _ in decoded:
                outcomes.setdefault(id(message), Outcome.SHUTTING_DOWN)
            for message in batch:
                outcomes.setdefault(id(message), Outcome.SHUTTING_DOWN)

        await self._settle(batch, outcomes, details)
        self._log_outcomes(batch, decoded, outcomes, details, committed_at)

    async def _apply_isolating(self, events: list[Event]) -> list[tuple[Outcome, str | None]]:
        """Apply events; if Postgres refuses the batch, split it to find the events it refuses."""
        try:
            result = await self._apply_with_retry(events)
        except asyncpg.PostgresError as exc:
            if len(events) == 1:
                log.warning("event_rejected_by_database", event_id=events[0].event_id, error=repr(exc))
                return [(Outcome.REJECTED_BY_DATABASE, f"{type(exc).__name__}: {exc}")]
            middle = len(events) // 2
            return await self._apply_isolating(events[:middle]) + await self._apply_isolating(events[middle:])
        return [(outcome, None) for outcome in result.outcomes]

    async def _apply_with_retry(self, events: list[Event]) -> BatchResult:
        delay = _RETRY_INITIAL
        failures = 0
        while True:
            started = time.perf_counter()
            try:
                async with self._pool.acquire() as connection:
                    result = await apply_batch(connection, events, apply_account_event=self._apply_account_event)
            except Exception as exc:
                if not db.is_transient(exc):
                    raise
                failures += 1
                self._set_database_ok(False)
                if failures == 1:
                    log.warning("database_unavailable", error=repr(exc), batch=len(events))
                    await self._pause()
                if self._stopping.is_set():
                    raise ShuttingDown() from exc
                try:
                    async with asyncio.timeout(delay * (0.5 + random.random())):
                        await self._stopping.wait()
                except TimeoutError:
                    pass
                delay = min(delay * 2, _RETRY_MAX)
                continue
            self.metrics.apply_seconds.observe(time.perf_counter() - started)
            if not self.database_ok:
                self._set_database_ok(True)
            if failures:
                log.info("database_recovered", retries=failures)
                await self._resume()
            return result

    async def _pause(self) -> None:
        if not self._paused and self._consumer_tag is not None:
            self._paused = True
            await self._cancel_consumer()

    async def _resume(self) -> None:
        if self._paused and not self._stopping.is_set():
            self._paused = False
            try:
                await self._consume()
            except Exception as exc:  # noqa: BLE001 (readiness stays false; the next batch retries)
                self._paused = True
                log.warning("consumer_restart_failed", error=repr(exc))

    # Settlement.

    async def _settle(
        self,
        batch: Sequence[AbstractIncomingMessage],
        outcomes: dict[int, Outcome],
        details: dict[int, tuple[str, str]],
    ) -> None:
        to_ack: list[AbstractIncomingMessage] = []
        for message in batch:
            settlement = settlement_for(outcomes[id(message)])
            if settlement is Settlement.ACK:
                to_ack.append(message)
            elif settlement is Settlement.DEAD_LETTER:
                reason, detail = details[id(message)]
                if await self._dead_letter(message, reason, detail):
                    to_ack.append(message)
            # HOLD never reaches here (the batch is retried until it commits or the worker
            # stops); LEAVE is not settled at all.
        await self._ack(to_ack)

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str, detail: str) -> bool:
        headers = dict(message.headers or {})
        headers.update(
            {
                "x-rejection-reason": reason,
                "x-rejection-detail": detail[:_DETAIL_LIMIT],
                "x-original-exchange": message.exchange or "",
                "x-original-routing-key": message.routing_key or "",
                "x-rejected-at": datetime.now(UTC).isoformat(),
                "x-rejected-by": self._identity,
            }
        )
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
        )
        try:
            async with asyncio.timeout(_BROKER_TIMEOUT):
                await self._topology.dead_letter_exchange.publish(copy, routing_key=message.routing_key or "")
        except Exception as exc:  # noqa: BLE001 (left unsettled: redelivered, dead-lettered again)
            log.warning("dead_letter_publish_failed", error=repr(exc), message_id=message.message_id)
            return False
        self.metrics.dead_lettered.labels(reason).inc()
        return True

    async def _ack(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Ack with one `multiple` ack per channel: a batch is settled in delivery order,
        so every unsettled tag at or below the batch's highest belongs to this batch."""
        if not messages:
            return
        last_per_channel: dict[int, AbstractIncomingMessage] = {}
        counts: dict[int, int] = {}
        for message in messages:
            key = id(message.channel)
            counts[key] = counts.get(key, 0) + 1
            current = last_per_channel.get(key)
            if current is None or message.delivery_tag > current.delivery_tag:
                last_per_channel[key] = message
        failed = 0
        for key, message in last_per_channel.items():
            try:
                async with asyncio.timeout(_BROKER_TIMEOUT):
                    await message.ack(multiple=True)
            except Exception as exc:  # noqa: BLE001 (channel gone: the broker redelivers; duplicates are harmless)
                failed += counts[key]
                error = repr(exc)
        if failed:
            # One line per batch, not per message.
            log.warning("stale_acks", count=failed, error=error)

    def _log_outcomes(self, batch, decoded, outcomes, details, committed_at) -> None:
        events = {id(message): event for message, event in decoded}
        for message in batch:
            outcome = outcomes[id(message)]
            event = events.get(id(message))
            fields = {"outcome": outcome.value, "message_id": message.message_id, "redelivered": message.redelivered}
            correlation_id = _correlation_id(message)
            if correlation_id:
                fields["correlation_id"] = correlation_id
            if event is not None:
                fields["event_id"] = event.event_id
                fields["type"] = event.type
                fields["revision"] = event.revision
                if isinstance(event, ImageEvent):
                    fields["image_uuid"] = event.image_uuid
                elif isinstance(event, AccountEvent):
                    fields["account_uuid"] = event.account_uuid
                if outcome is Outcome.APPLIED and committed_at is not None:
                    lag = (committed_at - event.time).total_seconds()
                    fields["lag_ms"] = round(lag * 1000, 1)
                    self.metrics.lag_seconds.observe(max(lag, 0.0))
            self.metrics.events.labels(event.type if event is not None else "unknown", outcome.value).inc()
            if outcome in (Outcome.INVALID, Outcome.REJECTED_BY_DATABASE):
                reason, detail = details[id(message)]
                log.warning("event_rejected", reason=reason, detail=detail[:_DETAIL_LIMIT], routing_key=message.routing_key, **fields)
            elif outcome is Outcome.SHUTTING_DOWN:
                log.info("event_left_for_redelivery", **fields)
            else:
                log.info(f"event_{outcome.value}", **fields)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def run_worker(settings: Settings, worker: Worker) -> int:
    """Start `worker`, run it until SIGTERM or SIGINT, and return the exit status."""
    import signal

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    await worker.start()
    runner = asyncio.create_task(worker.run(), name="worker")
    stop_waiter = asyncio.create_task(worker._stopping.wait())
    await asyncio.wait({runner, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not runner.done():
        try:
            async with asyncio.timeout(settings.worker_shutdown_timeout):
                await asyncio.shield(runner)
        except TimeoutError:
            log.error("shutdown_timed_out", grace_seconds=settings.worker_shutdown_timeout)
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
            return 1
    stop_waiter.cancel()
    exc = runner.exception()
    if exc is not None:
        log.error("worker_failed", error=repr(exc))
        return 1
    return 0
