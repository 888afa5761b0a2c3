"""Part 2, freshness: the time from publishing an image change to a GetImage response that shows it.

Per repetition, with one API process (the service's defaults) and one worker
(`python -m workers` on an exchange and queue of the bench's own):
- wrk sends signed GetImage requests at half the service's peak (the 1-process median of
  the HTTP part, or a short peak run when that part was skipped; `--freshness-load`
  changes the fraction); bench/requests.lua keeps the rate with a fixed schedule
  (BENCH_RATE), since wrk2 is not packaged in Debian;
- the publisher agent publishes `image.updated` events at 1,000 per second, each on its
  own image, with a new marker in the manifest's tags. The events are encoded and
  checked against the contract before the run, so the agent only sends them;
- the poller agent watches every 20th event's image with signed GetImage requests (as
  bench01, which may see every image used), sent on a schedule without waiting for the
  previous response, and records the first response showing the marker. Its requests come
  on top of wrk's, and the table shows their rate.
The worker's own lag (its log's `lag_ms`: commit time minus the event's time) splits the
delay into the worker's share and the API's.
Freshness is that response's arrival time minus the time the publisher sent the event,
so it includes the time the response took. It is an upper bound, late by at most the time from
the last poll that did not show the marker to the arrival of the one that did (the
progress line's "poll resolution").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import secrets
import statistics
import time
from email.utils import formatdate

import aio_pika
import asyncpg
import orjson

from bench import config, dataset, http_part, servers, signing, wrk
from bench.context import Context
from bench.freshness_agents import TIME_PLACEHOLDER
from bench.processes import BenchError, ProcessGroup, wait_http
from service.auth.client import sign_headers
from service.settings import Settings
from workers.contract import decode
from workers.producer import image_event

POLLER_ACCOUNT = 0  # bench01
POLL_MIN_INTERVAL = 0.010  # seconds between two polls of one image, at the start
POLL_TIMEOUT = 30.0  # seconds after which a sample counts as never seen
START_DELAY = 3.0  # seconds from starting the agents to the first event
# A repetition where wrk sustained less than this fraction of the requested HTTP rate gets a note.
HELD_LOAD_FRACTION = 0.9


def exchange_names() -> tuple[str, str]:
    return f"{config.AMQP_PREFIX}.fresh", f"{config.AMQP_PREFIX}.fresh.events"


async def purge_queue(amqp_url: str, queue_name: str) -> int:
    """Purge the queue and return how many messages it contained (0 when it does not exist).

    Every repetition uses the same queue. A worker that falls far behind can stop with
    events still queued, and the next repetition's worker would apply those first."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return 0
        purged = await queue.purge()
        return purged.message_count
    finally:
        await connection.close()


async def _events(ctx: Context, count: int, token: str) -> list[dict]:
    """Build `count` image.updated events, one per image, on images bench01 may see."""
    readable = ctx.visible.public + ctx.visible.owned[POLLER_ACCOUNT] + ctx.visible.shared[POLLER_ACCOUNT]
    if count > len(readable):
        raise BenchError(f"{count} events need as many images readable by bench01; it reads {len(readable)}")
    chosen = random.Random(token).sample(readable, count)
    connection = await asyncpg.connect(config.database_url())
    try:
        rows = await connection.fetch(
            "SELECT uuid::text AS uuid, revision, manifest::text AS manifest FROM images WHERE uuid = ANY($1::uuid[])",
            chosen)
    finally:
        await connection.close()
    by_uuid = {row["uuid"]: row for row in rows}
    events = []
    for index, image in enumerate(chosen):
        row = by_uuid[image]
        manifest = orjson.loads(row["manifest"])
        manifest["tags"] = {**(manifest.get("tags") or {}), "bench_seq": f"{token}-{index}"}
        events.append(image_event("image.updated", manifest, revision=row["revision"] + 1))
    return events


