"""No signature, Authorization header, password or full DSN reaches a log.

tests/log_capture.py captures every log line of the run (structlog at every level, the
standard library from INFO, and the API processes the tests start) and every signature
the tests compute. `test_run_logged_no_secrets` runs after every other test and
searches all of it.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from aiohttp import web

from service.app import create_app
from service.auth import stage as auth_stage
from service.protocol import make_runner
from service.settings import Settings, redact_url
from tests import log_capture
from tests.conftest import AMQP_URL
from tests.helpers import PUB_UUID

# A signature's first characters: enough to recognise one cut short by a log.
_SIGNATURE_PREFIX = 24
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{%d,}" % _SIGNATURE_PREFIX)


def _new_text(path, offset: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", "backslashreplace")


def _signature_prefixes_in(text: str) -> set[str]:
    """Return the prefixes of recorded signatures that occur anywhere in `text`."""
    prefixes = {signature[:_SIGNATURE_PREFIX] for signature in log_capture.SIGNATURES}
    found = set()
    for match in _BASE64_RUN.finditer(text):
        run = match.group()
        for start in range(len(run) - _SIGNATURE_PREFIX + 1):
            if run[start : start + _SIGNATURE_PREFIX] in prefixes:
                found.add(run[start : start + _SIGNATURE_PREFIX])
    return found


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://app:secret@db:5432/images", "postgresql://app:***@db:5432/images"),
        ("postgresql://app@db/images?password=secret", "postgresql://app@db/images?password=***"),
        ("postgresql://db/images?sslmode=require&sslpassword=s", "postgresql://db/images?sslmode=require&sslpassword=***"),
        ("amqp://guest:guest@127.0.0.1:5672/%2F", "amqp://guest:***@127.0.0.1:5672/%2F"),
        ("postgresql://db/images", "postgresql://db/images"),
    ],
)
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


def test_settings_repr_hides_passwords():
    settings = Settings.from_env(
        {"DATABASE_URL": "postgresql://app@db/images?password=db-secret", "AMQP_URL": "amqp://bus:bus-secret@mq:5672/%2F"}
    )

    shown = repr(settings)

    assert "db-secret" not in shown
    assert "bus-secret" not in shown


class _FailingKeyStore:
    """A key store that fails unexpectedly: the request ends in a logged 500."""

    async def find(self, reference: str):
        raise RuntimeError("the key store failed")


async def test_unexpected_error_logs_no_request_secrets(settings, accounts, log_capture_dir, http):
    app = create_app(dataclasses.replace(settings, http_drain_timeout=1.0))

    async def break_key_store(app: web.Application) -> None:
        app[auth_stage.KEY_STORE] = _FailingKeyStore()

    app.on_startup.append(break_key_store)
    runner = make_runner(app, settings)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/my/images/{PUB_UUID}"
    structlog_file = log_capture_dir / "structlog.jsonl"
    offset = structlog_file.stat().st_size
    headers = accounts["alice"].sign("GET", f"/my/images/{PUB_UUID}")
    try:
        async with http.get(url, headers=headers) as response:
            body = await response.read()
    finally:
        await runner.cleanup()
    logged = _new_text(structlog_file, offset)
    signature = headers["Authorization"].rsplit('signature="', 1)[1].rstrip('"')

    assert response.status == 500
    assert body == b'{"code":"InternalError","message":"Internal Error"}'
    assert '"event":"request_failed"' in logged
    assert "the key store failed" in logged
    assert '"locals"' not in logged
    assert "Signature keyId=" not in logged
    assert signature[:_SIGNATURE_PREFIX] not in logged


async def test_oversized_authorization_is_not_logged(edge_api, log_capture_dir):
    from tests.hostile.conftest import send_raw

    stdlib_file = log_capture_dir / "stdlib.log"
    structlog_file = log_capture_dir / "structlog.jsonl"
    offsets = (stdlib_file.stat().st_size, structlog_file.stat().st_size)
    marker = "oversized-marker-" + "A" * 9000
    request = f'GET /--ping HTTP/1.1\r\nHost: x\r\nAuthorization: Signature keyId="{marker}"\r\n\r\n'.encode()

    answer = await send_raw(edge_api, request)
    logged = _new_text(stdlib_file, offsets[0]) + _new_text(structlog_file, offsets[1])

    assert answer.status == 431
    assert '"event":"request_rejected"' in logged
    assert "oversized-marker" not in logged
    assert "Signature keyId=" not in logged


@pytest.mark.last
def test_run_logged_no_secrets(log_capture_dir):
    text = log_capture.captured_text(log_capture_dir)
    if '"request_served"' not in text:
        pytest.skip("this run served no request, so its logs show nothing to check")

    # The header's name, not the word inside asyncpg's InvalidAuthorizationSpecificationError,
    # which a test of a missing role logs.
    assert re.search(r"(?<![A-Za-z])Authorization(?![A-Za-z])", text) is None
    assert "Signature keyId=" not in text
    assert "signature=" not in text
    assert "guest:guest" not in text
    assert AMQP_URL not in text
    assert log_capture.DSN_PASSWORD not in text
    assert len(log_capture.SIGNATURES) > 100
    assert _signature_prefixes_in(text) == set()
