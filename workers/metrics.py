"""Prometheus metrics of a worker process, served on its health port at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WorkerMetrics:
    """The worker's metrics, in a registry of their own so tests can build several."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.events = Counter(
            "cloudapi_images_events",
            "Events consumed, by event type and outcome.",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "cloudapi_images_events_dead_lettered",
            "Messages sent to the dead-letter queue, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.apply_seconds = Histogram(
            "cloudapi_images_batch_apply_seconds",
            "Time to apply one batch in one transaction, commit included.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.lag_seconds = Histogram(
            "cloudapi_images_event_lag_seconds",
            "Time from an event's time to the commit that applied it.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cloudapi_images_batch_size",
            "Messages per batch.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.consumer_active = Gauge(
            "cloudapi_images_worker_consumer_active",
            "1 while the worker has an active RabbitMQ consumer.",
            registry=self.registry,
        )
        self.database_available = Gauge(
            "cloudapi_images_worker_database_available",
            "1 while the last database operation succeeded.",
            registry=self.registry,
        )
        self.pool_connections = Gauge(
            "cloudapi_images_db_pool_connections",
            "Connections of the Postgres pool, by state.",
            ["state"],
            registry=self.registry,
        )

    def watch_pool(self, pool) -> None:
        """Report the pool's size and idle connections at every scrape."""
        self.pool_connections.labels("open").set_function(pool.get_size)
        self.pool_connections.labels("idle").set_function(pool.get_idle_size)
        self.pool_connections.labels("max").set_function(pool.get_max_size)
