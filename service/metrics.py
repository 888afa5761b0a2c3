"""Prometheus metrics of the API, served at /metrics on `METRICS_PORT`.

With one process the API serves its own registry. With `HTTP_PROCESSES` > 1 the library's
multiprocess mode is used: every child writes its values to memory-mapped files in
`PROMETHEUS_MULTIPROC_DIR`, and the parent (`service.supervisor`) serves their aggregate
on the one metrics port. docs/operations.md lists every metric.

Per request the pipeline only adds to plain per-process tallies. Those, and the cache,
pool and listener figures that already exist as plain attributes, are copied into the
metrics by `ApiMetrics.sample()`: before each scrape with one process, and every
`SAMPLE_INTERVAL` seconds in each child of a multi-process API.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import glob
import os
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler

SAMPLE_INTERVAL = 1.0  # seconds between two samples in each child of a multi-process API

# Seconds; GetImage from the cache takes well under a millisecond, a miss a few.
_REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Any other method becomes "other": aiohttp accepts every token as a method, and a label
# value per token would let clients create series without bound.
_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})

RequestRecorder = Callable[[str, str, int, float], None]


class ApiMetrics:
    """The API's metrics, in a registry of their own so that tests can build several apps."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "cloudapi_images_http_requests",
            "HTTP requests answered, by route name, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "cloudapi_images_http_request_duration_seconds",
            "Time from the start of the request pipeline to the response, by route name, method and status.",
            ["route", "method", "status"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )

        self.cache_lookups = Counter(
            "cloudapi_images_cache_lookups",
            "Image cache lookups, by result: hit, or miss (a Postgres query).",
            ["result"],
            registry=self.registry,
        )
        self.cache_entries = Gauge(
            "cloudapi_images_cache_entries",
            "Entries in the image cache: live images plus ids cached as missing.",
            multiprocess_mode="livesum",
            registry=self.registry,
        )

        self.pool_connections = Gauge(
            "cloudapi_images_db_pool_connections",
            "Connections of the Postgres pool, by state: open, idle, max.",
            ["state"],
            multiprocess_mode="livesum",
            registry=self.registry,
        )

        self.listener_connected = Gauge(
            "cloudapi_images_change_listener_connected",
            "1 while the LISTEN connection that keeps the cache current is up (in every API process).",
            multiprocess_mode="livemin",
            registry=self.registry,
        )
        self.listener_reconnects = Counter(
            "cloudapi_images_change_listener_reconnects",
            "Times the LISTEN connection was lost after it had connected.",
            registry=self.registry,
        )

        self._tallies: dict[tuple[str, str, int], list] = {}
        self._store = None
        self._pool = None
        self._listener = None
        # Totals already copied into the counters, so `sample()` adds only the difference.
        self._copied = {"hits": 0, "misses": 0, "reconnects": 0}

    def request_recorder(self) -> RequestRecorder:
        """Return a function that counts one request and observes its duration.

        It only adds to plain per-process tallies, a fraction of what the library's own
        `inc()` and `observe()` cost (each takes a lock, and a file write in
        multiprocess mode). `sample()` moves the tallies into the metrics before every
        scrape, or every `SAMPLE_INTERVAL` in a child of a multi-process API.
        """
        tallies = self._tallies
        buckets = _REQUEST_BUCKETS

        def record(route: str, method: str, status: int, seconds: float) -> None:
            if method not in _METHODS:
                method = "other"
            key = (route, method, status)
            tally = tallies.get(key)
            if tally is None:
                # [requests, sum of seconds, count per bucket (the last one is +Inf)]
                tally = tallies[key] = [0, 0.0, [0] * (len(buckets) + 1)]
            tally[0] += 1
            tally[1] += seconds
            tally[2][bisect.bisect_left(buckets, seconds)] += 1

        return record

    def _move_tallies(self) -> None:
        """Add the request tallies gathered since the last call to the library's metrics."""
        for key, tally in list(self._tallies.items()):
            count, total, bucket_counts = tally
            if not count:
                continue
            tally[0], tally[1], tally[2] = 0, 0.0, [0] * len(bucket_counts)
            labels = (key[0], key[1], str(key[2]))
            self.requests.labels(*labels).inc(count)
            histogram = self.request_seconds.labels(*labels)
            # prometheus_client has no call to observe many values at once, so the tallies
            # go into the histogram's bucket and sum values (attributes of its children
            # since prometheus_client 0.4; tests/ops/test_metrics.py checks the export).
            histogram._sum.inc(total)
            for index, bucket_count in enumerate(bucket_counts):
                if bucket_count:
                    histogram._buckets[index].inc(bucket_count)

    def watch(self, *, store, pool, listener) -> None:
        """Read the image cache, the pool and the change listener at every `sample()`."""
        self._store = store
        self._pool = pool
        self._listener = listener
        self._copied = {"hits": store.hits, "misses": store.misses, "reconnects": listener.reconnects}

    def sample(self) -> None:
        """Copy the request tallies and the current cache, pool and listener figures into
        the metrics."""
        self._move_tallies()
        store, pool, listener = self._store, self._pool, self._listener
        if store is None:
            return
        copied = self._copied
        self.cache_lookups.labels("hit").inc(store.hits - copied["hits"])
        self.cache_lookups.labels("miss").inc(store.misses - copied["misses"])
        self.listener_reconnects.inc(listener.reconnects - copied["reconnects"])
        self._copied = {"hits": store.hits, "misses": store.misses, "reconnects": listener.reconnects}
        self.cache_entries.set(store.cached_images)
        self.pool_connections.labels("open").set(pool.get_size())
        self.pool_connections.labels("idle").set(pool.get_idle_size())
        self.pool_connections.labels("max").set(pool.get_max_size())
        self.listener_connected.set(1 if listener.connected else 0)

    async def sample_periodically(self, interval: float = SAMPLE_INTERVAL) -> None:
        """Call `sample()` every `interval` seconds until cancelled, and once more then."""
        try:
            while True:
                self.sample()
                await asyncio.sleep(interval)
        finally:
            self.sample()


async def start_metrics_server(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    before_scrape: Callable[[], None] | None = None,
) -> web.AppRunner:
    """Serve `registry` at http://host:port/metrics; return the runner to clean up."""
    export = make_aiohttp_handler(registry)

    async def metrics(request: web.Request) -> web.StreamResponse:
        if before_scrape is not None:
            before_scrape()
        return await export(request)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def clear_multiprocess_dir(path: str) -> None:
    """Create `path` if needed and delete the metric files a previous run left in it.

    Only `*.db` files are deleted, the files the library writes, so that a directory
    shared with other files by mistake loses nothing else.
    """
    os.makedirs(path, exist_ok=True)
    for name in glob.glob(os.path.join(path, "*.db")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)
