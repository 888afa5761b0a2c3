"""A lean AMQP 0-9-1 publisher with publisher confirms, for the freshness part's agent.

The agent publishes 1,000 events a second on the same 2 cores as everything it
measures. Through aio-pika and aiormq it used 0.2 of a core: a task, a future and
pamqp's marshalling for each event, and a wake-up for each confirm. Here every frame
of an event is marshalled before the run, and sending one writes the same bytes with
the event's time put in. The broker receives the same commands as from aio-pika:
basic.publish with `mandatory` on a channel in confirm mode, persistent messages with
the same properties.

Frames are built and parsed with pamqp, the codec under aiormq. Only what publishing
needs is handled: the handshake with PLAIN credentials, one channel, confirms
(basic.ack and basic.nack, `multiple` or not), returns of unroutable messages, and the
broker closing the channel or connection. Heartbeats are turned off.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

from pamqp import commands, frame, header
from pamqp.body import ContentBody

CHANNEL = 1  # the one channel the publisher opens
# The timestamp property of every prebuilt message, replaced when it is sent. Its
# 8 bytes (seconds since the epoch, big-endian) must occur once in the header frame.
_TIMESTAMP_PLACEHOLDER = datetime(2000, 1, 1, tzinfo=UTC)
_TIMESTAMP_BYTES = struct.pack(">Q", int(_TIMESTAMP_PLACEHOLDER.timestamp()))


# A basic.ack method frame: type 1 on CHANNEL, then class 60 and method 80 after the
# size, with a delivery tag of 8 bytes and one octet of flags.
_ACK_FRAME_START = bytes((1,)) + CHANNEL.to_bytes(2, "big")
_ACK_SIZE = 13
_ACK_METHOD = (60).to_bytes(2, "big") + (80).to_bytes(2, "big")


class PublishError(Exception):
    """The broker closed the connection or channel, or sent an unexpected reply."""


class Message:
    """The frames of one message, marshalled once. The body is `head + time + tail`,
    where `time` has the same length at every send."""

    def __init__(self, *, exchange: str, routing_key: str, head: bytes, tail: bytes, time_length: int,
                 message_id: str, message_type: str, content_type: str = "application/json"):
        method = frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
                               CHANNEL)
        properties = commands.Basic.Properties(content_type=content_type, delivery_mode=2, message_id=message_id,
                                               message_type=message_type, timestamp=_TIMESTAMP_PLACEHOLDER)
        size = len(head) + time_length + len(tail)
        content = frame.marshal(header.ContentHeader(0, size, properties), CHANNEL)
        at = content.find(_TIMESTAMP_BYTES)
        if at < 0 or content.find(_TIMESTAMP_BYTES, at + 1) >= 0:
            raise ValueError(f"message {message_id}: cannot place the timestamp in its header frame")
        body = frame.marshal(ContentBody(head + b"\0" * time_length + tail), CHANNEL)
        body_at = len(body) - 1 - size  # the body ends before the frame-end octet
        self._before_stamp = method + content[:at]
        self._after_stamp = content[at + 8:] + body[:body_at] + head
        self._tail = tail + body[-1:]
        self._time_length = time_length
        self.body_size = size

    def frames(self, sent: datetime, time_text: bytes) -> bytes:
        """Return the frames to write, with `sent` as the timestamp and `time_text` in the body."""
        if len(time_text) != self._time_length:
            raise ValueError(f"the time must be {self._time_length} bytes, not {len(time_text)}")
        return b"".join((self._before_stamp, struct.pack(">Q", int(sent.timestamp())), self._after_stamp,
                         time_text, self._tail))


class ConfirmingPublisher(asyncio.Protocol):
    """One connection and one channel in confirm mode. `publish` writes a message and
    returns its delivery tag (1, 2, ...). `on_confirm(tag, ok)` is called once for every
    tag the broker confirms, `ok` False for a nack. `on_return(message_id, reason)` is
    called for a message the broker returned as unroutable (it acks it afterwards)."""

    def __init__(self, on_confirm: Callable[[int, bool], None], on_return: Callable[[str, str], None]):
        self._on_confirm = on_confirm
        self._on_return = on_return
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._replies: asyncio.Queue = asyncio.Queue()
        self._next_tag = 1
        # Tags written and not confirmed yet, in ascending order (a dict keeps the order).
        self._outstanding: dict[int, None] = {}
        # Set by basic.return, whose content header (with the message_id) comes next.
        self._return_reason: str | None = None
        self.error: PublishError | None = None
        # The largest body that fits one frame: the negotiated frame size less the
        # frame's 8 octets of header and end (0: no limit).
        self.max_body = 0

    @classmethod
    async def connect(cls, url: str, on_confirm: Callable[[int, bool], None], on_return: Callable[[str, str], None],
                      *, timeout: float = 10.0) -> ConfirmingPublisher:
        parts = urlsplit(url)
        if parts.scheme != "amqp":
            raise PublishError(f"invalid AMQP URL scheme {parts.scheme}://: this publisher supports amqp:// only")
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, publisher = await loop.create_connection(lambda: cls(on_confirm, on_return),
                                                        parts.hostname or "localhost", parts.port or 5672)
            await publisher._handshake(unquote(parts.username or "guest"), unquote(parts.password or "guest"),
                                       unquote(parts.path[1:]) if len(parts.path) > 1 else "/")
        return publisher

    async def _handshake(self, user: str, password: str, vhost: str) -> None:
        self._write(frame.marshal(header.ProtocolHeader(), 0))
        await self._expect(commands.Connection.Start)
        self._send(0, commands.Connection.StartOk(client_properties={"connection_name": "cloudapi-images bench"},
                                                  mechanism="PLAIN", response=f"\0{user}\0{password}"))
        tune = await self._expect(commands.Connection.Tune)
        self.max_body = tune.frame_max - 8 if tune.frame_max else 0
        self._send(0, commands.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0))
        self._send(0, commands.Connection.Open(virtual_host=vhost))
        await self._expect(commands.Connection.OpenOk)
        self._send(CHANNEL, commands.Channel.Open())
        await self._expect(commands.Channel.OpenOk)
        self._send(CHANNEL, commands.Confirm.Select())
        await self._expect(commands.Confirm.SelectOk)

    def check_size(self, message: Message) -> None:
        """Raise PublishError if the message's body does not fit one frame, which this
        client cannot split."""
        if self.max_body and message.body_size > self.max_body:
            raise PublishError(f"a body of {message.body_size} bytes is larger than the broker's frame "
                               f"({self.max_body} bytes of body). This client sends each body in one frame.")

    def publish(self, frames: bytes) -> int:
        """Write one message's frames and return its delivery tag."""
        if self.error is not None:
            raise self.error
        self._write(frames)
        tag = self._next_tag
        self._next_tag += 1
        self._outstanding[tag] = None
        return tag

    @property
    def unconfirmed(self) -> int:
        return len(self._outstanding)

    async def close(self, timeout: float = 5.0) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        try:
            async with asyncio.timeout(timeout):
                self._send(0, commands.Connection.Close(reply_code=200, reply_text="bench done",
                                                        class_id=0, method_id=0))
                await self._expect(commands.Connection.CloseOk)
        except (TimeoutError, PublishError):
            pass
        finally:
            self._transport.close()

    # Frames in and out.

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise self.error or PublishError("the connection to RabbitMQ is closed")
        self._transport.write(data)

    def _send(self, channel: int, command) -> None:
        self._write(frame.marshal(command, channel))

    async def _expect(self, kind):
        reply = await self._replies.get()
        if isinstance(reply, PublishError):
            raise reply
        if not isinstance(reply, kind):
            raise PublishError(f"RabbitMQ sent {reply.name} where {kind.name} was expected")
        return reply

    def connection_made(self, transport) -> None:
        self._transport = transport

    def connection_lost(self, exc) -> None:
        if self.error is None:
            self.error = PublishError(f"the connection to RabbitMQ was lost: {exc!r}" if exc
                                      else "RabbitMQ closed the connection")
        self._replies.put_nowait(self.error)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 8:
            size = int.from_bytes(self._buffer[3:7], "big")
            if len(self._buffer) < size + 8:
                return
            raw = bytes(self._buffer[:size + 8])
            del self._buffer[:size + 8]
            if raw[:3] == _ACK_FRAME_START and size == _ACK_SIZE and raw[7:11] == _ACK_METHOD:
                # Most frames are confirms, so they are read without pamqp: the tag, then the bit.
                self._settle(int.from_bytes(raw[11:19], "big"), bool(raw[19] & 1), ok=True)
                continue
            _, channel, value = frame.unmarshal(raw)
            self._handle(channel, value)

    def _handle(self, channel: int, value) -> None:
        if isinstance(value, commands.Basic.Ack):
            self._settle(value.delivery_tag, value.multiple, ok=True)
        elif isinstance(value, commands.Basic.Nack):
            self._settle(value.delivery_tag, value.multiple, ok=False)
        elif isinstance(value, commands.Basic.Return):
            # The returned message's content header (with its message_id) and body follow.
            self._return_reason = f"{value.reply_code} {value.reply_text}"
        elif isinstance(value, header.ContentHeader):
            if self._return_reason is not None:
                self._on_return(value.properties.message_id or "", self._return_reason)
                self._return_reason = None
        elif isinstance(value, ContentBody):
            pass
        elif isinstance(value, (commands.Channel.Close, commands.Connection.Close)):
            self.error = PublishError(f"RabbitMQ closed the {'channel' if channel else 'connection'}: "
                                      f"{value.reply_code} {value.reply_text}")
            if isinstance(value, commands.Connection.Close):
                self._send(0, commands.Connection.CloseOk())
            else:
                self._send(channel, commands.Channel.CloseOk())
            self._replies.put_nowait(self.error)
        elif isinstance(value, (commands.Connection.Blocked, commands.Connection.Unblocked)):
            # A blocked broker reads nothing more until it unblocks, so writes wait in the
            # socket and the confirms come late, which the agent's confirm times show.
            pass
        elif hasattr(value, "name") and value.name != "Heartbeat":
            self._replies.put_nowait(value)

    def _settle(self, tag: int, multiple: bool, *, ok: bool) -> None:
        """Report the confirm of `tag`, or of every outstanding tag up to it when `multiple`."""
        if multiple:
            settled = []
            for pending in self._outstanding:
                if pending > tag:
                    break
                settled.append(pending)
        else:
            settled = [tag] if tag in self._outstanding else []
        for confirmed in settled:
            del self._outstanding[confirmed]
            self._on_confirm(confirmed, ok)


def now_text(now: datetime) -> bytes:
    """Format `now` as the contract writes event times, e.g. 2026-12-06T04:00:00.123Z (24 bytes)."""
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()
