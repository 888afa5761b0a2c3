"""Part 3, worker throughput: time to drain a full queue of valid events.

Per repetition:
1. Build N `image.updated` events, one per image of the read model (N = 100,000 in the
   full profile), each with the image's next revision and a new marker in its tags.
2. Publish them once with the service's producer (`EventPublisher.publish_many`, checked
   and confirmed) to an exchange of the bench's own. Three queues are bound to it, so
   each queue receives the same N messages. Publishing runs at a few thousand events per
   second here, and one fill instead of three saves minutes.
3. Drain queue 1 with the baseline, a bare aio-pika consumer that acks each message and
   touches no database (bench/bare_consumer.py).
4. VACUUM the read model, then drain queue 2 with one worker (`python -m workers`).
5. Put the images' revisions back to what they were before step 4 and empty event_log,
   so the same events are new again, VACUUM, then drain queue 3 with two workers.

Throughput is (N - 1) divided by the time from the first processed event to the last.
For the bare consumer these are its first and last ack. For workers they are the first
and last per-event log lines, which a worker writes after it settles each batch.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from datetime import datetime

import aio_pika
import aiohttp
import asyncpg
import orjson

from bench import config, dataset
from bench.context import Context
from bench.processes import BenchError, ProcessGroup, wait_http
from bench.report import ratios
from service.settings import Settings
from workers import topology
from workers.producer import EventPublisher, image_event

_DRAIN_TIMEOUT = 600  # seconds a drain may take before the part gives up


def names() -> tuple[str, list[str]]:
    exchange = f"{config.AMQP_PREFIX}.worker"
    return exchange, [f"{exchange}.bare", f"{exchange}.one", f"{exchange}.two"]


def _settings(queue: str) -> Settings:
    exchange, _ = names()
    return Settings.from_env({}, amqp_url=config.AMQP_URL, amqp_exchange=exchange, amqp_queue=queue,
                             database_url=config.database_url())


async def _build_events(count: int, token: str) -> tuple[list[dict], list[str]]:
    connection = await asyncpg.connect(config.database_url())
    try:
        rows = await connection.fetch(
            "SELECT uuid::text AS uuid, revision, manifest::text AS manifest FROM images WHERE NOT deleted")
    finally:
        await connection.close()
    if count > len(rows):
        raise BenchError(f"{count} events need as many live images; the read model has {len(rows)}")
    chosen = random.Random(token).sample(list(rows), count)
    events = []
    for index, row in enumerate(chosen):
        manifest = orjson.loads(row["manifest"])
        manifest["tags"] = {**(manifest.get("tags") or {}), "bench_seq": f"{token}-{index}"}
        events.append(image_event("image.updated", manifest, revision=row["revision"] + 1))
    return events, [row["uuid"] for row in chosen]


async def _fill(events: list[dict]) -> float:
    """Declare the three queues and publish `events` once; return the publishing time."""
    _, queues = names()
    async with EventPublisher.connect(_settings(queues[0])) as publisher:
        channel = publisher._channel
        for queue in queues:
            settings = _settings(queue)
            # A queue left by an interrupted run would add old events to this one.
            await channel.queue_delete(queue)
            await topology.declare(channel, settings)
        started = time.monotonic()
        await publisher.publish_many(events, window=512)
        return time.monotonic() - started


async def _rewind(image_uuids: list[str]) -> None:
    """Take each image back one revision and empty event_log, so the same events apply again."""
    connection = await asyncpg.connect(config.database_url())
    try:
        async with connection.transaction():
            await connection.execute("UPDATE images SET revision = revision - 1 WHERE uuid = ANY($1::uuid[])",
                                     image_uuids)
            await connection.execute("TRUNCATE event_log")
    finally:
        await connection.close()


async def _processed(ports: list[int]) -> dict[str, float]:
    """Sum the workers' cloudapi_images_events_total by outcome, from their /metrics."""
    totals: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        for port in ports:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            for line in text.splitlines():
                if line.startswith("cloudapi_images_events_total{"):
                    labels, _, value = line.rpartition(" ")
                    outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
                    totals[outcome] = totals.get(outcome, 0.0) + float(value)
    return totals


def _event_times(log_path) -> list[float]:
    """Return the POSIX times of the per-event lines of a worker's JSON log."""
    times = []
    with open(log_path, "rb") as handle:
        for line in handle:
            if b'"event":"event_' not in line:
                continue
            record = orjson.loads(line)
            times.append(datetime.fromisoformat(record["timestamp"]).timestamp())
    return times


def _drain_bare(ctx: Context, count: int, rep: int) -> float:
    _, queues = names()
    result_path = config.STATE_DIR / "worker" / f"bare-{rep}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup()
    try:
        consumer = group.start(f"bare-consumer-r{rep}", [config.PYTHON, "-m", "bench.bare_consumer", queues[0],
                                                          str(count), str(result_path)], {"AMQP_URL": config.AMQP_URL})
        if consumer.popen.wait(_DRAIN_TIMEOUT) != 0:
            raise BenchError(f"the bare consumer failed; its log ({consumer.log_path}) ends with:\n{consumer.tail()}")
    finally:
        group.stop_all()
    result = orjson.loads(result_path.read_bytes())
    return (result["acked"] - 1) / (result["last"] - result["first"])


