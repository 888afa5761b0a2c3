"""Fixtures of the API tests: a client that sends real HTTP to the API on loopback."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from multidict import CIMultiDictProxy


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy
    body: bytes

    def json(self):
        import orjson

        return orjson.loads(self.body)


@pytest.fixture
def call(api, http, accounts):
    """Send one request to the API, signed as alice unless `as_` names another account
    (or None for no signature), and return status, headers and raw body."""

    async def send(
        path: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        as_: str | None = "alice",
        key: str = "rsa",
    ) -> Answer:
        all_headers = dict(headers or {})
        if as_ is not None:
            all_headers.update(accounts[as_].sign(method, path, key=key))
        async with http.request(method, api + path, headers=all_headers, data=data, allow_redirects=False) as response:
            body = await response.read()
            return Answer(response.status, response.headers, body)

    return send