def _encoded(events: list[dict]) -> list[bytes]:
    """Encode each event with the placeholder time the publisher replaces, and check it
    against the contract now, so the publisher does neither during the run."""
    max_bytes = Settings.from_env({}).event_max_bytes
    lines = []
    for event in events:
        line = orjson.dumps({**event, "time": TIME_PLACEHOLDER})
        decode(line, max_bytes=max_bytes)
        lines.append(line)
    return lines


def _poll_samples(ctx: Context, events: list[dict], every: int, rate: float) -> list[dict]:
    account = ctx.accounts[POLLER_ACCOUNT]
    date = formatdate(time.time(), usegmt=True)
    samples = []
    for index in range(0, len(events), every):
        event = events[index]
        path = f"/{account.login}/images/{event['image_uuid']}"
        headers = {"Accept": "application/json", "Accept-Version": "~9||~8",
                   **sign_headers(account.private_key, key_id=account.key_id, method="GET", target=path, date=date)}
        samples.append({"index": str(index), "path": path, "headers": headers, "scheduled": index / rate,
                        "marker": f'"bench_seq":"{event["manifest"]["tags"]["bench_seq"]}"'})
    return samples


def _peak(ctx: Context) -> float:
    if 1 in ctx.service_peak:
        return ctx.service_peak[1]
    print("  measuring the service's peak (the HTTP part was not run)", flush=True)
    figures = http_part.measure_peak(ctx, 1)
    ctx.service_peak[1] = figures["rps"]
    return figures["rps"]


def _write_json(name: str, document: dict) -> str:
    path = config.STATE_DIR / "freshness" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(document))
    return str(path)


