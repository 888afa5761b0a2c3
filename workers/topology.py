"""RabbitMQ objects of the service, declared the same way by workers and producers.

- `<exchange>`: durable topic exchange; an event's routing key is its type.
- `<queue>`: durable quorum queue bound to `image.#` and `account.#`. Quorum from the
  start, because a queue's type cannot change without draining it. Its delivery limit
  dead-letters a message that keeps crashing workers; it is set high enough that
  restarts and scale-downs, which return held messages, cannot reach it.
- `<exchange>.dead-letter` (fanout) and `<queue>.dead-letter` (quorum): where the broker
  puts messages over the delivery limit, and where workers publish messages that break
  the contract, with the reason in headers. At-least-once dead-lettering, so a message is
  not dropped when the dead-letter queue is briefly unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from service.settings import Settings

BINDING_KEYS = ("image.#", "account.#")


@dataclass(frozen=True)
class Topology:
    exchange: AbstractExchange
    queue: AbstractQueue
    dead_letter_exchange: AbstractExchange
    dead_letter_queue: AbstractQueue


def queue_arguments(settings: Settings) -> dict[str, object]:
    """Arguments of the event queue; they are fixed when the queue is first declared."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.amqp_delivery_limit,
        "x-dead-letter-exchange": settings.dead_letter_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_exchange(channel: AbstractChannel, settings: Settings) -> AbstractExchange:
    return await channel.declare_exchange(settings.amqp_exchange, aio_pika.ExchangeType.TOPIC, durable=True)


async def declare(channel: AbstractChannel, settings: Settings) -> Topology:
    """Declare the exchanges and queues (idempotent) and bind them."""
    exchange = await declare_exchange(channel, settings)
    dead_letter_exchange = await channel.declare_exchange(
        settings.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_letter_queue = await channel.declare_queue(
        settings.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_letter_queue.bind(dead_letter_exchange, routing_key="")
    queue = await channel.declare_queue(settings.amqp_queue, durable=True, arguments=queue_arguments(settings))
    for key in BINDING_KEYS:
        await queue.bind(exchange, routing_key=key)
    return Topology(exchange, queue, dead_letter_exchange, dead_letter_queue)