def _drain_workers(ctx: Context, count: int, workers: int, queue: str, rep: int) -> tuple[float, dict]:
    exchange, _ = names()
    ports = [ctx.worker_port + index for index in range(workers)]
    group = ProcessGroup()
    started = []
    try:
        for index, port in enumerate(ports):
            started.append(group.start(f"worker-{workers}w-{index}-r{rep}", [config.PYTHON, "-m", "workers"], {
                "DATABASE_URL": config.database_url(), "AMQP_URL": config.AMQP_URL, "AMQP_EXCHANGE": exchange,
                "AMQP_QUEUE": queue, "WORKER_HTTP_PORT": str(port)}))
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/livez", started)
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        while True:
            totals = asyncio.run(_processed(ports))
            if sum(totals.values()) >= count:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{workers} worker(s) processed {sum(totals.values()):.0f} of {count} events "
                                 f"in {_DRAIN_TIMEOUT} s; see {started[0].log_path}")
            for process in started:
                if not process.running():
                    raise BenchError(f"{process.name} exited; its log ({process.log_path}) ends with:\n{process.tail()}")
            time.sleep(0.5)
    finally:
        group.stop_all()
    times = sorted(t for process in started for t in _event_times(process.log_path))
    return (len(times) - 1) / (times[-1] - times[0]), totals


def run(ctx: Context) -> None:
    count = ctx.profile.worker_events
    print(f"== worker: drain {count:,} events, bare consumer / 1 worker / 2 workers, {ctx.runs} repetitions",
          flush=True)
    results = ctx.results
    for rep in range(ctx.runs):
        token = secrets.token_hex(4)
        events, image_uuids = asyncio.run(_build_events(count, token))
        asyncio.run(dataset.truncate_event_log())
        fill_seconds = asyncio.run(_fill(events))
        print(f"  repetition {rep + 1}: published {count:,} events into 3 queues in {fill_seconds:.1f} s "
              f"({count / fill_seconds:,.0f}/s)", flush=True)
        _, queues = names()
        bare = _drain_bare(ctx, count, rep)
        asyncio.run(dataset.vacuum())
        one, totals_one = _drain_workers(ctx, count, 1, queues[1], rep)
        asyncio.run(_rewind(image_uuids))
        asyncio.run(dataset.vacuum())
        two, totals_two = _drain_workers(ctx, count, 2, queues[2], rep)
        print(f"    bare consumer {bare:,.0f}/s, 1 worker {one:,.0f}/s, 2 workers {two:,.0f}/s", flush=True)
        results.add("worker", "bare", bare)
        results.add("worker", "one", one)
        results.add("worker", "two", two)
        results.record(part="worker", rep=rep, count=count, fill_seconds=fill_seconds, bare=bare, one=one, two=two,
                       outcomes_one=totals_one, outcomes_two=totals_two)
        for label, totals in (("1 worker", totals_one), ("2 workers", totals_two)):
            if totals.get("applied", 0) != count:
                results.note(f"worker repetition {rep + 1}, {label}: outcomes {totals}, expected {count} applied")
    asyncio.run(dataset.vacuum())
    results.row("worker", "bare aio-pika consumer (ack only)", "events/s", results.get("worker", "bare"))
    results.row("worker", "1 worker", "events/s", results.get("worker", "one"), ">= 6000")
    results.row("worker", "2 workers", "events/s", results.get("worker", "two"))
    results.row("worker", "1 worker / bare consumer", "x", ratios(results.get("worker", "one"),
                                                                   results.get("worker", "bare")), ">= 0.60")
    results.row("worker", "2 workers / 1 worker", "x", ratios(results.get("worker", "two"),
                                                               results.get("worker", "one")))


async def cleanup() -> dict[str, int]:
    """Delete every queue and exchange the worker and freshness parts declared; return
    how many messages each dead-letter queue held (0 when no event was rejected)."""
    from bench.freshness_part import exchange_names

    _, queues = names()
    fresh_exchange, fresh_queue = exchange_names()
    settings = [_settings(queue) for queue in queues]
    settings.append(Settings.from_env({}, amqp_url=config.AMQP_URL, amqp_exchange=fresh_exchange,
                                      amqp_queue=fresh_queue))
    dead_letters: dict[str, int] = {}
    connection = await aio_pika.connect(config.AMQP_URL)
    try:
        for item in settings:
            # A passive declare of a missing queue closes the channel, so each gets its own.
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(item.dead_letter_queue, passive=True)
                dead_letters[item.dead_letter_queue] = queue.declaration_result.message_count
            except aio_pika.exceptions.ChannelClosed:
                continue
        channel = await connection.channel()
        for item in settings:
            await channel.queue_delete(item.amqp_queue)
            await channel.queue_delete(item.dead_letter_queue)
        for item in settings:
            await channel.exchange_delete(item.amqp_exchange)
            await channel.exchange_delete(item.dead_letter_exchange)
    finally:
        await connection.close()
    return dead_letters