def _run_once(ctx: Context, rep: int, load_rate: float) -> dict:
    profile = ctx.profile
    exchange, queue = exchange_names()
    leftover = asyncio.run(purge_queue(config.AMQP_URL, queue))
    token = secrets.token_hex(4)
    count = profile.freshness_rate * profile.freshness_seconds
    asyncio.run(dataset.truncate_event_log())
    events = asyncio.run(_events(ctx, count, token))
    events_path = config.STATE_DIR / "freshness" / f"events-{rep}.jsonl"
    events_path.parent.mkdir(parents=True, exist_ok=True)
    events_path.write_bytes(b"".join(line + b"\n" for line in _encoded(events)))
    load_seconds = START_DELAY + profile.freshness_seconds + 6
    load_file = signing.generate(ctx.accounts, ctx.visible, int(load_rate * (load_seconds + profile.warmup_seconds) * 1.3) + 2000,
                                 f"fresh-load-{rep}", ctx.next_seed())
    samples = _poll_samples(ctx, events, profile.freshness_sample_every, profile.freshness_rate)

    group = ProcessGroup()
    url = f"http://127.0.0.1:{ctx.port}"
    try:
        servers.start(group, "service", 1, ctx.port, tag=f"-fresh-r{rep}")
        worker = group.start(f"worker-fresh-r{rep}", [config.PYTHON, "-m", "workers"], {
            "DATABASE_URL": config.database_url(), "AMQP_URL": config.AMQP_URL, "AMQP_EXCHANGE": exchange,
            "AMQP_QUEUE": queue, "WORKER_HTTP_PORT": str(ctx.worker_port)})
        wait_http(f"http://127.0.0.1:{ctx.worker_port}/readyz", [worker])
        warmup = wrk.run(url, str(load_file.path), profile.warmup_seconds, rate=load_rate,
                         log_name=f"fresh-warmup-r{rep}")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            load = pool.submit(wrk.run, url, str(load_file.path), load_seconds, offset=warmup["issued"],
                               rate=load_rate, log_name=f"fresh-load-r{rep}")
            time.sleep(0.5)
            t0 = time.monotonic() + START_DELAY
            common = {"t0": t0}
            publish_plan = _write_json(f"publish-{rep}.json", {
                **common, "amqp_url": config.AMQP_URL, "exchange": exchange, "queue": queue,
                "events_path": str(events_path), "rate": profile.freshness_rate,
                "sample_every": profile.freshness_sample_every,
                "result_path": str(config.STATE_DIR / "freshness" / f"publish-{rep}.result.json")})
            poll_plan = _write_json(f"poll-{rep}.json", {
                **common, "base_url": url, "samples": samples, "min_interval": POLL_MIN_INTERVAL,
                "timeout": POLL_TIMEOUT, "connections": 64,
                "result_path": str(config.STATE_DIR / "freshness" / f"poll-{rep}.result.json")})
            poller = group.start(f"poller-r{rep}", [config.PYTHON, "-m", "bench.freshness_agents", "poll", poll_plan])
            publisher = group.start(f"publisher-r{rep}",
                                    [config.PYTHON, "-m", "bench.freshness_agents", "publish", publish_plan])
            wait_seconds = START_DELAY + profile.freshness_seconds + POLL_TIMEOUT + 30
            for agent in (publisher, poller):
                if agent.popen.wait(wait_seconds) != 0:
                    raise BenchError(f"{agent.name} failed; its log ({agent.log_path}) ends with:\n{agent.tail()}")
            load_figures = load.result()
    finally:
        group.stop_all()
    worker_lags = _worker_lags(worker.log_path)

    published = orjson.loads((config.STATE_DIR / "freshness" / f"publish-{rep}.result.json").read_bytes())
    poll_result = orjson.loads((config.STATE_DIR / "freshness" / f"poll-{rep}.result.json").read_bytes())
    polled = poll_result["samples"]
    latencies = []
    resolutions = []
    unseen = 0
    for index, (called, _confirmed) in published["samples"].items():
        sample = polled.get(index)
        if sample is None or sample["seen"] is None:
            unseen += 1
            continue
        latencies.append((sample["seen"] - called) * 1000)
        if sample["last_negative_sent"] is not None:
            resolutions.append((sample["seen"] - max(sample["last_negative_sent"], called)) * 1000)
    latencies.sort()
    window = published["last_call"] - published["first_call"]
    return {
        "latencies_ms": latencies,
        "leftover": leftover,
        "unseen": unseen,
        "samples": len(published["samples"]),
        "publish_rate": (published["count"] - 1) / window if window > 0 else 0.0,
        "publish_lag_p99_ms": published["publish_lag_p99"] * 1000,
        "confirm_p99_ms": published["confirm_p99"] * 1000,
        "publish_failures": published["failure_count"],
        "resolution_p50_ms": statistics.median(resolutions) if resolutions else None,
        "poll_rate": poll_result["poll_rate"],
        "worker_lag_p50_ms": _percentile(worker_lags, 0.50) if worker_lags else None,
        "worker_lag_p99_ms": _percentile(worker_lags, 0.99) if worker_lags else None,
        "load": load_figures,
    }


def _worker_lags(log_path) -> list[float]:
    """Return the worker's lag of each applied event (commit time minus event time), in ms."""
    lags = []
    with open(log_path, "rb") as handle:
        for line in handle:
            if b'"lag_ms":' in line:
                lags.append(float(orjson.loads(line)["lag_ms"]))
    return sorted(lags)


def _percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(len(values) * fraction))]


