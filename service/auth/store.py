"""Accounts and their keys for signature verification, cached per API process.

The cache holds, per login or account UUID as a `keyId` names it, the account and its
parsed keys (or the fact that there is no such account). Any change to any account
flushes it whole, on the `account_changed` notification; account changes are rare and
a flush is always correct. While the change listener is down nothing is cached.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import asyncpg
import structlog

from service import db
from service.auth.keys import InvalidKey, PublicKey, parse_public_key
from service.errors import DatabaseUnavailable
from service.notify import Subscriber

log = structlog.get_logger("auth")

_QUERIES = db.load_queries("accounts.sql")
_MD5_LENGTH = 47  # "xx:" * 15 + "xx"
# Every stored login matches the `login` definition of the event schema (account UUIDs
# match it too), so a reference that does not cannot name an account. Checking it first
# keeps text Postgres cannot take (bytes that are not UTF-8) away from the query.
POSSIBLE_LOGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,255}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(slots=True)
class StoredKey:
    """A registered key as stored, parsed on its first use.

    Parsing every key of an account on its first lookup would cost about 0.2 ms for the
    five key types of the tests. A request naming a known login with a key it does not
    have would then be slower than one naming an unknown login, which would tell which
    logins exist.
    """

    account_uuid: str
    name: str
    text: str
    parsed: PublicKey | None = None
    unreadable: bool = False

    def public_key(self) -> PublicKey | None:
        """Return the parsed key, or None when the stored text cannot be parsed."""
        if self.parsed is None and not self.unreadable:
            try:
                self.parsed = parse_public_key(self.text)
            except InvalidKey as exc:
                self.unreadable = True
                log.error("stored_key_unreadable", account_uuid=self.account_uuid, key_name=self.name, error=str(exc))
        return self.parsed


@dataclass(slots=True)
class Account:
    """An account with its live keys, indexed by every form a keyId may use."""

    uuid: str
    login: str
    disabled: bool
    by_name: dict[str, StoredKey] = field(default_factory=dict)
    by_md5: dict[str, StoredKey] = field(default_factory=dict)
    by_sha256: dict[str, StoredKey] = field(default_factory=dict)

    def add_key(self, key: StoredKey, md5_fingerprint: str, sha256_fingerprint: str) -> None:
        self.by_name[key.name] = key
        self.by_md5[md5_fingerprint] = key
        self.by_sha256[sha256_fingerprint] = key

    def find_key(self, reference: str) -> PublicKey | None:
        """Find a key by name, MD5 fingerprint (with or without `MD5:`) or `SHA256:` fingerprint."""
        key = self.by_name.get(reference)
        if key is None:
            if reference.startswith("SHA256:"):
                key = self.by_sha256.get(reference.rstrip("="))
            else:
                md5 = reference.removeprefix("MD5:").lower()
                if len(md5) == _MD5_LENGTH:
                    key = self.by_md5.get(md5)
        return key.public_key() if key is not None else None


class _Unknown:
    """Cache marker: no account (or more than one) has this login or UUID."""


UNKNOWN = _Unknown()


class KeyStore(Subscriber):
    """Look up accounts by the login or UUID of a keyId."""

    def __init__(self, pool: asyncpg.Pool, *, query_timeout: float, max_entries: int = 10000):
        self._pool = pool
        self._query_timeout = query_timeout
        self._max_entries = max_entries
        self._entries: dict[str, Account | _Unknown] = {}
        self._enabled = False
        self._generation = 0

    def on_change(self, ids: list[str]) -> None:
        self.on_flush()

    def on_flush(self) -> None:
        self._generation += 1
        self._entries.clear()

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = enabled

    def cached(self, reference: str) -> Account | _Unknown | None:
        """Return the cached entry for `reference`: the account or UNKNOWN. Return None
        when the cache has no entry (or is off), so `find()` must query Postgres."""
        if not self._enabled:
            return None
        return self._entries.get(reference)

    async def find(self, reference: str) -> Account | None:
        """Return the one account whose login or UUID is `reference`, or None."""
        if not POSSIBLE_LOGIN.fullmatch(reference):
            return None
        if self._enabled:
            cached = self._entries.get(reference)
            if cached is not None:
                return None if cached is UNKNOWN else cached
        generation = self._generation
        account = await self._load(reference)
        if self._enabled and generation == self._generation:
            if len(self._entries) >= self._max_entries:
                # Unknown references can be sent at will; a bounded cache stays bounded.
                self._entries.clear()
            self._entries[reference] = UNKNOWN if account is None else account
        return account

    async def _load(self, reference: str) -> Account | None:
        try:
            async with asyncio.timeout(self._query_timeout):
                async with self._pool.acquire() as connection:
                    # Both sides of the condition can use an index: comparing uuid::text
                    # with the reference would read every account on every lookup.
                    account_uuid = reference if _UUID.fullmatch(reference) else None
                    rows = await connection.fetch(_QUERIES["find_accounts"], reference, account_uuid)
        except Exception as exc:
            if db.is_transient(exc):
                raise DatabaseUnavailable(repr(exc)) from exc
            raise
        accounts: dict[str, Account] = {}
        for row in rows:
            uuid = str(row["uuid"])
            account = accounts.get(uuid)
            if account is None:
                account = accounts[uuid] = Account(uuid=uuid, login=row["login"], disabled=row["disabled"])
            if row["name"] is not None:
                key = StoredKey(account_uuid=uuid, name=row["name"], text=row["public_key"])
                account.add_key(key, row["md5_fingerprint"], row["sha256_fingerprint"])
        if len(accounts) > 1:
            log.warning("login_ambiguous", reference=reference, accounts=sorted(accounts))
            return None
        return next(iter(accounts.values()), None)
