"""Settings of the API and the workers, read from environment variables in one place.

Every value has a working local default. A bad value raises `SettingsError`, whose
message names the variable, the value and what is expected; the entry points turn it
into a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class SettingsError(ValueError):
    """An environment variable contains a value the service cannot use."""


# Query parameters of a DSN whose values are secrets, e.g. libpq's `?password=` and
# `?sslpassword=`: any parameter whose name contains one of these words.
_SECRET_PARAMETER_WORDS = ("pass", "secret", "token")


def redact_url(url: str) -> str:
    """Return the URL with its password, in the user part or in a query parameter such
    as `?password=`, replaced by `***`, for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:***@{netloc}")
    if parts.query:
        parameters = []
        for parameter in parts.query.split("&"):
            name, equals, _value = parameter.partition("=")
            if equals and any(word in name.lower() for word in _SECRET_PARAMETER_WORDS):
                parameter = f"{name}=***"
            parameters.append(parameter)
        parts = parts._replace(query="&".join(parameters))
    return urlunsplit(parts)


def _parse_int(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise ValueError(f"expected an integer from {minimum} to {maximum}") from None
        if not minimum <= value <= maximum:
            raise ValueError(f"expected an integer from {minimum} to {maximum}")
        return value

    return parse


def _parse_float(minimum: float, maximum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number from {minimum:g} to {maximum:g}") from None
        if not minimum <= value <= maximum:
            raise ValueError(f"expected a number from {minimum:g} to {maximum:g}")
        return value

    return parse


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value

    return parse


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of true, false, 1, 0, yes, no, on, off")


def _parse_url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises ValueError on a non-numeric port)
        except ValueError:
            raise ValueError("expected a URL such as " + f"{schemes[0]}://host:port/name") from None
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(
                "expected a URL with scheme " + " or ".join(schemes) + " and a host"
            )
        return value

    return parse


_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


def _parse_name(raw: str) -> str:
    value = raw.strip()
    if not _NAME.match(value):
        raise ValueError("expected 1 to 200 characters from A-Z a-z 0-9 . _ : -")
    return value


def _parse_host(raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value):
        raise ValueError("expected a host name or an IP address")
    return value


def _parse_path(raw: str) -> str:
    return raw.strip()


def _field(env: str, default: str, parse: Callable[[str], Any], help: str, secret: bool = False):
    return dataclasses.field(
        default=None,
        metadata={"env": env, "default": default, "parse": parse, "help": help, "secret": secret},
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed settings; build them with `Settings.from_env()`."""

    database_url: str = _field(
        "DATABASE_URL",
        "postgresql://postgres@127.0.0.1:5432/cloudapi_images",
        _parse_url("postgresql", "postgres"),
        "Postgres DSN of the read model.",
        secret=True,
    )
    db_pool_size: int = _field(
        "DB_POOL_SIZE", "8", _parse_int(1, 200), "Connections in each process's Postgres pool."
    )
    db_connect_timeout: float = _field(
        "DB_CONNECT_TIMEOUT", "2", _parse_float(0.1, 60), "Seconds to wait for a new Postgres connection."
    )
    db_query_timeout: float = _field(
        "DB_QUERY_TIMEOUT", "2", _parse_float(0.1, 600), "Seconds an API query may take before it fails with 503."
    )
    amqp_url: str = _field(
        "AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2F",
        _parse_url("amqp", "amqps"),
        "RabbitMQ URL.",
        secret=True,
    )
    amqp_exchange: str = _field(
        "AMQP_EXCHANGE", "images", _parse_name, "Durable topic exchange that image and account events are published to."
    )
    amqp_queue: str = _field(
        "AMQP_QUEUE", "images.read-model", _parse_name, "Durable quorum queue the workers consume."
    )
    amqp_delivery_limit: int = _field(
        "AMQP_DELIVERY_LIMIT",
        "50",
        _parse_int(5, 1_000_000),
        "Deliveries of one message before RabbitMQ dead-letters it (set when the queue is first declared).",
    )
    http_host: str = _field("HTTP_HOST", "127.0.0.1", _parse_host, "Address the API listens on.")
    http_port: int = _field("HTTP_PORT", "8080", _parse_int(1, 65535), "TCP port of the API.")
    http_processes: int = _field(
        "HTTP_PROCESSES", "1", _parse_int(1, 256), "API processes sharing the port (SO_REUSEPORT)."
    )
    http_drain_timeout: float = _field(
        "HTTP_DRAIN_TIMEOUT", "10", _parse_float(0, 600), "Seconds the API waits for requests in flight on shutdown."
    )
    http_header_timeout: float = _field(
        "HTTP_HEADER_TIMEOUT",
        "10",
        _parse_float(0.5, 600),
        "Seconds a client has to send a request's headers, and then its body; past them the API answers 408.",
    )
    http_max_body: int = _field(
        "HTTP_MAX_BODY", "8192", _parse_int(0, 1 << 20), "Largest request body in bytes accepted (and ignored) on GET and HEAD."
    )
    metrics_port: int = _field(
        "METRICS_PORT", "9090", _parse_int(0, 65535), "Port of the API's Prometheus metrics; 0 turns them off."
    )
    cache_max_images: int = _field(
        "CACHE_MAX_IMAGES", "100000", _parse_int(0, 10_000_000), "Images each API process keeps in memory; 0 turns the cache off."
    )
    log_format: str = _field("LOG_FORMAT", "json", _parse_choice("json", "console"), "Log line format.")
    log_level: str = _field(
        "LOG_LEVEL", "info", _parse_choice("debug", "info", "warning", "error"), "Lowest level logged."
    )
    access_log: bool = _field("ACCESS_LOG", "true", _parse_bool, "Log one line per HTTP request.")
    signature_checks: str = _field(
        "SIGNATURE_CHECKS",
        "auto",
        _parse_choice("auto", "helper", "thread"),
        "Where request signatures are checked: a helper process per API process, a thread of it, "
        "or auto (a helper when a CPU is left over beyond HTTP_PROCESSES).",
    )
    worker_http_host: str = _field(
        "WORKER_HTTP_HOST", "127.0.0.1", _parse_host, "Address of the worker's health and metrics endpoint."
    )
    worker_http_port: int = _field(
        "WORKER_HTTP_PORT", "8081", _parse_int(0, 65535), "Port of the worker's /livez, /readyz and /metrics; 0 turns it off."
    )
    worker_prefetch: int = _field(
        "WORKER_PREFETCH", "512", _parse_int(1, 65535), "Unacknowledged messages a worker may hold."
    )
    worker_batch_size: int = _field(
        "WORKER_BATCH_SIZE", "256", _parse_int(1, 10000), "Most events applied in one transaction."
    )
    worker_batch_wait: float = _field(
        "WORKER_BATCH_WAIT_MS", "3", _parse_float(0, 10000), "Milliseconds a worker waits to fill a batch."
    )
    worker_shutdown_timeout: float = _field(
        "WORKER_SHUTDOWN_TIMEOUT", "20", _parse_float(0, 3600), "Seconds a worker has to finish events in flight on SIGTERM."
    )
    event_max_bytes: int = _field(
        "EVENT_MAX_BYTES", "1048576", _parse_int(1024, 64 << 20), "Largest event message in bytes; larger ones are dead-lettered."
    )
    prometheus_multiproc_dir: str = _field(
        "PROMETHEUS_MULTIPROC_DIR",
        "",
        _parse_path,
        "Directory for the metric files of several API processes, cleared at start; unset: a temporary directory.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `environ` (default: the process environment)."""
        if environ is None:
            environ = os.environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            meta = field.metadata
            if field.name in overrides:
                values[field.name] = overrides[field.name]
                continue
            raw = environ.get(meta["env"])
            if raw is None or raw.strip() == "":
                raw = meta["default"]
            try:
                values[field.name] = meta["parse"](raw)
            except ValueError as exc:
                shown = "<hidden>" if meta["secret"] else repr(raw)
                raise SettingsError(f"invalid {meta['env']}={shown}: {exc}") from None
        settings = cls(**values)
        if settings.worker_prefetch < settings.worker_batch_size:
            raise SettingsError(
                f"invalid WORKER_PREFETCH={settings.worker_prefetch}: expected at least "
                f"WORKER_BATCH_SIZE ({settings.worker_batch_size}), or batches can never fill"
            )
        return settings

    def __repr__(self) -> str:
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata["secret"]:
                value = redact_url(value)
            shown.append(f"{field.name}={value!r}")
        return "Settings(" + ", ".join(shown) + ")"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.amqp_exchange}.dead-letter"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.amqp_queue}.dead-letter"


def describe() -> str:
    """Return a table of every variable, its default and meaning, for `--help`."""
    lines = []
    for field in dataclasses.fields(Settings):
        meta = field.metadata
        default = meta["default"] if not meta["secret"] else redact_url(meta["default"])
        lines.append(f"  {meta['env']:<26} {meta['help']} (default: {default or 'unset'})")
    return "\n".join(lines)
