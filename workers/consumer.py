"""The worker: consume events, apply them in batches, settle after the commit.

Flow per batch: take up to `WORKER_BATCH_SIZE` messages (waiting at most
`WORKER_BATCH_WAIT_MS` after the first), decode each (`workers.contract`), apply the
valid ones in one transaction (`workers.projector`), then settle every message as
`workers.settlement` says. Acks go out only after the commit.

Faults, and what the worker does about them:

- RabbitMQ unreachable at start: `start()` retries with backoff until it connects or
  `stop()` is called; readiness stays false meanwhile.
- RabbitMQ connection lost later: aio-pika's robust connection reconnects and its
  robust channel declares the topology again and restores the prefetch (basic.qos)
  and the consumer. Messages of the lost channel were returned to the queue by the
  broker: buffered copies are dropped, and the acks of a batch in flight fail and are
  logged once per batch. The redelivered copies are duplicates in the event log.
- A transient database error says nothing about the messages: the worker cancels its
  consumer (readiness turns false), retries the same batch with backoff, and consumes
  again once the commit succeeds; no valid event is dead-lettered because of an outage.
- A migration that changes the result type of a prepared statement: the batch is
  retried at once on a fresh statement (see `_apply_with_retry`).
- A table or function of this release missing (the migrations have not run yet): an
  outage like the others, so the batch waits for the migration (`db.is_transient`).
- A message that crashed workers before: see `_SUSPECT_DELIVERIES`.
- SIGTERM: the consumer is cancelled at once, the batch in flight finishes and is
  settled, and closing the channel returns every other message to the queue. Every
  broker operation on the way out is bounded, so a broker that is down cannot hold
  the process past its grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import aio_pika
import aiormq
import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from yarl import URL

from service import db
from service.settings import Settings
from workers import topology
from workers.contract import AccountEvent, Event, ImageEvent, InvalidEvent, decode
from workers.hooks import TestHooks
from workers.metrics import WorkerMetrics
from workers.projector import BatchResult, apply_batch
from workers.settlement import Outcome, Settlement, settlement_for

log = structlog.get_logger("worker")

T = TypeVar("T")

_RETRY_INITIAL = 0.1  # seconds before the first retry of a batch after a database error
_RETRY_MAX = 5.0  # maximum pause between retries
_BROKER_TIMEOUT = 5.0  # seconds any single broker operation may take
_CONNECT_TIMEOUT = 10.0  # seconds one connection attempt may take, topology included
_CONNECT_RETRY_INITIAL = 0.5  # seconds before the second connection attempt at start
_CONNECT_RETRY_MAX = 10.0  # maximum pause between connection attempts at start
_RECONNECT_INTERVAL = 2  # seconds between the robust connection's reconnection attempts
_CONSUMER_CHECK_INTERVAL = 1.0  # seconds between checks that a wanted consumer runs
_DETAIL_LIMIT = 1000  # characters of a rejection's detail kept in the dead-letter header

# A quorum queue counts every return of a message (a nack with requeue, or the channel
# closing while the message is unacknowledged) in its `x-delivery-count` header. A
# worker that crashes returns every message it holds, so a message that crashes
# workers takes the messages delivered with it along, and they all reach the delivery
# limit together. From this many returns on, a message is a suspect. The worker stops
# consuming, settles every other message it holds, then processes the suspects one at a
# time, fewest returns first and in random order among equals. So each crash returns
# only the suspects not processed yet, and every innocent one is eventually processed.
# Two, because one graceful restart returns up to a prefetch of messages at once.
_SUSPECT_DELIVERIES = 2

# Errors raised when a migration changed a table under a prepared statement.
_SCHEMA_CHANGED = (asyncpg.InvalidCachedStatementError, asyncpg.exceptions.OutdatedSchemaCacheError)

# Permanent broker errors: retrying the connection cannot fix them, so start() raises.
_PERMANENT_BROKER_ERRORS = (aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ChannelAccessRefused)


class ShuttingDown(Exception):
    """The worker is stopping and leaves the current batch for redelivery."""


def _correlation_id(message: AbstractIncomingMessage) -> str | None:
    if message.correlation_id:
        return str(message.correlation_id)
    value = (message.headers or {}).get("x-correlation-id")
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """Return how often the queue has returned this message (0 for a first delivery)."""
    value = (message.headers or {}).get("x-delivery-count")
    return value if isinstance(value, int) else 0


def _channel_closed(message: AbstractIncomingMessage) -> bool:
    """Return whether the message's channel is closed, so the broker has requeued it."""
    try:
        # aio-pika raises instead of returning a closed channel.
        return message.channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return True


