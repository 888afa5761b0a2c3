"""Build and publish valid events: the library for producers, used by `seed` and `publish`.

    async with EventPublisher.connect(settings) as publisher:
        event = image_event("image.activated", manifest, revision=2)
        await publisher.publish(event)

Every event is checked against the contract before it leaves (the same `decode()` the
workers run), published persistent and mandatory on a channel with publisher confirms,
so `publish()` returns only once RabbitMQ has the message in a queue; it raises when the
broker refuses the message or cannot route it (no queue bound).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson

from service.settings import Settings
from workers import topology
from workers.contract import CONTRACT_VERSION, IMAGE_EVENT_TYPES, decode


class PublishFailed(Exception):
    """RabbitMQ did not confirm an event (refused, unroutable, or connection lost)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def image_event(
    event_type: str,
    manifest: Mapping[str, Any] | None = None,
    *,
    revision: int,
    image_uuid: str | None = None,
    event_id: str | None = None,
    time: str | None = None,
) -> dict[str, Any]:
    """Return an image event; `manifest` is required except for `image.deleted`."""
    if event_type not in IMAGE_EVENT_TYPES:
        raise ValueError(f"unknown image event type {event_type!r}; expected one of {', '.join(IMAGE_EVENT_TYPES)}")
    if image_uuid is None:
        if manifest is None:
            raise ValueError("image_uuid is required when there is no manifest")
        image_uuid = manifest["uuid"]
    event: dict[str, Any] = {
        "contract_version": CONTRACT_VERSION,
        "event_id": event_id or str(uuid.uuid4()),
        "type": event_type,
        "image_uuid": image_uuid,
        "revision": revision,
        "time": time or _now(),
    }
    if event_type != "image.deleted":
        if manifest is None:
            raise ValueError(f"{event_type} needs the manifest as it stands after the change")
        event["manifest"] = dict(manifest)
    return event


def account_event(
    event_type: str,
    account_uuid: str,
    *,
    revision: int,
    login: str | None = None,
    disabled: bool = False,
    key_name: str | None = None,
    public_key: str | None = None,
    event_id: str | None = None,
    time: str | None = None,
) -> dict[str, Any]:
    """Return an `account.upserted`, `account.key.added` or `account.key.removed` event."""
    event: dict[str, Any] = {
        "contract_version": CONTRACT_VERSION,
        "event_id": event_id or str(uuid.uuid4()),
        "type": event_type,
        "account_uuid": account_uuid,
        "revision": revision,
        "time": time or _now(),
    }
    if event_type == "account.upserted":
        event["account"] = {"login": login, "disabled": disabled}
    elif event_type == "account.key.added":
        event["key"] = {"name": key_name, "public_key": public_key}
    elif event_type == "account.key.removed":
        event["key"] = {"name": key_name}
    else:
        raise ValueError(f"unknown account event type {event_type!r}")
    return event


class EventPublisher:
    """A connection and a confirming channel to the event exchange."""

    def __init__(self, settings: Settings, connection, channel, exchange):
        self._settings = settings
        self._connection = connection
        self._channel = channel
        self._exchange = exchange

    @classmethod
    def connect(cls, settings: Settings, *, declare_topology: bool = True) -> _Connecting:
        """Connect to RabbitMQ; use as `async with EventPublisher.connect(settings) as p:`.

        With `declare_topology` (the default) the queues are declared too, so events
        published before any worker has started are kept, not dropped as unroutable.
        """
        return _Connecting(cls, settings, declare_topology)

    async def publish(self, event: Mapping[str, Any], *, correlation_id: str | None = None) -> None:
        """Validate `event`, publish it and wait for the broker's confirm."""
        body = orjson.dumps(event)
        decode(body, max_bytes=self._settings.event_max_bytes)
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(event["event_id"]),
            correlation_id=correlation_id,
            type=str(event["type"]),
            timestamp=datetime.now(UTC),
        )
        try:
            confirmation = await self._exchange.publish(message, routing_key=str(event["type"]), mandatory=True)
        except Exception as exc:
            raise PublishFailed(f"event {event['event_id']} ({event['type']}) was not confirmed: {exc!r}") from exc
        if confirmation is not None and not isinstance(confirmation, aio_pika.abc.AbstractMessage):
            # aiormq returns Basic.Ack on success, Basic.Nack or Basic.Return otherwise.
            name = type(confirmation).__name__
            if name != "Ack":
                raise PublishFailed(f"event {event['event_id']} ({event['type']}) was not confirmed: {name}")

    async def publish_many(self, events: Iterable[Mapping[str, Any]], *, window: int = 256) -> int:
        """Publish events keeping up to `window` confirms in flight; return the count.

        Events of one image are published in the order given; their revisions keep the
        read model right even if the broker delivers them in another order.
        """
        count = 0
        pending: list[asyncio.Task] = []
        for event in events:
            pending.append(asyncio.ensure_future(self.publish(event)))
            count += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
        if pending:
            await asyncio.gather(*pending)
        return count

    async def close(self) -> None:
        await self._connection.close()


class _Connecting:
    def __init__(self, cls, settings: Settings, declare_topology: bool):
        self._cls = cls
        self._settings = settings
        self._declare = declare_topology
        self._publisher: EventPublisher | None = None

    async def __aenter__(self) -> EventPublisher:
        settings = self._settings
        connection = await aio_pika.connect(
            settings.amqp_url, timeout=10, client_properties={"connection_name": "cloudapi-images-producer"}
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            if self._declare:
                exchange = (await topology.declare(channel, settings)).exchange
            else:
                exchange = await topology.declare_exchange(channel, settings)
        except BaseException:
            await connection.close()
            raise
        self._publisher = self._cls(settings, connection, channel, exchange)
        return self._publisher

    async def __aexit__(self, *_exc) -> None:
        if self._publisher is not None:
            await self._publisher.close()
