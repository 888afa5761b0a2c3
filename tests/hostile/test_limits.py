"""Limits of the HTTP layer, against the API served as in production: the request line,
header size and count, malformed requests, the header and body timeouts, request bodies,
and a flood of idle and slow connections. Every error response is CloudAPI JSON with the
full header set, never aiohttp's text/plain."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from aiohttp import web, web_protocol

from service import protocol
from service.protocol import MAX_FIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE
from tests.api.test_get_image import assert_full_headers
from tests.api.test_openapi import assert_conforms
from tests.helpers import PUB, PUB_BODY, PUB_UUID
from tests.hostile.conftest import (
    address,
    closed_by_server,
    raw_connection,
    read_answer,
    send_raw,
)

IMAGE = f"/my/images/{PUB_UUID}"


@pytest.fixture(scope="module", autouse=True)
async def _images(db_pool):
    from tests.conftest import store_manifests

    await store_manifests(db_pool, PUB)


def _request(target: str = "/--ping", *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _signed_request(accounts, target: str = IMAGE, *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    signed = accounts["alice"].sign(method, target)
    return _request(target, f"Date: {signed['Date']}", f"Authorization: {signed['Authorization']}", *headers, method=method, body=body)


def _assert_cloudapi_error(answer, status: int, code: str) -> None:
    assert answer.status == status
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["code"] == code
    assert_full_headers(answer, api_version="9.0.0")


# The request line and headers.


async def test_request_line_at_the_limit_is_parsed(edge_api):
    target = "/--ping?" + "a" * (MAX_REQUEST_LINE - len("/--ping?"))

    answer = await send_raw(edge_api, _request(target))

    assert answer.status == 200


async def test_request_line_over_the_limit(edge_api):
    target = "/--ping?" + "a" * (MAX_REQUEST_LINE + 1 - len("/--ping?"))

    answer = await send_raw(edge_api, _request(target), until_closed=True)

    _assert_cloudapi_error(answer, 414, "UriTooLong")
    assert answer.json()["message"] == f"the request line must not exceed {MAX_REQUEST_LINE} bytes"


async def test_long_image_path(edge_api, accounts):
    target = "/my/images/" + "a" * 10_000

    answer = await send_raw(edge_api, _signed_request(accounts, target))

    _assert_cloudapi_error(answer, 414, "UriTooLong")
    assert_conforms("GET", IMAGE, answer)


@pytest.mark.parametrize("name", ["X-Padding", "Authorization"])
async def test_header_value_at_the_limit_is_parsed(edge_api, name):
    answer = await send_raw(edge_api, _request("/--ping", f"{name}: " + "v" * MAX_FIELD_SIZE))

    assert answer.status == 200


@pytest.mark.parametrize("name", ["X-Padding", "Authorization", "Accept-Version"])
async def test_header_value_over_the_limit(edge_api, accounts, name):
    value = "v" * (MAX_FIELD_SIZE + 1)

    answer = await send_raw(edge_api, _signed_request(accounts, IMAGE, f"{name}: {value}"), until_closed=True)

    _assert_cloudapi_error(answer, 431, "RequestHeaderFieldsTooLarge")
    assert answer.json()["message"] == f"a request header must not exceed {MAX_FIELD_SIZE} bytes"
    assert_conforms("GET", IMAGE, answer)


async def test_header_name_over_the_limit(edge_api):
    answer = await send_raw(edge_api, _request("/--ping", "X" * (MAX_FIELD_SIZE + 1) + ": v"), until_closed=True)

    _assert_cloudapi_error(answer, 431, "RequestHeaderFieldsTooLarge")


async def test_header_count_at_the_limit(edge_api):
    # Host is one of the MAX_HEADERS.
    headers = [f"X-Header-{index}: {index}" for index in range(MAX_HEADERS - 1)]

    answer = await send_raw(edge_api, _request("/--ping", *headers))

    assert answer.status == 200


async def test_header_count_over_the_limit(edge_api, accounts):
    headers = [f"X-Header-{index}: {index}" for index in range(MAX_HEADERS)]

    answer = await send_raw(edge_api, _signed_request(accounts, IMAGE, *headers))

    _assert_cloudapi_error(answer, 431, "RequestHeaderFieldsTooLarge")
    assert answer.json()["message"] == f"a request must not have more than {MAX_HEADERS} headers"
    assert_conforms("GET", IMAGE, answer)


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",  # a TLS ClientHello
        b"GET /my/images/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",  # raw bytes in the path
        b"GET /--ping HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /--ping HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /--ping HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /--ping HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET /--ping HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
        b"GET /--ping HTTP/1.1\r\nHost: x\r\n folded: continuation\r\n\r\n",
        b"GET /--ping HTTP/9.9\r\nHost: x\r\n\r\n",
        b"G\x00T /--ping HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\r\n\r\n\r\n\r\nnonsense\r\n\r\n",
    ],
    ids=["tls", "raw-path-bytes", "te-and-cl", "negative-cl", "two-cl", "nul-in-value", "space-in-name", "folding", "http-9.9", "nul-in-method", "http2-preface", "nonsense"],
)
async def test_malformed_request(edge_api, data):
    answer = await send_raw(edge_api, data, until_closed=True)

    _assert_cloudapi_error(answer, 400, "BadRequestError")
    assert answer.json()["message"].startswith("malformed HTTP request")


async def test_unknown_expectation(edge_api):
    answer = await send_raw(edge_api, _request("/--ping", "Expect: something-else"))

    _assert_cloudapi_error(answer, 417, "ExpectationFailed")


async def test_unknown_expectation_on_an_unknown_path(edge_api):
    answer = await send_raw(edge_api, _request("/nowhere", "Expect: something-else"))

    _assert_cloudapi_error(answer, 417, "ExpectationFailed")


async def test_continue_expectation(edge_api, accounts):
    data = _signed_request(accounts, IMAGE, "Expect: 100-continue", "Content-Length: 3")

    async with raw_connection(edge_api) as (reader, writer):
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"abc")
        answer = await read_answer(reader)

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert answer.status == 200
    assert answer.body == PUB_BODY


# Timeouts: the impatient API gives a client one second for its headers, and for its body.


async def _trickle(writer: asyncio.StreamWriter, pieces: list[bytes], interval: float) -> None:
    """Send `pieces` one every `interval` seconds, until the server closes the connection."""
    with contextlib.suppress(ConnectionError):
        for piece in pieces:
            await asyncio.sleep(interval)
            writer.write(piece)
            await writer.drain()


async def test_trickled_headers_are_cut_off(impatient_api):
    async with raw_connection(impatient_api) as (reader, writer):
        started = time.monotonic()
        writer.write(b"GET /--ping HTTP/1.1\r\nHost: x\r\n")
        trickle = asyncio.create_task(_trickle(writer, [b"X-Slow-%d: 1\r\n" % index for index in range(25)], 0.2))
        try:
            answer = await read_answer(reader)
            elapsed = time.monotonic() - started
            closed = await closed_by_server(reader, timeout=5)
        finally:
            trickle.cancel()

    _assert_cloudapi_error(answer, 408, "RequestTimeout")
    assert answer.json()["message"] == "request headers not received within 1 seconds"
    assert 0.9 < elapsed < 3.0
    assert closed
    assert_conforms("GET", IMAGE, answer)


async def test_silent_connection_is_closed_without_an_answer(impatient_api):
    async with raw_connection(impatient_api) as (reader, _writer):
        started = time.monotonic()

        assert await closed_by_server(reader, timeout=5)
        elapsed = time.monotonic() - started

    assert 0.9 < elapsed < 3.0


async def test_trickle_on_a_kept_alive_connection(impatient_api):
    async with raw_connection(impatient_api) as (reader, writer):
        writer.write(_request("/--ping"))
        first = await read_answer(reader)
        # Idle longer than the header timeout: waiting between requests is not sending headers.
        await asyncio.sleep(1.5)
        writer.write(_request("/--ping"))
        second = await read_answer(reader)
        writer.write(b"GET /--ping HTTP/1.1\r\n")
        started = time.monotonic()
        third = await read_answer(reader)
        elapsed = time.monotonic() - started

    assert (first.status, second.status) == (200, 200)
    _assert_cloudapi_error(third, 408, "RequestTimeout")
    assert 0.9 < elapsed < 3.0


async def test_headers_within_the_timeout(impatient_api):
    async with raw_connection(impatient_api) as (reader, writer):
        for line in (b"GET /--ping HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: b\r\n", b"\r\n"):
            writer.write(line)
            await asyncio.sleep(0.2)
        answer = await read_answer(reader)

    assert answer.status == 200


async def test_trickled_body_is_cut_off(impatient_api, accounts):
    data = _signed_request(accounts, IMAGE, "Content-Length: 100")

    async with raw_connection(impatient_api) as (reader, writer):
        writer.write(data)
        trickle = asyncio.create_task(_trickle(writer, [b"x"] * 25, 0.2))
        try:
            answer = await read_answer(reader)
        finally:
            trickle.cancel()

    _assert_cloudapi_error(answer, 408, "RequestTimeout")
    assert answer.json()["message"] == "request body not received within 1 seconds"


# Request bodies on GET: ignored up to HTTP_MAX_BODY bytes, refused beyond.


async def _chunked(chunks: list[bytes]):
    for chunk in chunks:
        yield chunk
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("chunks", "status"),
    [
        ([b"x" * 100], 200),
        ([b"x" * 4096, b"y" * 4096], 200),
        ([b"x" * 1024] * 9, 413),
        ([b"x"] * 9000, 413),
        ([b"x" * 100_000], 413),
    ],
    ids=["small", "at-limit", "nine-chunks", "many-tiny-chunks", "one-large"],
)
async def test_chunked_body(edge_api, http, accounts, chunks, status):
    headers = accounts["alice"].sign("GET", IMAGE)

    async with http.get(edge_api + IMAGE, headers=headers, data=_chunked(chunks)) as response:
        body = await response.read()
        sent_length = response.request_info.headers.get("Content-Length")
        transfer_encoding = response.request_info.headers.get("Transfer-Encoding")

    assert sent_length is None
    assert transfer_encoding == "chunked"
    assert response.status == status
    if status == 200:
        assert body == PUB_BODY
    else:
        assert response.headers["Content-Type"] == "application/json"
        assert body == b'{"code":"RequestTooLarge","message":"request body must not exceed 8192 bytes"}'


@pytest.mark.parametrize(("length", "status"), [(8192, 200), (8193, 413)])
async def test_body_with_content_length(edge_api, http, accounts, length, status):
    headers = accounts["alice"].sign("GET", IMAGE)

    async with http.get(edge_api + IMAGE, headers=headers, data=b"x" * length) as response:
        await response.read()

    assert response.status == status


async def test_malformed_chunked_body(edge_api, accounts):
    data = _signed_request(accounts, IMAGE, "Transfer-Encoding: chunked", body=b"zz\r\nnot hex\r\n0\r\n\r\n")

    answer = await send_raw(edge_api, data, until_closed=True)

    _assert_cloudapi_error(answer, 400, "BadRequestError")


async def test_malformed_chunk_after_the_headers(impatient_api, accounts):
    # aiohttp 3.14 queues the parse error as the next request and never fails the body
    # stream the handler is reading, so the response comes from the body timeout.
    async with raw_connection(impatient_api) as (reader, writer):
        writer.write(_signed_request(accounts, IMAGE, "Transfer-Encoding: chunked"))
        await asyncio.sleep(0.2)
        writer.write(b"zz\r\nnot hex\r\n0\r\n\r\n")
        answer = await read_answer(reader)

    _assert_cloudapi_error(answer, 408, "RequestTimeout")


# Many connections from one client.


async def test_flood_of_idle_and_slow_connections(edge_api, http, accounts):
    idle_count, slow_count = 250, 250
    connections = []
    try:
        for index in range(idle_count + slow_count):
            reader, writer = await asyncio.open_connection(*address(edge_api))
            if index >= idle_count:
                writer.write(b"GET /--ping HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            connections.append((reader, writer))
        await asyncio.sleep(0.2)

        started = time.monotonic()
        headers = accounts["alice"].sign("GET", IMAGE)
        async with asyncio.timeout(5):
            async with http.get(edge_api + IMAGE, headers=headers) as response:
                body = await response.read()
        elapsed = time.monotonic() - started
    finally:
        for _reader, writer in connections:
            writer.close()
        for _reader, writer in connections:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    assert len(connections) == idle_count + slow_count
    assert response.status == 200
    assert body == PUB_BODY
    assert elapsed < 2.0


# The aiohttp internals service.protocol builds on (see its docstring).


def test_aiohttp_is_the_version_protocol_was_written_for():
    major, minor = (int(part) for part in aiohttp.__version__.split(".")[:2])

    assert (major, minor) >= (3, 14), f"service.protocol was written for aiohttp 3.14, found {aiohttp.__version__}"
    assert major == 3, f"service.protocol was written for aiohttp 3.14, found {aiohttp.__version__}"


async def test_aiohttp_internals_used_by_protocol_exist():
    import inspect

    err_info = web_protocol._ErrInfo(status=408, exc=protocol.HeaderTimeout("t"), message="t")
    handler_slots = set()
    for cls in web_protocol.RequestHandler.__mro__:
        handler_slots.update(getattr(cls, "__slots__", ()))

    assert (err_info.status, err_info.message) == (408, "t")
    assert {"_messages", "_waiter", "_loop"} <= handler_slots
    assert "_make_server" in vars(web.AppRunner)
    assert list(inspect.signature(web_protocol.RequestHandler.handle_error).parameters) == ["self", "request", "status", "exc", "message"]
    assert {"_kwargs", "_loop"} <= set(vars(web.Server(lambda request: None)))
