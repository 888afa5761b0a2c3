"""The freshness part's lean publisher (bench/amqp_publish.py) against the real RabbitMQ:
what it sends arrives as aio-pika would have sent it, and every confirm, return and
rejection reaches the caller."""

import asyncio
from datetime import UTC, datetime

import aio_pika
import pytest

from bench.amqp_publish import ConfirmingPublisher, Message, PublishError, now_text

from tests.conftest import AMQP_URL, RUN_ID
from tests.helpers import DEFAULT_TIMEOUT

TIME_LENGTH = len("2026-12-06T04:00:00.123Z")


def _message(exchange: str, index: int, routing_key: str = "image.updated") -> Message:
    return Message(exchange=exchange, routing_key=routing_key, head=b'{"n": %d, "time": "' % index,
                   tail=b'"}', time_length=TIME_LENGTH, message_id=f"event-{index}", message_type=routing_key)


class Recorder:
    def __init__(self):
        self.confirms: dict[int, bool] = {}
        self.returns: list[tuple[str, str]] = []

    def on_confirm(self, tag: int, ok: bool) -> None:
        assert tag not in self.confirms, f"tag {tag} confirmed twice"
        self.confirms[tag] = ok

    def on_return(self, message_id: str, reason: str) -> None:
        self.returns.append((message_id, reason))


async def _until(condition) -> None:
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
async def bound_queue():
    """A topic exchange and a quorum queue bound to it for image.updated, removed after the test."""
    exchange_name, queue_name = f"test-{RUN_ID}.bench-publish", f"test-{RUN_ID}.bench-publish.events"
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
    await queue.bind(exchange, "image.updated")
    try:
        yield exchange_name, queue
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        await connection.close()


async def _publish_confirmed(recorder: Recorder, messages: list[Message], sent_at: datetime) -> list[int]:
    """Publish `messages` on a new connection, wait until all are confirmed, and return their tags."""
    publisher = await ConfirmingPublisher.connect(AMQP_URL, recorder.on_confirm, recorder.on_return)
    try:
        tags = [publisher.publish(message.frames(sent_at, now_text(sent_at))) for message in messages]
        await _until(lambda: publisher.unconfirmed == 0)
    finally:
        await publisher.close()
    return tags


async def test_published_messages_arrive_confirmed(bound_queue):
    exchange, queue = bound_queue
    recorder = Recorder()
    sent_at = datetime.now(UTC)
    tags = await _publish_confirmed(recorder, [_message(exchange, index) for index in range(50)], sent_at)

    assert tags == list(range(1, 51))
    assert recorder.confirms == {tag: True for tag in tags}
    assert recorder.returns == []
    received = []
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        while len(received) < 50:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.01)
            else:
                received.append(message)
    first = received[0]
    assert first.body == b'{"n": 0, "time": "' + now_text(sent_at) + b'"}'
    assert first.message_id == "event-0"
    assert first.type == "image.updated"
    assert first.content_type == "application/json"
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.timestamp == sent_at.replace(microsecond=0)
    assert [message.message_id for message in received] == [f"event-{index}" for index in range(50)]


async def test_unroutable_message_is_returned(bound_queue):
    exchange, _ = bound_queue
    recorder = Recorder()
    await _publish_confirmed(recorder, [_message(exchange, 7, routing_key="image.nobody")], datetime.now(UTC))

    assert recorder.returns == [("event-7", "312 NO_ROUTE")]
    assert recorder.confirms == {1: True}


async def test_missing_exchange_closes_channel():
    recorder = Recorder()
    publisher = await ConfirmingPublisher.connect(AMQP_URL, recorder.on_confirm, recorder.on_return)
    now = datetime.now(UTC)
    try:
        publisher.publish(_message(f"test-{RUN_ID}.no-such-exchange", 1).frames(now, now_text(now)))
        await _until(lambda: publisher.error is not None)
        assert "404" in str(publisher.error)
        with pytest.raises(PublishError):
            publisher.publish(_message(f"test-{RUN_ID}.no-such-exchange", 2).frames(now, now_text(now)))
    finally:
        await publisher.close()
    assert recorder.confirms == {}


async def test_wrong_password_is_an_error():
    url = AMQP_URL.replace("guest:guest@", "guest:not-the-password@")
    assert url != AMQP_URL
    recorder = Recorder()
    with pytest.raises(PublishError):
        await ConfirmingPublisher.connect(url, recorder.on_confirm, recorder.on_return, timeout=DEFAULT_TIMEOUT)


async def test_body_over_frame_size_raises():
    recorder = Recorder()
    publisher = await ConfirmingPublisher.connect(AMQP_URL, recorder.on_confirm, recorder.on_return)
    try:
        fits = _message("x", 1)
        large = Message(exchange="x", routing_key="image.updated", head=b"x" * (publisher.max_body + 1), tail=b"",
                        time_length=TIME_LENGTH, message_id="large", message_type="image.updated")
        publisher.check_size(fits)
        with pytest.raises(PublishError, match="larger than the broker's frame"):
            publisher.check_size(large)
    finally:
        await publisher.close()
    assert publisher.max_body > 0


def test_wrong_time_length_raises():
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match="24 bytes"):
        _message("x", 1).frames(now, b"2026-12-06T04:00:00Z")
