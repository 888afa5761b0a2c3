"""The confirm bookkeeping of bench/amqp_publish.py, fed with frames the way the socket
delivers them: acks and nacks, `multiple` or not, split across reads. The real broker
is tested in tests/integration/test_bench_publisher.py."""

import pytest
from pamqp import commands, frame

from bench.amqp_publish import CHANNEL, ConfirmingPublisher, PublishError


class Transport:
    """The writing end of a connection, recording what was written."""

    def __init__(self):
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def _publisher() -> tuple[ConfirmingPublisher, dict[int, bool]]:
    confirms: dict[int, bool] = {}
    publisher = ConfirmingPublisher(lambda tag, ok: confirms.setdefault(tag, ok), lambda message_id, reason: None)
    publisher.connection_made(Transport())
    return publisher, confirms


def _frame(command) -> bytes:
    return frame.marshal(command, CHANNEL)


def test_multiple_nack_then_ack():
    publisher, confirms = _publisher()
    tags = [publisher.publish(b"frames") for _ in range(4)]

    publisher.data_received(_frame(commands.Basic.Nack(delivery_tag=2, multiple=True)))
    publisher.data_received(_frame(commands.Basic.Ack(delivery_tag=4)))

    assert tags == [1, 2, 3, 4]
    assert confirms == {1: False, 2: False, 4: True}
    assert publisher.unconfirmed == 1
    publisher.data_received(_frame(commands.Basic.Ack(delivery_tag=4, multiple=True)))
    assert confirms[3] is True
    assert publisher.unconfirmed == 0


def test_frames_split_across_reads():
    publisher, confirms = _publisher()
    for _ in range(3):
        publisher.publish(b"frames")
    data = _frame(commands.Basic.Ack(delivery_tag=1)) + _frame(commands.Basic.Ack(delivery_tag=3, multiple=True))

    for start in range(0, len(data), 5):
        publisher.data_received(data[start:start + 5])

    assert confirms == {1: True, 2: True, 3: True}


def test_ack_of_unknown_tag_is_ignored():
    publisher, confirms = _publisher()
    publisher.publish(b"frames")

    publisher.data_received(_frame(commands.Basic.Ack(delivery_tag=7)))

    assert confirms == {}
    assert publisher.unconfirmed == 1


def test_connection_close_sets_error():
    publisher, _ = _publisher()

    publisher.data_received(frame.marshal(commands.Connection.Close(reply_code=320, reply_text="CONNECTION_FORCED",
                                                                    class_id=0, method_id=0), 0))

    assert "320 CONNECTION_FORCED" in str(publisher.error)
    assert publisher._transport.written[-1] == frame.marshal(commands.Connection.CloseOk(), 0)


async def test_amqps_url_is_rejected():
    with pytest.raises(PublishError, match="invalid AMQP URL scheme amqps://"):
        await ConfirmingPublisher.connect("amqps://guest:guest@127.0.0.1:5671/", lambda tag, ok: None,
                                          lambda message_id, reason: None)
