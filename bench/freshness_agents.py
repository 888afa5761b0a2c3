"""The two processes of the freshness part, started by bench/freshness_part.py:

    python -m bench.freshness_agents publish PLAN.json
    python -m bench.freshness_agents poll PLAN.json

`publish` sends the events of the plan, which the orchestrator encoded and checked
against the contract before the run, as the service's producer would
(`workers.producer.EventPublisher`: persistent, mandatory, on a channel with publisher
confirms), through the lean client of bench/amqp_publish.py.
Event k goes at `t0 + k / rate` on CLOCK_MONOTONIC, with its `time` set when it is
sent. The agent records when it sent each event and when the confirm came back.

`poll` watches the sampled images. From the time an event is due, it sends signed
GetImage requests for its image until a response shows the event's marker. A new poll
goes out every max(min_interval, 10 % of the time spent so far), whether or not the
previous response has arrived, so a slow response does not delay the next poll and a
slow change costs few requests. A poll that falls due while two of its image's are
still out is skipped, so an overloaded API does not get ever more polls.
Both write a JSON result file. CLOCK_MONOTONIC is shared by all processes of the machine,
so the orchestrator can subtract one process's times from the other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import time
from datetime import UTC, datetime

import aio_pika
import aiohttp
import orjson
import uvloop

from bench.amqp_publish import ConfirmingPublisher, Message, PublishError, now_text
from service.settings import Settings
from workers import topology


# The `time` of every event in the plan's file, of the contract's shape: the agent puts
# the real time in its place when it sends the event.
TIME_PLACEHOLDER = "2000-01-01T00:00:00.000Z"

# Seconds the agent waits for the last confirms after the last send.
CONFIRM_TIMEOUT = 30.0

# Polls of one image that may wait for a response at the same time (see `poll`).
MAX_POLLS_IN_FLIGHT = 2


# The shortest pause between two sends. uvloop's call_later rounds the delay to whole
# milliseconds and runs a delay of 0 at once, so a pause of up to 0.5 ms does not pause.
# With a floor of 0.5 ms the publisher spun until each event fell due. At 1,000 events/s
# it used 0.35 of a core, against 0.19 with this floor (alone on the machine).
MIN_PAUSE = 0.001


async def pace(count: int, rate: float, t0: float, start) -> int:
    """Call `start(k)` for k in 0..count-1, in order, each at `t0 + k / rate` on
    CLOCK_MONOTONIC or soon after. Events that fall due during one pause start together
    after it. Return the number of pauses."""
    sent = 0
    pauses = 0
    while sent < count:
        now = time.monotonic()
        due = min(count, int((now - t0) * rate) + 1) if now >= t0 else 0
        while sent < due:
            start(sent)
            sent += 1
        if sent < count:
            pauses += 1
            await asyncio.sleep(max(MIN_PAUSE, t0 + sent / rate - time.monotonic()))
    return pauses


def _split(line: bytes) -> tuple[bytes, bytes, str, str]:
    """Return (body before the time, body after it, event id, type) of one event line."""
    event = orjson.loads(line)
    head, found, tail = line.rstrip(b"\n").partition(orjson.dumps(TIME_PLACEHOLDER))
    if not found:
        raise ValueError(f"invalid events file: event {event['event_id']} lacks the time {TIME_PLACEHOLDER}; "
                         "bench/run writes the file with it")
    return head + b'"', b'"' + tail, str(event["event_id"]), str(event["type"])


async def publish(plan: dict) -> dict:
    settings = Settings.from_env({}, amqp_url=plan["amqp_url"], amqp_exchange=plan["exchange"],
                                 amqp_queue=plan["queue"])
    with open(plan["events_path"], "rb") as handle:
        events = [_split(line) for line in handle]
    messages = [Message(exchange=settings.amqp_exchange, routing_key=event_type, head=head, tail=tail,
                        time_length=len(TIME_PLACEHOLDER), message_id=event_id, message_type=event_type)
                for head, tail, event_id, event_type in events]
    rate = plan["rate"]
    t0 = plan["t0"]
    sample_every = plan["sample_every"]
    called = [0.0] * len(events)
    confirmed = [0.0] * len(events)
    failures: list[str] = []

    # The topology of workers.producer.EventPublisher, declared the same way.
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    try:
        await topology.declare(await connection.channel(), settings)
    finally:
        await connection.close()

    def on_confirm(tag: int, ok: bool) -> None:
        # Tags count from 1 in the order of sending, and events are sent in index order.
        confirmed[tag - 1] = time.monotonic()
        if not ok:
            failures.append(f"event {tag - 1}: the broker nacked it")

    def on_return(message_id: str, reason: str) -> None:
        failures.append(f"event {message_id}: returned as unroutable ({reason})")

    publisher = await ConfirmingPublisher.connect(settings.amqp_url, on_confirm, on_return)
    try:
        for message in messages:
            publisher.check_size(message)

        def start(index: int) -> None:
            called[index] = time.monotonic()
            now = datetime.now(UTC)
            try:
                publisher.publish(messages[index].frames(now, now_text(now)))
            except PublishError as exc:
                failures.append(f"event {index}: {exc}")

        # Full collections scan every live object, the loaded events included, and sends
        # stalled by up to 97 ms late in a run. So the events are frozen out of collection.
        gc.collect()
        gc.freeze()
        await pace(len(events), rate, t0, start)
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while publisher.unconfirmed and publisher.error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if publisher.unconfirmed:
            failures.append(f"{publisher.unconfirmed} events not confirmed: {publisher.error or 'timed out'}")
    finally:
        await publisher.close()

    lags = sorted(called[k] - (t0 + k / rate) for k in range(len(events)))
    return {
        "count": len(events),
        "first_call": called[0],
        "last_call": called[-1],
        "publish_lag_p50": lags[len(lags) // 2],
        "publish_lag_p99": lags[int(len(lags) * 0.99)],
        "confirm_p99": sorted(c - s for c, s in zip(confirmed, called))[int(len(events) * 0.99)],
        "samples": {str(k): [called[k], confirmed[k]] for k in range(0, len(events), sample_every)},
        "failures": failures[:20],
        "failure_count": len(failures),
    }


async def poll(plan: dict) -> dict:
    t0 = plan["t0"]
    min_interval = plan["min_interval"]
    timeout = plan["timeout"]
    base = plan["base_url"]
    seen: dict[str, dict] = {}
    # The plan's samples live through the run, so they are frozen out of collection
    # too (see `publish`).
    gc.collect()
    gc.freeze()
    connector = aiohttp.TCPConnector(limit=plan["connections"])
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        async def watch(sample: dict) -> None:
            start = t0 + sample["scheduled"]
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            marker = sample["marker"].encode()
            found = asyncio.Event()
            state = {"seen": None, "last_negative_sent": None, "polls": 0, "errors": 0}

            async def one_poll() -> None:
                sent = time.monotonic()
                try:
                    async with session.get(base + sample["path"], headers=sample["headers"]) as response:
                        body = await response.read()
                        status = response.status
                except aiohttp.ClientError:
                    status, body = 0, b""
                received = time.monotonic()
                state["polls"] += 1
                if status == 200 and marker in body:
                    if state["seen"] is None or received < state["seen"]:
                        state["seen"] = received
                    found.set()
                elif status != 200:
                    state["errors"] += 1
                elif state["last_negative_sent"] is None or sent > state["last_negative_sent"]:
                    state["last_negative_sent"] = sent

            # Polls go out on a schedule, so the figure is late by at most one interval
            # plus the round trip of the poll that shows the change. A poll that falls due
            # while MAX_POLLS_IN_FLIGHT are out is skipped, because it would only add load
            # to the API that the figure measures.
            in_flight = []
            while not found.is_set():
                waited = time.monotonic() - start
                if waited > timeout:
                    break
                if sum(1 for task in in_flight if not task.done()) < MAX_POLLS_IN_FLIGHT:
                    in_flight.append(asyncio.create_task(one_poll()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(min_interval, waited * 0.10)):
                        await found.wait()
            await asyncio.gather(*in_flight)
            seen[sample["index"]] = state

        started = time.monotonic()
        await asyncio.gather(*(watch(sample) for sample in plan["samples"]))
        seconds = time.monotonic() - started
    polls = sum(sample["polls"] for sample in seen.values())
    return {"samples": seen, "polls": polls, "poll_rate": polls / seconds if seconds > 0 else 0.0}


def main() -> int:
    role, plan_path = sys.argv[1], sys.argv[2]
    with open(plan_path, "rb") as handle:
        plan = orjson.loads(handle.read())
    uvloop.install()
    result = asyncio.run(publish(plan) if role == "publish" else poll(plan))
    with open(plan["result_path"], "wb") as handle:
        handle.write(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
