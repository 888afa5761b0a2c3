"""Soak the workers: publish many events through several `python -m workers` processes
and check that their resident memory stays flat once warmed up.

    .venv/bin/python bench/soak.py                  # 200,000 events, 2 workers
    .venv/bin/python bench/soak.py --events 20000   # a quick run

It creates a database of its own on the Postgres of `--admin-dsn` and queue names of its
own on the RabbitMQ of `--amqp-url` (by default the local services of `deploy/local`),
and removes both at the end. While the events are applied it samples each worker's
VmRSS from /proc every `--interval` seconds. It reports, per worker, the RSS when the
warm-up ends (`--warmup`, a fraction of the events applied), at half of the events and
at the end. It fails (exit status 1) when a worker grew by `--max-growth` or more over
the second half. Not part of the test suite: it runs for minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.migrate import migrate  # noqa: E402
from service.settings import Settings  # noqa: E402
from workers.producer import EventPublisher, image_event  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events to publish (default 200000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--revisions", type=int, default=10, help="revisions per image (default 10)")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the events that counts as warm-up (default 0.1)")
    parser.add_argument(
        "--preload", action="store_true", help="publish every event before the workers start (default: while they run)"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples (default 1)")
    parser.add_argument("--max-growth", type=float, default=0.10, help="largest RSS growth over the second half (default 0.10)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the whole run may take (default 1800)")
    parser.add_argument(
        "--admin-dsn",
        default=os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="Postgres DSN allowed to create and drop a database",
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"), help="RabbitMQ URL"
    )
    return parser.parse_args(argv)


def manifest(image_uuid: str, revision: int) -> dict:
    """Return a manifest of about 700 bytes, like a real zone image's."""
    return {
        "v": 2,
        "uuid": image_uuid,
        "owner": "930896af-bf8c-48d4-885c-6573a94b1853",
        "name": f"soak-{revision}",
        "version": f"1.{revision}.0",
        "description": "An image published by the soak benchmark. " * 3,
        "homepage": "https://example.com/images/soak",
        "state": "active",
        "disabled": False,
        "public": True,
        "published_at": "2026-01-02T03:04:05.678Z",
        "type": "zone-dataset",
        "os": "smartos",
        "files": [{"sha1": secrets.token_hex(20), "size": 110742036, "compression": "gzip"}],
        "requirements": {"min_ram": 256},
        "tags": {"role": "os", "group": "soak"},
    }