def run(ctx: Context) -> None:
    profile = ctx.profile
    if ctx.freshness_rate is not None:
        load_rate = ctx.freshness_rate
        source = "--freshness-rate"
    else:
        peak = _peak(ctx)
        load_rate = peak * ctx.freshness_load
        source = f"{ctx.freshness_load:g} of {peak:,.0f}"
    print(f"== freshness: {profile.freshness_rate} events/s for {profile.freshness_seconds} s, HTTP load asked at "
          f"{load_rate:,.0f} req/s ({source}), {ctx.runs} repetitions", flush=True)
    results = ctx.results

    for rep in range(ctx.runs):
        outcome = _run_once(ctx, rep, load_rate)
        if outcome["leftover"]:
            results.note(f"freshness repetition {rep + 1}: the queue still contained {outcome['leftover']:,} events "
                         "from before it (left by a worker that fell behind or by an interrupted run), purged before "
                         "it started")
        latencies = outcome["latencies_ms"]
        load = outcome.pop("load")
        results.record(part="freshness", rep=rep, load=load, **{k: v for k, v in outcome.items() if k != "latencies_ms"},
                       latency_p50=_percentile(latencies, 0.5) if latencies else None)
        if not latencies:
            results.note(f"freshness repetition {rep + 1}: no sample was seen within {POLL_TIMEOUT:g} s")
            continue

        results.add("freshness", "p50", _percentile(latencies, 0.50))
        results.add("freshness", "p99", _percentile(latencies, 0.99))
        results.add("freshness", "max", latencies[-1])
        results.add("freshness", "publish rate", outcome["publish_rate"])
        results.add("freshness", "load rps", load["rps"])
        results.add("freshness", "load p99", load["p99_ms"])
        results.add("freshness", "poll rate", outcome["poll_rate"])
        if outcome["worker_lag_p50_ms"] is not None:
            results.add("freshness", "worker lag p50", outcome["worker_lag_p50_ms"])
            results.add("freshness", "worker lag p99", outcome["worker_lag_p99_ms"])

        print(f"  repetition {rep + 1}: p50 {_percentile(latencies, 0.5):.1f} ms, p99 {_percentile(latencies, 0.99):.1f} ms, "
              f"max {latencies[-1]:.1f} ms over {len(latencies)} samples; published {outcome['publish_rate']:,.0f}/s; "
              f"load {load['rps']:,.0f} req/s, p99 {load['p99_ms']:.1f} ms, "
              f"{load['restarts']} schedule restart{'' if load['restarts'] == 1 else 's'}; "
              f"poller {outcome['poll_rate']:,.0f} req/s, "
              f"poll resolution p50 "
              f"{outcome['resolution_p50_ms'] or 0:.1f} ms; worker lag p50 {outcome['worker_lag_p50_ms'] or 0:.1f} ms, "
              f"p99 {outcome['worker_lag_p99_ms'] or 0:.1f} ms", flush=True)
        if load["rps"] < HELD_LOAD_FRACTION * load_rate:
            results.note(f"freshness repetition {rep + 1}: wrk held {load['rps']:,.0f} of the {load_rate:,.0f} req/s "
                         "requested: the API did not keep up with that load beside the events")
        if outcome["unseen"] or outcome["publish_failures"] or load["status_errors"]:
            results.note(f"freshness repetition {rep + 1}: {outcome['unseen']} of {outcome['samples']} samples never "
                         f"seen, {outcome['publish_failures']} publish failures, {load['status_errors']} non-2xx "
                         f"responses to the load")

    results.row("freshness", "publish to GetImage p50", "ms", results.get("freshness", "p50"))
    results.row("freshness", "publish to GetImage p99", "ms", results.get("freshness", "p99"), "<= 100")
    results.row("freshness", "publish to GetImage max", "ms", results.get("freshness", "max"))
    results.row("freshness", "worker lag, event time to commit p50", "ms", results.get("freshness", "worker lag p50"))
    results.row("freshness", "worker lag, event time to commit p99", "ms", results.get("freshness", "worker lag p99"))
    results.row("freshness", "events published", "events/s", results.get("freshness", "publish rate"))
    results.row("freshness", f"HTTP load held by wrk (asked {load_rate:,.0f})", "req/s",
                results.get("freshness", "load rps"))
    results.row("freshness", "poller requests", "req/s", results.get("freshness", "poll rate"))
    results.row("freshness", "HTTP load p99", "ms", results.get("freshness", "load p99"))
