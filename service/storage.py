"""Read side of the images read model, with a compact, bounded in-process cache.

The cache keeps, per image and rendering (API version class), one bytes object, an
"entry":

    flags (1) | MD5 of the body (16) | owner (4) | [acl size (2) | acl members (4 each)] | body

Owner and acl members are numbers from a table of the names seen (`_Names`): the same
few owners come back in thousands of images. The body is the JSON response compressed
with zstd and a dictionary of responses of the read model itself (before the first fill,
of `service/compression-sample.jsonl`). That takes a 500-byte body to about 150 bytes,
and back in about 2 microseconds. An entry and its key take about 350 bytes, so an API
process holds 100,000 images in about 35 MB (docs/benchmarks.md).

The cache is used only while the change listener is connected. A notification drops
the changed images, and a lost listening connection flushes everything. When the
listener connects, the cache fills itself from the read model (`warm()`), so a new API
process does not send a query per image to Postgres. Missing and deleted ids are cached
too, in a smaller table, so a missing id and a hidden image cost the same.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ctypes
import hashlib
from importlib import resources

import asyncpg
import orjson
import structlog
import zstandard

from service import db
from service.errors import DatabaseUnavailable
from service.images import Rendering, render
from service.notify import Subscriber

log = structlog.get_logger("cache")

_QUERIES = db.load_queries("read.sql")

# Visible to accounts other than the owner only in these states.
_ACTIVATED_STATES = frozenset({"active", "disabled"})

# Entry flags.
_PUBLIC = 1
_ACTIVATED = 2
_HAS_ACL = 4
_COMPRESSED = 8  # the body is compressed (entries made for one request while the cache is off are not)

_HEADER = 21  # flags, MD5 and owner
_NO_NAME = 0  # the owner number of an image without an owner

# Compression dictionaries: up to 16 KiB of text like what is compressed. Until the
# cache first fills itself, a sample of real responses; then responses of the read model
# itself (`_learn_dictionary`).
_SAMPLE_DICTIONARY = resources.files("service").joinpath("compression-sample.jsonl").read_bytes()
_DICTIONARY_SIZE = 16384
_COMPRESSION_LEVEL = 9  # 12 us per body here, and within 5 % of the smallest output


class Codec:
    """Compresses and decompresses entry bodies with one dictionary (zstd).

    Its objects are reused for every body, so a decompression costs no set-up: about
    1.7 us for a 500-byte answer. Use it on the event loop's thread only.
    """

    def __init__(self, dictionary: bytes):
        data = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        self.compress = zstandard.ZstdCompressor(
            level=_COMPRESSION_LEVEL, dict_data=data, write_checksum=False, write_dict_id=False
        ).compress
        self.decompress = zstandard.ZstdDecompressor(dict_data=data).decompress

WARM_PAGE = 250  # images per query while the cache fills itself
_NO_UUID = "00000000-0000-0000-0000-000000000000"


def image_key(uuid: str) -> bytes:
    """Return the cache key of the canonical UUID text `uuid` (16 bytes)."""
    return bytes.fromhex(uuid.replace("-", ""))


class _Names:
    """Numbers for owner and acl names, so entries hold 4 bytes instead of a string.

    Names are only added: there are as many as accounts that own or share images.
    """

    def __init__(self):
        self._numbers: dict[str, bytes] = {}

    def number(self, name: str) -> bytes:
        found = self._numbers.get(name)
        if found is None:
            found = self._numbers[name] = (len(self._numbers) + 1).to_bytes(4, "little")
        return found

    def find(self, name: str) -> bytes | None:
        return self._numbers.get(name)


def pack(row, rendering: Rendering, names: _Names, codec: Codec | None) -> bytes:
    """Return the entry of the read model row `row` rendered for `rendering`, its body
    compressed by `codec` unless that is None."""
    return pack_body(row, render(orjson.loads(row["manifest"]), rendering), names, codec)


def pack_body(row, body: bytes, names: _Names, codec: Codec | None) -> bytes:
    """Return the entry of the read model row `row` whose rendered body is `body`."""
    compress = codec is not None
    flags = _COMPRESSED if compress else 0
    if row["public"]:
        flags |= _PUBLIC
    if row["state"] in _ACTIVATED_STATES:
        flags |= _ACTIVATED
    owner = row["owner"]
    parts = [b"", hashlib.md5(body).digest(), names.number(owner) if owner is not None else bytes(4)]
    acl = row["acl"]
    if acl:
        members = sorted({names.number(member) for member in acl})[:65535]
        flags |= _HAS_ACL
        parts.append(len(members).to_bytes(2, "little"))
        parts.extend(members)
    parts[0] = bytes((flags,))
    parts.append(codec.compress(body) if compress else body)
    return b"".join(parts)


def _body_start(entry: bytes) -> int:
    if entry[0] & _HAS_ACL:
        return _HEADER + 2 + 4 * int.from_bytes(entry[_HEADER : _HEADER + 2], "little")
    return _HEADER


def _release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc only), after the pages of
    rows read while warming, which are garbage now."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


class _Missing:
    """Cache marker for an id with no live image (never seen, or deleted)."""


MISSING = _Missing()


class ImageStore(Subscriber):
    """Fetch images by UUID through the cache; one query per miss, shared by concurrent misses."""

    def __init__(self, pool: asyncpg.Pool, *, query_timeout: float, cache_size: int):
        self._pool = pool
        self._gate = db.FairGate(pool.get_max_size())
        self._query_timeout = query_timeout
        self.max_size = cache_size
        self._names = _Names()
        self._codec = Codec(_SAMPLE_DICTIONARY[-_DICTIONARY_SIZE:])
        # The dictionary may change only while no compressed entry exists anywhere, not
        # even in a request that has yet to decompress it.
        self._dictionary_fixed = False
        # One table per rendering, and per rendering the order in which keys went in
        # (oldest first), for eviction. A key dropped by a notification stays in the
        # order until it comes up; `_evict` skips it then.
        self._entries: list[dict[bytes, bytes]] = [{} for _ in Rendering]
        self._order: list[collections.deque[bytes]] = [collections.deque() for _ in Rendering]
        self._size = 0
        self._missing: dict[bytes, None] = {}
        self._missing_max = min(cache_size, max(1024, cache_size // 4)) if cache_size else 0
        self._loading: dict[bytes, asyncio.Future] = {}
        self._enabled = False
        # Bumped by every flush; a load that started before a flush must not fill the cache.
        self._generation = 0
        # Keys changed while the cache fills itself: the page being read may hold their
        # old rows.
        self._changed_while_warming: set[bytes] | None = None
        self._warm_task: asyncio.Task | None = None
        self._first_warm_done = False
        self.hits = 0
        self.misses = 0

    # Subscriber interface, driven by the change listener.

    def on_change(self, ids: list[str]) -> None:
        for uuid in ids:
            try:
                key = image_key(uuid)
            except ValueError:
                continue
            for entries in self._entries:
                if entries.pop(key, None) is not None:
                    self._size -= 1
            self._missing.pop(key, None)
            # A load in flight may have read the old row; keep its result out of the cache.
            self._loading.pop(key, None)
            if self._changed_while_warming is not None:
                self._changed_while_warming.add(key)

    def on_flush(self) -> None:
        self._generation += 1
        for entries, order in zip(self._entries, self._order):
            entries.clear()
            order.clear()
        self._size = 0
        self._missing.clear()
        self._loading.clear()

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = enabled and self.max_size > 0
        if self._warm_task is not None:
            self._warm_task.cancel()
            self._warm_task = None
        if self._enabled:
            self._warm_task = asyncio.get_running_loop().create_task(self.warm(), name="cache-warm")

    @property
    def warming_up(self) -> bool:
        """True while the cache fills itself for the first time since the process
        started; readiness waits for it. Later fills, after a flush, do not count."""
        return not self._first_warm_done and self._warm_task is not None and not self._warm_task.done()

    @property
    def cached_images(self) -> int:
        return self._size + len(self._missing)

    def holds(self, uuid: str) -> bool:
        """Return True when the cache contains an entry for the image `uuid`."""
        key = image_key(uuid)
        return any(key in entries for entries in self._entries)

    def holds_missing(self, uuid: str) -> bool:
        """Return True when the cache contains `uuid` as an id without a live image."""
        return image_key(uuid) in self._missing

    def answer(self, entry: bytes) -> tuple[bytes, str]:
        """Return the JSON body of `entry` and its base64 MD5 (the Content-MD5 header)."""
        if entry[0] & _COMPRESSED:
            body = self._codec.decompress(memoryview(entry)[_body_start(entry) :])
        else:
            body = entry[_body_start(entry) :]
        return body, base64.b64encode(entry[1:17]).decode("ascii")

    def visible_to(self, entry: bytes, account_uuid: str | None) -> bool:
        """Apply CloudAPI's visibility rules to `entry` for the account `account_uuid`.

        None stands for "no account": every image that is not deleted is visible, which is
        what the API serves when authentication is switched off.
        """
        if account_uuid is None:
            return True
        number = self._names.find(account_uuid)
        if number is not None and entry[17:_HEADER] == number:
            return True
        flags = entry[0]
        if not flags & _ACTIVATED:
            return False
        if flags & _PUBLIC:
            return True
        if number is None or not flags & _HAS_ACL:
            return False
        end = _body_start(entry)
        return any(entry[start : start + 4] == number for start in range(_HEADER + 2, end, 4))

    async def get(self, uuid: str, rendering: Rendering) -> bytes | None:
        """Return the entry of the live image `uuid` for `rendering`, or None when it
        does not exist or was deleted. `answer()` and `visible_to()` read the entry."""
        if not self._enabled:
            self.misses += 1
            return await self._fetch(uuid, rendering, compress=False)
        key = image_key(uuid)
        found = self._entries[rendering].get(key)
        if found is not None:
            self.hits += 1
            return found
        if key in self._missing:
            self.hits += 1
            return None
        pending = self._loading.get(key)
        if pending is not None:
            # Another request is loading this id: share its query. (Counted as neither
            # a hit nor a miss.)
            loaded = await asyncio.shield(pending)
            if loaded is None:
                return None
            if loaded[rendering] is not None:
                return loaded[rendering]
        self.misses += 1
        return await self._load(key, uuid, rendering)

    async def _load(self, key: bytes, uuid: str, rendering: Rendering) -> bytes | None:
        # The future carries, per rendering, the entry this load made (or None for a
        # missing id), so that concurrent requests for the same id share one query.
        future = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        generation = self._generation
        try:
            entry = await self._fetch(uuid, rendering, compress=True)
        except BaseException as exc:
            if self._loading.get(key) is future:
                del self._loading[key]
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else DatabaseUnavailable("cancelled"))
                # Mark the exception retrieved: waiters may all have gone away.
                future.exception()
            raise
        if self._loading.get(key) is future:
            del self._loading[key]
            if self._enabled and generation == self._generation:
                if entry is None:
                    self._remember_missing(key)
                else:
                    self._put(rendering, key, entry)
        if entry is None:
            future.set_result(None)
        else:
            by_rendering: list[bytes | None] = [None] * len(Rendering)
            by_rendering[rendering] = entry
            future.set_result(by_rendering)
        return entry

    def _put(self, rendering: Rendering, key: bytes, entry: bytes) -> None:
        entries = self._entries[rendering]
        order = self._order[rendering]
        if key not in entries:
            self._size += 1
            order.append(key)
        entries[key] = entry
        while self._size > self.max_size and self._evict(rendering):
            pass
        if len(order) > 2 * len(entries) + WARM_PAGE:
            # Keys dropped by notifications pile up in the order; keep only live ones.
            self._order[rendering] = collections.deque(entries)

    def _evict(self, rendering: Rendering) -> bool:
        # The oldest entry of this rendering, or of the largest table if this one is empty.
        if not self._entries[rendering]:
            rendering = max(range(len(self._entries)), key=lambda index: len(self._entries[index]))
        entries, order = self._entries[rendering], self._order[rendering]
        while order:
            if entries.pop(order.popleft(), None) is not None:
                self._size -= 1
                return True
        return False

    def _remember_missing(self, key: bytes) -> None:
        missing = self._missing
        missing[key] = None
        if len(missing) > self._missing_max:
            # Dicts keep insertion order: the first key is the oldest.
            del missing[next(iter(missing))]

    async def _fetch(self, uuid: str, rendering: Rendering, *, compress: bool) -> bytes | None:
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
        if compress:
            self._dictionary_fixed = True
        return pack(row, rendering, self._names, self._codec if compress else None)

    async def warm(self, rendering: Rendering = Rendering.V8) -> None:
        """Fill the cache with live images for `rendering` (what current clients ask
        for), a page at a time in UUID order, until it is full."""
        generation = self._generation
        changed = self._changed_while_warming = set()
        after = _NO_UUID
        loaded = 0
        try:
            while self._enabled and generation == self._generation and self._size < self.max_size:
                limit = min(WARM_PAGE, self.max_size - self._size)
                try:
                    async with asyncio.timeout(self._query_timeout * 10):
                        async with self._gate, self._pool.acquire() as connection:
                            rows = await connection.fetch(_QUERIES["warm_images"], after, limit)
                except Exception as exc:
                    log.warning("cache_warm_failed", error=repr(exc), loaded=loaded)
                    return
                if generation != self._generation:
                    return
                entries = self._entries[rendering]
                bodies = [render(orjson.loads(row["manifest"]), rendering) for row in rows]
                if not self._dictionary_fixed and len(bodies) >= 16:
                    self._learn_dictionary(bodies)
                for row, body in zip(rows, bodies):
                    key = image_key(row["uuid"])
                    if key in entries or key in changed or key in self._loading:
                        continue
                    self._put(rendering, key, pack_body(row, body, self._names, self._codec))
                    self._dictionary_fixed = True
                    loaded += 1
                if len(rows) < limit:
                    break
                after = rows[-1]["uuid"]
                # Let requests through between pages.
                await asyncio.sleep(0)
            log.info("cache_warmed", images=loaded, cached=self._size)
            _release_free_memory()
        finally:
            if self._changed_while_warming is changed:
                self._changed_while_warming = None
            self._first_warm_done = True

    def _learn_dictionary(self, bodies: list[bytes]) -> None:
        """Make the compression dictionary out of responses of this read model: they share
        more with each other (owners, descriptions, home pages) than with the sample."""
        step = max(1, len(bodies) // 64)
        self._codec = Codec(b"".join(bodies[::step])[-_DICTIONARY_SIZE:])
        self._dictionary_fixed = True

    async def ping(self, timeout: float) -> None:
        """Run a trivial query; raise DatabaseUnavailable when Postgres does not answer."""
        try:
            async with asyncio.timeout(timeout):
                async with self._gate, self._pool.acquire() as connection:
                    await connection.fetchval(_QUERIES["ping_database"])
        except Exception as exc:
            raise DatabaseUnavailable(repr(exc)) from exc
