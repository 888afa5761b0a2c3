"""Helpers shared by the tests: bounded waits, request signing later, and the images
the CloudAPI behaviour cases are written against."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

DEFAULT_TIMEOUT = 20.0  # seconds any wait in a test may take before it fails

OPERATOR = "930896af-bf8c-48d4-885c-6573a94b1853"  # the "admin" owner of public images

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
