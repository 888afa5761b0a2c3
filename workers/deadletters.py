"""`python -m workers dead-letters ...`: look at the dead-letter queue and replay from it.

`list` prints each dead letter's reason and returns it to the queue. `replay` publishes
the original body to the event exchange with its original routing key (publisher
confirms, persistent), then removes the dead letter; a message that breaks the contract
again is simply dead-lettered again, with its new reason. Both can filter on the reason
and on message ids, and look at each message that was in the queue when they started
once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

import aio_pika
import orjson

from service.settings import Settings
from workers import topology

_RECEIVE_TIMEOUT = 1.0  # seconds to wait for the next dead letter before stopping


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def describe(message: aio_pika.abc.AbstractIncomingMessage) -> dict[str, object]:
    """Return the fields of a dead letter that tell what happened to it."""
    headers = message.headers or {}
    reason = _text(headers.get("x-rejection-reason"))
    detail = _text(headers.get("x-rejection-detail"))
    if not reason and "x-death" in headers:
        # Dead-lettered by RabbitMQ itself, e.g. over the delivery limit.
        deaths = headers["x-death"]
        reason = _text(deaths[0].get("reason")) if deaths else "unknown"
        detail = f"dead-lettered by RabbitMQ from queue {_text(deaths[0].get('queue'))}" if deaths else ""
    return {
        "message_id": _text(message.message_id),
        "routing_key": _text(headers.get("x-original-routing-key")) or _text(message.routing_key),
        "reason": reason or "unknown",
        "detail": detail,
        "rejected_at": _text(headers.get("x-rejected-at")),
        "size": len(message.body),
    }


async def _each(
    settings: Settings,
    handle: Callable,
    *,
    limit: int | None,
    reason: str | None,
    message_ids: Collection[str] | None = None,
) -> int:
    """Call `handle` on each dead letter that matches the filters; return how many.

    Every message is held unacknowledged until the end, so that each one present at the
    start is looked at once: a requeued message could otherwise come back at once and be
    taken again. `handle` returns whether it settled the message; the others, and every
    message that does not match, return to the queue when this ends.
    """
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    count = 0
    held: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        channel = await connection.channel(publisher_confirms=True)
        declared = await topology.declare(channel, settings)
        queue = declared.dead_letter_queue
        depth = queue.declaration_result.message_count
        for _ in range(depth):
            if limit is not None and count >= limit:
                break
            message = await queue.get(no_ack=False, fail=False, timeout=_RECEIVE_TIMEOUT)
            if message is None:
                break
            info = describe(message)
            if (reason is not None and info["reason"] != reason) or (message_ids and info["message_id"] not in message_ids):
                held.append(message)
                continue
            if not await handle(message, info, declared):
                held.append(message)
            count += 1
        for message in held:
            await message.nack(requeue=True)
    finally:
        await connection.close()
    return count


async def list_dead_letters(
    settings: Settings, *, limit: int | None = None, reason: str | None = None, message_ids: Collection[str] | None = None
) -> int:
    """Print dead letters as JSON lines and leave them in the queue; return the count."""

    async def show(message, info, _declared) -> bool:
        print(orjson.dumps(info).decode())
        return False

    return await _each(settings, show, limit=limit, reason=reason, message_ids=message_ids)


async def replay_dead_letters(
    settings: Settings, *, limit: int | None = None, reason: str | None = None, message_ids: Collection[str] | None = None
) -> int:
    """Republish dead letters to the event exchange, then remove them; return the count."""

    async def replay(message, info, declared) -> bool:
        headers = {key: value for key, value in (message.headers or {}).items() if not key.startswith("x-")}
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            type=message.type,
        )
        await declared.exchange.publish(copy, routing_key=info["routing_key"], mandatory=True)
        await message.ack()
        print(orjson.dumps({**info, "replayed": True}).decode())
        return True

    return await _each(settings, replay, limit=limit, reason=reason, message_ids=message_ids)


def run(coroutine) -> int:
    return asyncio.run(coroutine)
