"""Request ids in the API's log lines and headers; event and correlation ids in the
worker's log lines."""

from __future__ import annotations

import uuid

import aio_pika
import orjson

from tests.conftest import AMQP_URL
from tests.helpers import manifest, wait_until
from workers.producer import EventPublisher, image_event


async def _get(http, url: str, headers: dict[str, str]):
    async with http.get(url, headers=headers) as response:
        await response.read()
        return response.status, response.headers


async def test_request_id_in_every_log_line(api, http, accounts, captured_logs):
    path = f"/my/images/{uuid.uuid4()}"
    # A key alice does not have: the auth stage logs a warning inside the request.
    signed = accounts["alice"].sign("GET", path, key_id="/alice/keys/no-such-key")

    status, headers = await _get(http, api + path, {"x-request-id": "trace:42.a-b_c", **signed})

    assert status == 401
    assert headers["Request-Id"] == "trace:42.a-b_c"
    lines = [line for line in captured_logs if line["event"] in ("auth_rejected", "request_served")]
    assert [line["event"] for line in lines] == ["auth_rejected", "request_served"]
    assert [line.get("request_id") for line in lines] == ["trace:42.a-b_c"] * 2


async def test_malformed_request_id_replaced(api, http, captured_logs):
    status, headers = await _get(http, api + "/--ping", {"Request-Id": "has space"})

    served = [line for line in captured_logs if line["event"] == "request_served"]
    assert status == 200
    assert headers["Request-Id"] != "has space"
    assert str(uuid.UUID(headers["Request-Id"])) == headers["Request-Id"]
    assert [line["request_id"] for line in served] == [headers["Request-Id"]]


async def test_correlation_id_in_event_log_lines(running_worker, broker_settings, captured_logs):
    from_property = image_event("image.activated", manifest(), revision=1)
    from_header = image_event("image.activated", manifest(), revision=1)

    async with EventPublisher.connect(broker_settings) as publisher:
        await publisher.publish(from_property, correlation_id="order-7")
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(broker_settings.amqp_exchange)
        message = aio_pika.Message(
            orjson.dumps(from_header), content_type="application/json", headers={"x-correlation-id": "order-8"}
        )
        await exchange.publish(message, routing_key=from_header["type"])
        # Not an event at all: its line has no event id, but still the correlation id.
        await exchange.publish(aio_pika.Message(b"[1, 2", correlation_id="order-9"), routing_key="image.created")
    finally:
        await connection.close()

    def applied(event_id: str) -> list[dict]:
        return [line for line in captured_logs if line["event"] == "event_applied" and line.get("event_id") == event_id]

    def rejected() -> list[dict]:
        return [line for line in captured_logs if line["event"] == "event_rejected" and line.get("correlation_id") == "order-9"]

    async def all_logged():
        return applied(from_property["event_id"]) and applied(from_header["event_id"]) and rejected()

    await wait_until(all_logged, message="both events applied and the broken message rejected")

    assert [line.get("correlation_id") for line in applied(from_property["event_id"])] == ["order-7"]
    assert [line.get("correlation_id") for line in applied(from_header["event_id"])] == ["order-8"]
    assert [line["reason"] for line in rejected()] == ["not_json"]
