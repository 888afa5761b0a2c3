"""Fixtures of the hostile-input tests: the API served exactly as production serves it
(the runner of `service.protocol`, with its parser limits and header timeout), and raw
TCP connections to it for requests that no HTTP client library would send.

Every address is loopback, and every read has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from service.app import create_app
from service.protocol import make_runner
from service.settings import Settings

READ_TIMEOUT = 10.0  # seconds any raw read may take before the test fails


@contextlib.asynccontextmanager
async def serve_api(settings: Settings) -> AsyncIterator[str]:
    """Serve the API on a free loopback port the way `service.app.serve` does; yield its URL."""
    runner = make_runner(create_app(settings), settings)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
async def edge_api(settings, accounts) -> AsyncIterator[str]:
    """The production-configured API with the default header timeout (10 s)."""
    async with serve_api(dataclasses.replace(settings, http_drain_timeout=1.0)) as url:
        yield url


@pytest.fixture(scope="session")
async def impatient_api(settings, accounts) -> AsyncIterator[str]:
    """The production-configured API with a header and body timeout of one second."""
    async with serve_api(dataclasses.replace(settings, http_header_timeout=1.0, http_drain_timeout=1.0)) as url:
        yield url


@dataclass
class RawAnswer:
    status: int
    headers: CIMultiDict
    body: bytes

    def json(self):
        return orjson.loads(self.body)


def address(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)


async def read_answer(reader: asyncio.StreamReader, *, head: bool = False) -> RawAnswer:
    """Read one HTTP/1.1 response with a Content-Length body (or none, for HEAD)."""
    async with asyncio.timeout(READ_TIMEOUT):
        status_line = await reader.readuntil(b"\r\n")
        headers: CIMultiDict = CIMultiDict()
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers.add(name.strip(), value.strip())
        length = 0 if head else int(headers.get("Content-Length", "0"))
        body = await reader.readexactly(length)
    return RawAnswer(int(status_line.split()[1]), headers, body)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = READ_TIMEOUT) -> bool:
    """Return True when the server closes the connection (EOF or reset) within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            rest = await reader.read()
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return rest == b""


@contextlib.asynccontextmanager
async def raw_connection(url: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*address(url))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def send_raw(url: str, data: bytes, *, head: bool = False, until_closed: bool = False) -> RawAnswer:
    """Send `data` on a new connection and return the one answer; with `until_closed`,
    fail unless the server then closes the connection."""
    async with raw_connection(url) as (reader, writer):
        writer.write(data)
        await writer.drain()
        answer = await read_answer(reader, head=head)
        if until_closed:
            assert await closed_by_server(reader), "the server kept the connection open after the answer"
        return answer
