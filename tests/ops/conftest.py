"""Fixtures of the operations tests: the API and the worker as real processes or on real
ports, their JSON log lines, a metrics scraper, and broker names of a test's own."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import aio_pika
import orjson
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AMQP_URL
from tests.helpers import DEFAULT_TIMEOUT, wait_until

ROOT = Path(__file__).parents[2]
CLOSED_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/cloudapi_images"  # nothing listens on port 1


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connection_refused(port: int) -> bool:
    """Return True when nothing accepts connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


class ServiceProcess:
    """`python -m <module>` in a subprocess, with its JSON log lines collected as they come."""

    def __init__(self, module: str, env: dict[str, str]):
        base = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
        self.process = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env={**base, "LOG_FORMAT": "json", "LOG_LEVEL": "info", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.process.pid
        self.lines: list[dict] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        for raw in self.process.stdout:
            try:
                self.lines.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                self.stderr.append("stdout, not JSON: " + raw.decode("utf-8", "replace"))

    def _read_stderr(self) -> None:
        for raw in self.process.stderr:
            self.stderr.append(raw.decode("utf-8", "replace"))

    def events(self, name: str) -> list[dict]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_for_events(self, name: str, count: int = 1, timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
        """Wait until `count` lines with event `name` were logged; fail early if the process exits."""

        async def logged():
            found = self.events(name)
            if len(found) >= count:
                return found
            if self.process.poll() is not None:
                await asyncio.to_thread(self._join_readers)
                found = self.events(name)
                if len(found) >= count:
                    return found
                raise AssertionError(
                    f"process {self.pid} exited with {self.process.returncode} before logging {name} {count} times; "
                    f"stderr: {''.join(self.stderr)[-2000:]}"
                )
            return None

        return await wait_until(logged, timeout=timeout, message=f"{count} {name} lines from process {self.pid}")

    async def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit and return its exit code; fail after `timeout` seconds."""
        code = await asyncio.to_thread(self.process.wait, timeout)
        await asyncio.to_thread(self._join_readers)
        return code

    def _join_readers(self) -> None:
        for reader in self._readers:
            reader.join(timeout=DEFAULT_TIMEOUT)

    def child_pids(self) -> list[int]:
        """Pids of the children a multi-process API reported starting."""
        return [pid for line in self.events("api_processes_started") for pid in line["pids"]]

    def kill(self) -> None:
        """End the process and the children it reported, by their pids (for `finally` blocks).

        SIGTERM first, so that a multi-process API stops its children itself; SIGKILL
        after DEFAULT_TIMEOUT seconds.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=DEFAULT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=DEFAULT_TIMEOUT)
        for pid in self.child_pids():
            kill_child(pid)
        self._join_readers()
        self.process.stdout.close()
        self.process.stderr.close()


def kill_child(pid: int) -> None:
    """SIGKILL a child that a multi-process API spawned, if that pid still is one of them."""
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read()
        # A pid can be reused once the process is gone; only kill a multiprocessing child.
        if b"multiprocessing" in command:
            os.kill(pid, signal.SIGKILL)


async def scrape(http, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET a Prometheus text endpoint; return {(sample name, sorted labels): value}."""
    # The session fixture does not decompress, and the endpoints compress when asked.
    async with http.get(url, headers={"Accept-Encoding": "identity"}) as response:
        assert response.status == 200, await response.text()
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float | None:
    """Return the value of sample `name` with exactly `labels`, or None."""
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def api_env(settings) -> dict[str, str]:
    """Environment of an API subprocess on free loopback ports, with the test database."""
    return {
        "DATABASE_URL": settings.database_url,
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(free_port()),
        "METRICS_PORT": "0",
        "HTTP_DRAIN_TIMEOUT": "15",
    }


@pytest.fixture
async def broker_settings(settings):
    """Settings with an exchange and queues of this test's own, deleted afterwards, so a
    worker started by the test does not compete with the session's worker."""
    prefix = f"test-{secrets.token_hex(4)}"
    own = dataclasses.replace(settings, amqp_exchange=f"{prefix}.images", amqp_queue=f"{prefix}.images.read-model")
    yield own
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for queue in (own.amqp_queue, own.dead_letter_queue):
            await channel.queue_delete(queue)
        for exchange in (own.amqp_exchange, own.dead_letter_exchange):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


@pytest.fixture
def captured_logs():
    """Every structlog line at any level, with the context variables merged in."""
    capture = structlog.testing.LogCapture()
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(processors=saved["processors"], wrapper_class=saved["wrapper_class"])


async def wait_for_value(http, url: str, name: str, expected: float, **labels: str) -> dict:
    """Scrape `url` until sample `name{labels}` equals `expected`; return the last scrape."""
    last = {}

    async def reached():
        nonlocal last
        last = await scrape(http, url)
        return sample(last, name, **labels) == expected

    try:
        await wait_until(reached, message=f"{name}{labels} == {expected}")
    except AssertionError:
        raise AssertionError(f"{name}{labels} is {sample(last, name, **labels)}, expected {expected}") from None
    return last


@pytest.fixture
async def running_worker(broker_settings):
    """A worker on this test's own queue, with its health endpoint on a free port; yields
    the worker and the URL of its /metrics."""
    from workers.consumer import Worker
    from workers.health import start_health_server

    worker = Worker(broker_settings)
    port = free_port()
    health = await start_health_server(worker, "127.0.0.1", port)
    await worker.start()
    task = asyncio.create_task(worker.run())
    yield worker, f"http://127.0.0.1:{port}/metrics"
    worker.stop()
    await asyncio.wait_for(task, timeout=DEFAULT_TIMEOUT)
    await health.cleanup()
