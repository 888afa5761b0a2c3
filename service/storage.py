"""Read side of the images read model, with a bounded in-process cache.

The cache holds, per image, the visibility fields and the serialized answers already
asked for (one per rendering, with its Content-MD5). It is only used while the change
listener is connected; a notification drops the changed images, and a lost listening
connection flushes everything. Missing and deleted ids are cached too, in their own
smaller LRU, so a missing id and a hidden image cost the same.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg
import orjson

from service import db
from service.errors import DatabaseUnavailable
from service.images import Rendering, render
from service.notify import Subscriber

_QUERIES = db.load_queries("read.sql")

# Visible to accounts other than the owner only in these states.
_ACTIVATED_STATES = frozenset({"active", "disabled"})


_EMPTY_ACL: frozenset[str] = frozenset()


def _exact(data: bytes) -> bytes:
    # orjson returns bytes whose memory block keeps the capacity of its output buffer
    # (about 8 KiB here for a 600-byte body); a copy holds just the bytes, which matters
    # for tens of thousands of cached answers.
    return bytes(memoryview(data))


@dataclass(slots=True)
class ImageRecord:
    """One live image: the fields visibility needs, and its responses rendered so far.

    The manifest itself is not kept: an answer for another API version class is rare,
    and rendering it means reading the row again.
    """

    owner: str | None
    public: bool
    state: str | None
    acl: frozenset[str]
    answers: list[tuple[bytes, str] | None]

    def visible_to(self, account_uuid: str | None) -> bool:
        """Apply CloudAPI's visibility rules for the account `account_uuid`.

        None stands for "no account": every image that is not deleted is visible, which is
        what the API serves when authentication is switched off.
        """
        if account_uuid is None:
            return True
        if self.owner == account_uuid:
            return True
        if self.state not in _ACTIVATED_STATES:
            return False
        return self.public or account_uuid in self.acl

    def answer(self, rendering: Rendering) -> tuple[bytes, str] | None:
        """Return the JSON body for `rendering` and its base64 MD5, if rendered already."""
        return self.answers[rendering]


def _record(row, rendering: Rendering) -> ImageRecord:
    body = _exact(render(orjson.loads(row["manifest"]), rendering))
    answers: list[tuple[bytes, str] | None] = [None, None, None]
    answers[rendering] = (body, base64.b64encode(hashlib.md5(body).digest()).decode("ascii"))
    owner = row["owner"]
    acl = row["acl"]
    return ImageRecord(
        # Owners and states repeat across images; one shared string each saves memory.
        owner=sys.intern(owner) if owner is not None else None,
        public=bool(row["public"]),
        state=sys.intern(row["state"]) if row["state"] is not None else None,
        acl=frozenset(acl) if acl else _EMPTY_ACL,
        answers=answers,
    )


class _Missing:
    """Cache marker for an id with no live image (never seen, or deleted)."""


MISSING = _Missing()


class _LRU:
    def __init__(self, max_size: int):
        self.max_size = max_size
        self._data: OrderedDict[str, object] = OrderedDict()

    def get(self, key: str):
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: str, value: object) -> None:
        if self.max_size <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def pop(self, key: str) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class ImageStore(Subscriber):
    """Fetch images by UUID through the cache; one query per miss, shared by concurrent misses."""

    def __init__(self, pool: asyncpg.Pool, *, query_timeout: float, cache_size: int):
        self._pool = pool
        self._gate = db.FairGate(pool.get_max_size())
        self._query_timeout = query_timeout
        self._live = _LRU(cache_size)
        self._missing = _LRU(min(cache_size, max(1024, cache_size // 4)) if cache_size else 0)
        self._loading: dict[str, asyncio.Future] = {}
        self._enabled = False
        # Bumped by every flush; a load that started before a flush must not fill the cache.
        self._generation = 0
        self.hits = 0
        self.misses = 0

    # Subscriber interface, driven by the change listener.

    def on_change(self, ids: list[str]) -> None:
        for uuid in ids:
            self._live.pop(uuid)
            self._missing.pop(uuid)
            # A load in flight may have read the old row; keep its result out of the cache.
            self._loading.pop(uuid, None)

    def on_flush(self) -> None:
        self._generation += 1
        self._live.clear()
        self._missing.clear()
        self._loading.clear()

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = enabled and self._live.max_size > 0

    @property
    def cached_images(self) -> int:
        return len(self._live) + len(self._missing)

    async def get(self, uuid: str, rendering: Rendering) -> ImageRecord | None:
        """Return the live image `uuid` with its answer for `rendering`, or None when it
        does not exist or was deleted."""
        if self._enabled:
            found = self._live.get(uuid)
            if found is None:
                found = self._missing.get(uuid)
            if found is not None:
                if found is MISSING:
                    self.hits += 1
                    return None
                if found.answers[rendering] is not None:
                    self.hits += 1
                    return found
            else:
                pending = self._loading.get(uuid)
                if pending is not None:
                    record = await asyncio.shield(pending)
                    if record is None or record.answers[rendering] is not None:
                        return record
        self.misses += 1
        if not self._enabled:
            return await self._fetch(uuid, rendering)

        future = asyncio.get_running_loop().create_future()
        self._loading[uuid] = future
        generation = self._generation
        try:
            record = await self._fetch(uuid, rendering)
        except BaseException as exc:
            if self._loading.get(uuid) is future:
                del self._loading[uuid]
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else DatabaseUnavailable("cancelled"))
                # Mark the exception retrieved: waiters may all have gone away.
                future.exception()
            raise
        if self._loading.get(uuid) is future:
            del self._loading[uuid]
            if self._enabled and generation == self._generation:
                if record is None:
                    self._missing.put(uuid, MISSING)
                else:
                    # Keep the answers for other versions rendered from the same revision.
                    previous = self._live.get(uuid)
                    if previous is not None and previous is not record:
                        for index, answer in enumerate(previous.answers):
                            if record.answers[index] is None:
                                record.answers[index] = answer
                    self._live.put(uuid, record)
        future.set_result(record)
        return record

    async def _fetch(self, uuid: str, rendering: Rendering) -> ImageRecord | None:
        try:
            async with asyncio.timeout(self._query_timeout):
                async with self._gate, self._pool.acquire() as connection:
                    row = await connection.fetchrow(_QUERIES["get_image"], uuid)
        except Exception as exc:
            if db.is_transient(exc):
                raise DatabaseUnavailable(repr(exc)) from exc
            raise
        if row is None or row["deleted"]:
            return None
        return _record(row, rendering)

    async def ping(self, timeout: float) -> None:
        """Run a trivial query; raise DatabaseUnavailable when Postgres does not answer."""
        try:
            async with asyncio.timeout(timeout):
                async with self._gate, self._pool.acquire() as connection:
                    await connection.fetchval(_QUERIES["ping_database"])
        except Exception as exc:
            raise DatabaseUnavailable(repr(exc)) from exc
