"""Names, ports, sizes and durations of one benchmark session, in one place."""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".bench"  # keys, request files, logs and results; ignored by git
PYTHON = str(ROOT / ".venv" / "bin" / "python")
LUA_SCRIPT = str(Path(__file__).resolve().parent / "requests.lua")

ADMIN_DSN = os.environ.get("BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE_NAME = os.environ.get("BENCH_DATABASE", "cloudapi_bench")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")

# Every name this suite creates on the shared RabbitMQ starts with this prefix.
AMQP_PREFIX = "bench-cloudapi-images"

# Namespace of the UUIDs of the bench accounts and images, so that every run builds the
# same data set.
NAMESPACE = uuid.UUID("6d1f0a0e-5b7c-4c1e-9a55-1b2c3d4e5f60")

IMAGE_COUNT = 100_000
ACCOUNT_COUNT = 10
REAL_MANIFESTS = ROOT / "tests" / "data" / "real-manifests.jsonl"

WRK_THREADS = 1
WRK_CONNECTIONS = 64


@dataclasses.dataclass(frozen=True)
class Profile:
    """Durations and sizes of a full or a quick session."""

    name: str
    warmup_seconds: int
    http_seconds: int
    freshness_seconds: int
    freshness_rate: int  # events published per second
    freshness_sample_every: int  # every Nth event is polled
    worker_events: int

    @classmethod
    def full(cls) -> Profile:
        return cls("full", warmup_seconds=3, http_seconds=10, freshness_seconds=30, freshness_rate=1000,
                   freshness_sample_every=20, worker_events=100_000)

    @classmethod
    def quick(cls) -> Profile:
        return cls("quick", warmup_seconds=1, http_seconds=3, freshness_seconds=8, freshness_rate=1000,
                   freshness_sample_every=20, worker_events=10_000)


def database_url() -> str:
    """Return the DSN of the bench database, derived from the admin DSN."""
    head, _, _ = ADMIN_DSN.rpartition("/")
    return f"{head}/{DATABASE_NAME}"


def account_login(index: int) -> str:
    return f"bench{index + 1:02d}"


def account_uuid(index: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"account-{index}"))


def image_uuid(index: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"image-{index}"))
