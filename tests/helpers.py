"""Helpers shared by the tests: bounded waits, test accounts that sign requests, and the
images the CloudAPI behaviour cases are written against."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from service.auth.client import sign_headers
from service.auth.keys import parse_public_key
from service.protocol import make_runner

DEFAULT_TIMEOUT = 20.0  # seconds any wait in a test may take before it fails

OPERATOR = "930896af-bf8c-48d4-885c-6573a94b1853"  # the "admin" owner of public images

# The accounts of the test run (registered by the `accounts` fixture); dave is disabled.
ALICE_UUID = "a11ce000-0000-4000-8000-00000000000a"
BOB_UUID = "b0b00000-0000-4000-8000-00000000000b"
CAROL_UUID = "ca201000-0000-4000-8000-00000000000c"
DAVE_UUID = "da7e0000-0000-4000-8000-00000000000d"
ACCOUNT_UUIDS = {"alice": ALICE_UUID, "bob": BOB_UUID, "carol": CAROL_UUID, "dave": DAVE_UUID}

# The image of CloudAPI's GetImage documentation example; with `Accept-Version: ~8` its
# answer must be exactly PUB_BODY (609 bytes, Content-MD5 42n5PWY5xZP0lnjdMb7Omg==).
PUB_UUID = "2b683a82-a066-11e3-97ab-2faa44701c5a"
PUB = {
    "v": 2,
    "uuid": PUB_UUID,
    "owner": OPERATOR,
    "name": "base",
    "version": "13.4.0",
    "description": "A 32-bit SmartOS image with just essential packages installed. Ideal for users who are comfortable with setting up their own environment and tools.",
    "homepage": "https://docs.joyent.com/images/smartos/base",
    "state": "active",
    "disabled": False,
    "public": True,
    "published_at": "2014-02-28T10:50:42Z",
    "type": "zone-dataset",
    "os": "smartos",
    "files": [{"sha1": "3bebb6ae2cdb26eef20cfb30fdc4a00a059a0b7b", "size": 110742036, "compression": "gzip"}],
    "requirements": {},
    "tags": {"role": "os", "group": "base-32"},
}
PUB_BODY = (
    b'{"id":"2b683a82-a066-11e3-97ab-2faa44701c5a","name":"base","version":"13.4.0","os":"smartos",'
    b'"requirements":{},"type":"zone-dataset","description":"A 32-bit SmartOS image with just essential '
    b'packages installed. Ideal for users who are comfortable with setting up their own environment and '
    b'tools.","files":[{"compression":"gzip","sha1":"3bebb6ae2cdb26eef20cfb30fdc4a00a059a0b7b",'
    b'"size":110742036}],"tags":{"role":"os","group":"base-32"},"homepage":"https://docs.joyent.com/'
    b'images/smartos/base","published_at":"2014-02-28T10:50:42Z","owner":"930896af-bf8c-48d4-885c-'
    b'6573a94b1853","public":true,"state":"active"}'
)
PUB_MD5 = "42n5PWY5xZP0lnjdMb7Omg=="


def new_uuid() -> str:
    return str(uuid.uuid4())


def md5_base64(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode("ascii")


def manifest(**fields: Any) -> dict[str, Any]:
    """Return an active public zone image with a fresh UUID, overridden by `fields`."""
    base = {
        "v": 2,
        "uuid": new_uuid(),
        "owner": OPERATOR,
        "name": "test-image",
        "version": "1.0.0",
        "state": "active",
        "disabled": False,
        "public": True,
        "published_at": "2026-01-02T03:04:05.678Z",
        "type": "zone-dataset",
        "os": "smartos",
        "files": [{"sha1": "0" * 40, "size": 1024, "compression": "gzip"}],
        "requirements": {},
    }
    for key, value in fields.items():
        if value is REMOVE:
            base.pop(key, None)
        else:
            base[key] = copy.deepcopy(value)
    return base


REMOVE = object()  # pass as a field value to leave the key out of `manifest()`


async def wait_until(
    condition: Callable[[], Awaitable[Any]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = await condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def bench_image_server(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """Serve `handler` at GET /bench01/images/{id} on a free loopback port, and yield the base URL."""
    app = web.Application()
    app.router.add_get("/bench01/images/{id}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# Accounts of the tests, with one private key of every supported type.


def _generate_keys() -> dict[str, object]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ecdsa-p256": ec.generate_private_key(ec.SECP256R1()),
        "ecdsa-p384": ec.generate_private_key(ec.SECP384R1()),
        "ecdsa-p521": ec.generate_private_key(ec.SECP521R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


def openssh_public(private_key) -> str:
    return private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@dataclass
class TestAccount:
    """An account of the test run and its private keys, registered under their type names."""

    __test__ = False  # not a test class, despite the name

    login: str
    uuid: str = field(default_factory=new_uuid)
    keys: dict[str, object] = field(default_factory=_generate_keys)

    def fingerprint(self, key: str = "rsa") -> str:
        return parse_public_key(openssh_public(self.keys[key])).md5_fingerprint

    def sha256(self, key: str = "rsa") -> str:
        return parse_public_key(openssh_public(self.keys[key])).sha256_fingerprint

    def sign(self, method: str, target: str, *, key: str = "rsa", key_id: str | None = None, **options) -> dict[str, str]:
        """Return Date and Authorization headers; the keyId names the key by its type name."""
        return sign_headers(
            self.keys[key],
            key_id=key_id or f"/{self.login}/keys/{key}",
            method=method,
            target=target,
            **options,
        )


class ServiceServer(TestServer):
    """aiohttp's TestServer with the runner the service serves with (`make_runner`): its
    connection layer, limits and hot path, as in production."""

    def __init__(self, app, settings, **kwargs):
        super().__init__(app, host="127.0.0.1", **kwargs)
        self._settings = settings

    async def _make_runner(self, **kwargs):
        return make_runner(self.app, self._settings)
