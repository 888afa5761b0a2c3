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
def call(api, http):
    """Send one request to the API and return status, headers and raw body."""

    async def send(path: str, *, method: str = "GET", headers: dict[str, str] | None = None, data: bytes | None = None) -> Answer:
        async with http.request(method, api + path, headers=headers or {}, data=data, allow_redirects=False) as response:
            body = await response.read()
            return Answer(response.status, response.headers, body)

    return send