def events(count: int, revisions: int):
    """Yield `count` events: images with `revisions` revisions each, in shuffled blocks."""
    produced = 0
    while produced < count:
        images = [str(uuid.uuid4()) for _ in range(max(1, min(1000, (count - produced) // revisions)))]
        block = [(image, revision) for image in images for revision in range(1, revisions + 1)]
        random.shuffle(block)
        for image, revision in block[: count - produced]:
            yield image_event("image.updated", manifest(image, revision), revision=revision)
        produced += min(len(block), count - produced)


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Sample:
    at: float
    applied: int
    rss: list[int | None]


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    first_applied_at: float | None = None
    last_applied_at: float | None = None


def dsn_for(admin_dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{database}"))


async def soak(args: argparse.Namespace) -> int:
    name = f"cloudapi_soak_{secrets.token_hex(4)}"
    dsn = await create_database(args.admin_dsn, name)
    settings = Settings.from_env(
        {},
        database_url=dsn,
        amqp_url=args.amqp_url,
        amqp_exchange=f"soak-{name}.images",
        amqp_queue=f"soak-{name}.images.read-model",
    )
    workers: list[subprocess.Popen] = []
    try:
        if args.preload:
            await publish(settings, args)
        else:
            async with EventPublisher.connect(settings):
                pass  # declares the topology before the workers start
        workers = start_workers(settings, args.workers)
        publisher = asyncio.create_task(asyncio.sleep(0) if args.preload else publish(settings, args))
        try:
            run = await sample_until_applied(args, dsn, workers)
            await publisher
        finally:
            if not publisher.done():
                publisher.cancel()
    finally:
        stop_workers(workers)
        await cleanup(args, settings, name)
    if run is None:
        return 1
    return report(args, run)


async def create_database(admin_dsn: str, name: str) -> str:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = dsn_for(admin_dsn, name)
    await migrate(dsn)
    return dsn


def start_workers(settings: Settings, count: int) -> list[subprocess.Popen]:
    environment = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "AMQP_URL": settings.amqp_url,
        "AMQP_EXCHANGE": settings.amqp_exchange,
        "AMQP_QUEUE": settings.amqp_queue,
        "WORKER_HTTP_PORT": "0",
        "LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
    }
    return [
        subprocess.Popen([sys.executable, "-m", "workers"], env=environment, cwd=ROOT, stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]


def stop_workers(workers: list[subprocess.Popen]) -> None:
    """SIGTERM each worker by pid, and SIGKILL one that has not exited 30 s later."""
    for worker in workers:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


async def sample_until_applied(args: argparse.Namespace, dsn: str, workers: list[subprocess.Popen]) -> Run | None:
    """Sample the event log's size and each worker's RSS until every event is applied;
    return the samples, or None when a worker exited or the run timed out."""
    run = Run()
    started = time.monotonic()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        while True:
            applied = await pool.fetchval("SELECT count(*) FROM event_log")
            now = time.monotonic()
            if applied and run.first_applied_at is None:
                run.first_applied_at = now
            run.samples.append(Sample(now - started, applied, [rss_kib(worker.pid) for worker in workers]))
            if applied >= args.events:
                run.last_applied_at = now
                return run
            exited = [worker.returncode for worker in workers if worker.poll() is not None]
            if exited:
                print(f"soak: a worker exited with status {exited} after {applied} events; see its output above", file=sys.stderr)
                return None
            if now - started > args.timeout:
                print(f"soak: timed out after {args.timeout:g} s with {applied} of {args.events} events applied", file=sys.stderr)
                return None
            await asyncio.sleep(args.interval)
    finally:
        await pool.close()


async def publish(settings: Settings, args: argparse.Namespace) -> None:
    async with EventPublisher.connect(settings) as publisher:
        chunk = []
        for event in events(args.events, args.revisions):
            chunk.append(event)
            if len(chunk) == 5000:
                await publisher.publish_many(chunk)
                chunk = []
        if chunk:
            await publisher.publish_many(chunk)


async def cleanup(args: argparse.Namespace, settings: Settings, database: str) -> None:
    connection = await aio_pika.connect(args.amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        for queue in (settings.amqp_queue, settings.dead_letter_queue):
            await channel.queue_delete(queue)
        for exchange in (settings.amqp_exchange, settings.dead_letter_exchange):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()
    admin = await asyncpg.connect(args.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()


def at_progress(run: Run, fraction: float, events: int) -> Sample:
    """Return the first sample at which `fraction` of the events were applied."""
    return next(sample for sample in run.samples if sample.applied >= fraction * events)


def report(args: argparse.Namespace, run: Run) -> int:
    warm = at_progress(run, args.warmup, args.events)
    middle = at_progress(run, 0.5, args.events)
    end = run.samples[-1]
    seconds = run.last_applied_at - run.first_applied_at
    rate = args.events / seconds if seconds > 0 else float("nan")
    print(f"{args.events} events through {args.workers} workers in {seconds:.1f} s: {rate:,.0f} events/s")
    print("worker  RSS MiB at warm-up  at half  at end  growth over the second half")
    failed = False
    rows = []
    for index in range(args.workers):
        values = [sample.rss[index] for sample in (warm, middle, end)]
        growth = (values[2] - values[1]) / values[1]
        failed |= growth >= args.max_growth
        rows.append({"worker": index, "rss_kib": values, "growth": round(growth, 4)})
        print(f"{index:>6}  {values[0] / 1024:>17.1f}  {values[1] / 1024:>7.1f}  {values[2] / 1024:>6.1f}  {growth:>+27.1%}")
    print(orjson.dumps({"events": args.events, "workers": args.workers, "seconds": round(seconds, 1), "events_per_s": round(rate), "rows": rows}).decode())
    if failed:
        print(f"soak: a worker grew by {args.max_growth:.0%} or more over the second half", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    return asyncio.run(soak(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