class Worker:
    """One consumer on the event queue, with its pool and its health state."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: WorkerMetrics | None = None,
        apply_account_event=None,
        hooks: TestHooks | None = None,
    ):
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        if apply_account_event is None:
            from service.accounts import apply_account_event
        self._apply_account_event = apply_account_event
        self._hooks = hooks if hooks is not None else TestHooks.from_env()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._topology: topology.Topology | None = None
        self._pool: asyncpg.Pool | None = None
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        # Messages taken from the buffer and put back, served before the buffer.
        self._front: list[AbstractIncomingMessage] = []
        # Suspects held aside, unsettled, while other messages are processed; a multiple
        # ack must not settle them (see `_ack`).
        self._aside: list[AbstractIncomingMessage] = []
        # Buffered messages skipped since the last batch because their channel closed.
        self._stale_dropped = 0
        self._consumer_tag: str | None = None
        # Why the consumer is cancelled on purpose ("database", "suspects"); it runs
        # only while this is empty.
        self._pause_reasons: set[str] = set()
        self._consumer_wanted = asyncio.Event()
        self._keeper: asyncio.Task | None = None
        self._cancelling: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self.database_ok = False
        self._broker_lost = False
        self.batches = 0
        self._identity = f"{socket.gethostname()}:{os.getpid()}"
        self.metrics.consumer_active.set_function(lambda: 1 if self.consumer_active else 0)

    # Health, read by the worker's HTTP endpoint.

    @property
    def consumer_active(self) -> bool:
        """Whether the consumer is registered on an open channel of an open connection."""
        if self._consumer_tag is None or self._connection is None or self._channel is None:
            return False
        if self._connection.is_closed or self._channel.is_closed:
            return False
        # NOTE: aio-pika 10 keeps the open aiormq channel in the private `_channel`
        # attribute; its `consumers` are the consumers the broker confirmed on it. Checked
        # so that a consumer the robust channel failed to restore counts as inactive.
        underlay = getattr(self._channel, "_channel", None)
        consumers = getattr(getattr(underlay, "channel", None), "consumers", None)
        return consumers is None or self._consumer_tag in consumers

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
        """Open the pool, connect to RabbitMQ and start consuming.

        Retries the connection with backoff until it succeeds or `stop()` is called, so
        a worker started while RabbitMQ is down waits for it instead of exiting. The
        pool connects lazily, so a worker started while Postgres is down starts too,
        and pauses on its first batch. Raises only on a permanent broker error, such as
        a queue declared earlier with other arguments.
        """
        settings = self.settings
        self._pool = await db.create_pool(
            settings.database_url,
            size=max(2, min(settings.db_pool_size, 4)),
            connect_timeout=settings.db_connect_timeout,
            application_name="cloudapi-images-worker",
            keep_session_state=True,  # locks are transaction-scoped
        )
        self.metrics.watch_pool(self._pool)
        await self.check_database()

        attempt = 0
        delay = _CONNECT_RETRY_INITIAL
        while not self._stopping.is_set():
            attempt += 1
            try:
                if not await self._unless_stopped(self._connect()):
                    break
            except _PERMANENT_BROKER_ERRORS:
                await self._close_connection()
                raise
            except Exception as exc:  # noqa: BLE001 (any other failure may pass; retry)
                await self._close_connection()
                pause = delay * (0.5 + random.random())
                log.warning("broker_connect_failed", attempt=attempt, error=repr(exc), retry_in_s=round(pause, 2))
                await self._sleep_unless_stopped(pause)
                delay = min(delay * 2, _CONNECT_RETRY_MAX)
                continue
            if attempt > 1:
                log.info("broker_connected", attempts=attempt)
            self._keeper = asyncio.create_task(self._keep_consumer(), name="worker-consumer-keeper")
            return

    async def _connect(self) -> None:
        settings = self.settings
        connection = aio_pika.RobustConnection(
            URL(settings.amqp_url),
            client_properties={"connection_name": f"cloudapi-images-worker {self._identity}"},
            reconnect_interval=_RECONNECT_INTERVAL,
        )
        self._connection = connection
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            await connection.connect(timeout=_CONNECT_TIMEOUT)
            connection.reconnect_callbacks.add(self._on_reconnect)
            connection.close_callbacks.add(self._on_connection_lost)
            self._channel = await connection.channel(publisher_confirms=True)
            # The robust channel stores the prefetch and sets it again on every new channel.
            await self._channel.set_qos(prefetch_count=settings.worker_prefetch)
            self._topology = await topology.declare(self._channel, settings)
            await self._consume()

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = None
        self._topology = None
        if connection is None:
            return
        try:
            async with asyncio.timeout(_BROKER_TIMEOUT):
                await connection.close()
        except Exception as exc:  # noqa: BLE001 (the broker may be down; the socket goes anyway)
            log.warning("broker_close_failed", error=repr(exc))

    async def _unless_stopped(self, awaitable: Awaitable[T]) -> bool:
        """Await `awaitable` unless `stop()` comes first, which cancels it; return
        whether it ran to the end. Its exception, if any, propagates."""
        task = asyncio.ensure_future(awaitable)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _consume(self) -> None:
        # A tag of our own, so that a consume whose reply is lost can still be cancelled.
        tag = f"cloudapi-images-worker-{uuid.uuid4().hex}"
        try:
            async with asyncio.timeout(_BROKER_TIMEOUT):
                await self._topology.queue.consume(self._on_message, no_ack=False, consumer_tag=tag)
        except BaseException:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_BROKER_TIMEOUT):
                    await self._topology.queue.cancel(tag)
            raise
        self._consumer_tag = tag
        log.info(
            "consumer_started",
            queue=self.settings.amqp_queue,
            prefetch=self.settings.worker_prefetch,
            consumer_tag=tag,
        )

    async def _cancel_consumer(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        if tag is None or self._topology is None:
            return
        try:
            # RobustQueue.cancel removes the consumer from those it restores before it
            # sends basic.cancel, so a reconnection never restores it, even on a timeout.
            async with asyncio.timeout(_BROKER_TIMEOUT):
                await self._topology.queue.cancel(tag)
        except Exception as exc:  # noqa: BLE001 (the channel may be gone; nothing to cancel then)
            log.warning("consumer_cancel_failed", consumer_tag=tag, error=repr(exc))
        else:
            log.info("consumer_cancelled", consumer_tag=tag)

    async def _keep_consumer(self) -> None:
        """Start the consumer again whenever it is wanted and not running, e.g. after a
        database outage ended while RabbitMQ was down too."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CONSUMER_CHECK_INTERVAL):
                    await self._consumer_wanted.wait()
            self._consumer_wanted.clear()
            if self._stopping.is_set() or self._pause_reasons or self._consumer_tag is not None:
                continue
            try:
                await self._consume()
            except Exception as exc:  # noqa: BLE001 (retried at the next check)
                log.warning("consumer_start_failed", error=repr(exc), retry_in_s=_CONSUMER_CHECK_INTERVAL)

    async def _pause(self, reason: str) -> None:
        """Cancel the consumer until `_resume(reason)`; messages already delivered stay held."""
        self._pause_reasons.add(reason)
        if self._consumer_tag is not None:
            await self._cancel_consumer()

    async def _resume(self, reason: str) -> None:
        self._pause_reasons.discard(reason)
        if self._pause_reasons or self._stopping.is_set() or self._consumer_tag is not None:
            return
        try:
            await self._consume()
        except Exception as exc:  # noqa: BLE001 (readiness stays false; the keeper retries)
            log.warning("consumer_restart_failed", error=repr(exc))
            self._consumer_wanted.set()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    def _on_connection_lost(self, _sender, error=None) -> None:
        # Called again for every failed reconnection attempt; logged once per outage.
        if not self._stopping.is_set() and not self._broker_lost:
            self._broker_lost = True
            log.warning("broker_connection_lost", error=repr(error))

    def _on_reconnect(self, *_args) -> None:
        # Messages of the old channel were returned to the queue by the broker; their
        # buffered copies are skipped when a batch is taken (see `_next_batch`).
        self._broker_lost = False
        log.info("broker_reconnected", consumer_restored=self.consumer_active, prefetch=self.settings.worker_prefetch)

    def stop(self) -> None:
        """Ask the worker to stop: cancel the consumer at once, finish the batch in
        flight, and leave everything else queued."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._buffer.put_nowait(None)
        self._consumer_wanted.set()
        with contextlib.suppress(RuntimeError):  # no running loop: nothing was started
            self._cancelling = asyncio.get_running_loop().create_task(self._cancel_consumer())

    async def run(self) -> None:
        """Process batches until `stop()`; then shut down within the configured grace period."""
        try:
            while not self._stopping.is_set():
                batch = await self._next_batch()
                if not batch:
                    continue
                if _delivery_count(batch[0]) >= _SUSPECT_DELIVERIES:
                    await self._process_suspects(batch[0])
                else:
                    await self._process(batch)
        finally:
            await self._shutdown()

    async def _next_batch(self) -> list[AbstractIncomingMessage]:
        """Take the next batch from the buffer. A suspect (see `_SUSPECT_DELIVERIES`)
        ends the batch before it, and comes back as a batch of its own."""
        first = await self._take_live()
        if first is None:
            return []
        batch = [first]
        if _delivery_count(first) >= _SUSPECT_DELIVERIES:
            return batch
        size = self.settings.worker_batch_size
        deadline = time.monotonic() + self.settings.worker_batch_wait / 1000
        while len(batch) < size and not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            item = self._take_live_nowait()
            if item is _EMPTY:
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._take_live()
                except TimeoutError:
                    break
            if item is None:
                # stop() was called; process what we hold, then the loop ends.
                break
            if _delivery_count(item) >= _SUSPECT_DELIVERIES:
                self._put_back(item)
                break
            batch.append(item)
        return batch

    async def _take_live(self) -> AbstractIncomingMessage | None:
        """Wait for the next buffered message whose channel is still open (None: stop)."""
        while True:
            item = self._front.pop(0) if self._front else await self._buffer.get()
            if item is None or not _channel_closed(item):
                return item
            self._count_stale(1)

    def _take_live_nowait(self):
        while True:
            if self._front:
                item = self._front.pop(0)
            else:
                try:
                    item = self._buffer.get_nowait()
                except asyncio.QueueEmpty:
                    return _EMPTY
            if item is None or not _channel_closed(item):
                return item
            self._count_stale(1)

    def _put_back(self, item: AbstractIncomingMessage) -> None:
        self._front.insert(0, item)

    def _count_stale(self, count: int) -> None:
        self._stale_dropped += count

    def _report_stale(self) -> None:
        if self._stale_dropped:
            log.info("stale_messages_dropped", count=self._stale_dropped, reason="their channel closed; the broker redelivers them")
            self._stale_dropped = 0

    async def _process_suspects(self, first: AbstractIncomingMessage) -> None:
        """Process messages returned `_SUSPECT_DELIVERIES` times or more one at a time,
        while holding no other message, so that a crash returns only suspects."""
        await self._pause("suspects")
        try:
            # Deliveries that arrived before basic.cancel-ok reach the buffer through two
            # tasks each (aiormq's and aio-pika's); yielding lets them land first.
            for _ in range(5):
                await asyncio.sleep(0)
            suspects = [first]
            others: list[AbstractIncomingMessage] = []
            while (item := self._take_live_nowait()) is not _EMPTY:
                if item is None:
                    self._put_back_sentinel()
                    break
                (suspects if _delivery_count(item) >= _SUSPECT_DELIVERIES else others).append(item)
            log.warning(
                "suspects_isolated",
                suspects=len(suspects),
                others=len(others),
                message_ids=[message.message_id for message in suspects[:20]],
            )
            random.shuffle(suspects)
            suspects.sort(key=_delivery_count)
            self._aside = suspects
            size = self.settings.worker_batch_size
            for start in range(0, len(others), size):
                await self._process(others[start : start + size])
            while self._aside and not self._stopping.is_set():
                suspect = self._aside.pop(0)
                # If this worker dies now, this line names the message that killed it.
                log.warning("suspect_processing", message_id=suspect.message_id, delivery_count=_delivery_count(suspect))
                await self._process([suspect])
            if self._aside:
                log.info("suspects_left_for_redelivery", count=len(self._aside))
        finally:
            self._aside = []
            await self._resume("suspects")

    def _put_back_sentinel(self) -> None:
        self._buffer.put_nowait(None)

    async def _shutdown(self) -> None:
        log.info("worker_stopping", grace_seconds=self.settings.worker_shutdown_timeout)
        if self._cancelling is not None:
            with contextlib.suppress(Exception):
                await self._cancelling
        await self._cancel_consumer()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keeper
        await self._close_connection()
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
        self._report_stale()
        self.batches += 1
        self.metrics.batch_size.observe(len(batch))
        self._hooks.crash_if_held([message.message_id for message in batch])
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
                await self._hooks.pause_after_commit_if_enabled([message.message_id for message in batch])
        except ShuttingDown:
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
        """Apply `events` in one transaction, retrying transient failures until it commits;
        raise ShuttingDown when the worker stops first, and any other error at once."""
        delay = _RETRY_INITIAL
        failures = 0
        schema_changes = 0
        while True:
            started = time.perf_counter()
            try:
                async with self._pool.acquire() as connection:
                    result = await apply_batch(connection, events, apply_account_event=self._apply_account_event)
            except _SCHEMA_CHANGED as exc:
                # A migration changed a table under a statement this connection prepared.
                # asyncpg dropped its copy but cannot retry inside a transaction. Every
                # pooled connection may hit this once, so retry at once, up to the pool
                # size, without pausing; beyond that it counts as an outage.
                schema_changes += 1
                if schema_changes <= self._pool.get_max_size():
                    log.info("statement_cache_invalidated", error=repr(exc), retry=schema_changes)
                    continue
                error = exc
            except Exception as exc:
                if not db.is_transient(exc):
                    raise
                error = exc
            else:
                self.metrics.apply_seconds.observe(time.perf_counter() - started)
                if not self.database_ok:
                    self._set_database_ok(True)
                if failures:
                    log.info("database_recovered", retries=failures)
                    await self._resume("database")
                return result

            failures += 1
            self._set_database_ok(False)
            if failures == 1:
                log.warning("database_unavailable", error=repr(error), batch=len(events))
                await self._pause("database")
            if self._stopping.is_set():
                raise ShuttingDown() from error
            await self._sleep_unless_stopped(delay * (0.5 + random.random()))
            delay = min(delay * 2, _RETRY_MAX)

    # Settlement.

    async def _settle(
        self,
        batch: Sequence[AbstractIncomingMessage],
        outcomes: dict[int, Outcome],
        details: dict[int, tuple[str, str]],
    ) -> None:
        """Settle a batch: dead-letter, then nack what could not be dead-lettered, then ack.

        A message is acked only after its dead-letter copy is confirmed. When a
        dead-letter publish fails, the original is returned with a nack (requeue) and
        the other dead letters of the batch are returned without trying, so a broker
        that is down costs one timeout per batch, not one per message.
        """
        to_ack: list[AbstractIncomingMessage] = []
        to_return: list[AbstractIncomingMessage] = []
        left: list[AbstractIncomingMessage] = []
        broker_failed = False
        for message in batch:
            settlement = settlement_for(outcomes[id(message)])
            if settlement is Settlement.ACK:
                to_ack.append(message)
            elif settlement is Settlement.DEAD_LETTER:
                reason, detail = details[id(message)]
                if not broker_failed and await self._dead_letter(message, reason, detail):
                    to_ack.append(message)
                else:
                    broker_failed = True
                    to_return.append(message)
            else:
                # HOLD never reaches here (the batch is retried until it commits or the
                # worker stops); LEAVE is not settled at all.
                left.append(message)
        failed = await self._nack(to_return)
        ack_failed, error = await self._ack(to_ack, unsettled=left + self._aside)
        failed += ack_failed
        if failed:
            # One line per batch, not per message.
            log.warning("stale_acks", count=failed, batch=len(batch), error=error)

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
        except Exception as exc:  # noqa: BLE001 (returned to the queue: redelivered, dead-lettered again)
            log.warning("dead_letter_publish_failed", error=repr(exc), message_id=message.message_id)
            return False
        self.metrics.dead_lettered.labels(reason).inc()
        return True

    async def _nack(self, messages: Sequence[AbstractIncomingMessage]) -> int:
        """Return messages to the queue; return how many could not be (their channel is
        gone, and the broker has returned them already)."""
        failed = 0
        for message in messages:
            try:
                async with asyncio.timeout(_BROKER_TIMEOUT):
                    await message.nack(requeue=True)
            except Exception:  # noqa: BLE001 (counted and logged once per batch by the caller)
                failed += 1
        return failed

    async def _ack(
        self, messages: Sequence[AbstractIncomingMessage], *, unsettled: Sequence[AbstractIncomingMessage]
    ) -> tuple[int, str | None]:
        """Ack `messages`; return how many acks failed, and the last error.

        One `multiple` ack per channel when it is safe. A batch is taken from the head of
        the buffer in delivery order, and earlier batches are settled. So on a channel
        where no message the worker holds stays `unsettled` (nacked ones are settled
        first), every unsettled tag up to the batch's highest belongs to `messages`.
        Otherwise each message is acked on its own, so that the messages left unsettled,
        and the suspects held aside, stay unsettled.
        """
        if not messages:
            return 0, None
        live = [message for message in messages if not _channel_closed(message)]
        failed = len(messages) - len(live)
        error = "ChannelInvalidStateError('channel closed')" if failed else None
        unsettled_channels = {id(message.channel) for message in unsettled if not _channel_closed(message)}
        by_channel: dict[int, list[AbstractIncomingMessage]] = {}
        for message in live:
            by_channel.setdefault(id(message.channel), []).append(message)
        for key, group in by_channel.items():
            if key in unsettled_channels:
                acks = [(message, False) for message in group]
            else:
                acks = [(max(group, key=lambda message: message.delivery_tag), True)]
            for index, (message, multiple) in enumerate(acks):
                try:
                    async with asyncio.timeout(_BROKER_TIMEOUT):
                        await message.ack(multiple=multiple)
                except Exception as exc:  # noqa: BLE001 (channel gone: the broker redelivers; duplicates are harmless)
                    error = repr(exc)
                    if multiple:
                        failed += len(group)
                    elif _channel_closed(message):
                        # The other acks on this channel would fail the same way.
                        failed += len(acks) - index
                        break
                    else:
                        failed += 1
        return failed, error

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


_EMPTY = object()  # marks an empty buffer in `_take_live_nowait`


async def run_worker(settings: Settings, worker: Worker) -> int:
    """Start `worker`, run it until SIGTERM or SIGINT, and return the exit status."""
    import signal

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    try:
        await worker.start()
    except _PERMANENT_BROKER_ERRORS as exc:
        log.error("worker_start_failed", error=repr(exc))
        await worker._shutdown()
        return 1
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
