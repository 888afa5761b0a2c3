"""Accounts and keys: the one write path, used by the worker (account events) and by the
operator command (`python -m service accounts ...`).

Every change is an account event with a per-account revision. An account row or a key
row changes only when the event's revision is newer than the row's, and a removed key
stays as a tombstone, so events arriving late or twice change nothing. Each change
sends `NOTIFY account_changed` in its transaction, and every API process drops its key
cache when it arrives.
"""

from __future__ import annotations

import uuid as uuid_module

import asyncpg
import orjson

from service import db
from service.auth.keys import InvalidKey, PublicKey, parse_public_key

_QUERIES = db.load_queries("accounts.sql")


class AccountError(Exception):
    """An operator command cannot be carried out (unknown login, bad key, ...)."""


async def apply_account_event(connection: asyncpg.Connection, event) -> bool:
    """Apply one account event inside the caller's transaction; return whether it changed anything.

    A key-added event whose key cannot be parsed raises InvalidKey; the worker rejects
    such events before they get here.
    """
    if event.type == "account.upserted":
        changed = await connection.fetchval(
            _QUERIES["upsert_account"], event.account_uuid, event.login, bool(event.disabled), event.revision
        )
    elif event.type == "account.key.added":
        key = parse_public_key(event.public_key)
        changed = await connection.fetchval(
            _QUERIES["upsert_key"],
            event.account_uuid,
            event.key_name,
            False,
            key.openssh,
            key.key_type,
            key.md5_fingerprint,
            key.sha256_fingerprint,
            event.revision,
        )
    elif event.type == "account.key.removed":
        changed = await connection.fetchval(
            _QUERIES["upsert_key"], event.account_uuid, event.key_name, True, None, None, None, None, event.revision
        )
    else:
        raise ValueError(f"not an account event: {event.type}")
    if changed is not None:
        await connection.execute(_QUERIES["notify_account_changed"], str(event.account_uuid))
        return True
    return False


# Operator commands. Each builds an event with the account's next revision and applies it
# through the same projector the worker uses, so it is logged and deduplicated alike.


async def _apply(connection: asyncpg.Connection, event_type: str, account_uuid: str, **fields) -> None:
    """Build the account event with the next revision, check it against the contract
    exactly as the worker does, and apply it through the worker's projector."""
    from workers.contract import InvalidEvent, decode
    from workers.producer import account_event
    from workers.projector import apply_batch

    revision = await _next_revision(connection, account_uuid)
    body = orjson.dumps(account_event(event_type, account_uuid, revision=revision, **fields))
    try:
        event = decode(body)
    except InvalidEvent as exc:
        raise AccountError(exc.detail) from None
    await apply_batch(connection, [event], apply_account_event=apply_account_event)


async def _next_revision(connection: asyncpg.Connection, account_uuid: str) -> int:
    row = await connection.fetchrow(_QUERIES["next_account_revision"], account_uuid)
    return row["revision"]


async def find_account(connection: asyncpg.Connection, login: str) -> asyncpg.Record:
    rows = await connection.fetch(_QUERIES["account_by_login"], login)
    if not rows:
        raise AccountError(f"no account with login or UUID {login!r}")
    if len(rows) > 1:
        raise AccountError(f"login {login!r} names {len(rows)} accounts; use the account UUID")
    return rows[0]


async def add_account(connection: asyncpg.Connection, login: str, account_uuid: str | None = None) -> str:
    """Create (or rename) the account `account_uuid` with `login`; return its UUID."""
    if login == "my":
        raise AccountError("the login 'my' is reserved: in CloudAPI paths it means the caller")
    async with connection.transaction():
        existing = await connection.fetch(_QUERIES["account_by_login"], login)
        if existing and (account_uuid is None or str(existing[0]["uuid"]) != account_uuid):
            raise AccountError(f"login {login!r} is already taken by account {existing[0]['uuid']}")
        account_uuid = account_uuid or str(uuid_module.uuid4())
        await _apply(connection, "account.upserted", account_uuid, login=login, disabled=False)
    return account_uuid


async def set_disabled(connection: asyncpg.Connection, login: str, disabled: bool) -> str:
    async with connection.transaction():
        account = await find_account(connection, login)
        account_uuid = str(account["uuid"])
        await _apply(connection, "account.upserted", account_uuid, login=account["login"], disabled=disabled)
    return account_uuid


async def add_key(connection: asyncpg.Connection, login: str, key_text: str, name: str | None = None) -> PublicKey:
    """Register an OpenSSH public key for `login`; the name defaults to its MD5 fingerprint."""
    try:
        key = parse_public_key(key_text)
    except InvalidKey as exc:
        raise AccountError(str(exc)) from None
    name = name or key.md5_fingerprint
    if "/" in name or not name.strip() or any(c.isspace() for c in name):
        raise AccountError(f"invalid key name {name!r}: no spaces or slashes")
    async with connection.transaction():
        account = await find_account(connection, login)
        account_uuid = str(account["uuid"])
        for row in await connection.fetch(_QUERIES["list_keys"], account_uuid):
            if row["md5_fingerprint"] == key.md5_fingerprint and row["name"] != name:
                raise AccountError(f"this key is already registered for {login} as {row['name']!r}")
        await _apply(connection, "account.key.added", account_uuid, key_name=name, public_key=key.openssh)
    return key


async def remove_key(connection: asyncpg.Connection, login: str, name_or_fingerprint: str) -> str:
    """Remove a key by name or fingerprint (MD5 or SHA256); return its name."""
    async with connection.transaction():
        account = await find_account(connection, login)
        account_uuid = str(account["uuid"])
        wanted = name_or_fingerprint.removeprefix("MD5:").lower()
        for row in await connection.fetch(_QUERIES["list_keys"], account_uuid):
            if name_or_fingerprint in (row["name"], row["sha256_fingerprint"]) or wanted == row["md5_fingerprint"]:
                await _apply(connection, "account.key.removed", account_uuid, key_name=row["name"])
                return row["name"]
    raise AccountError(f"{login} has no key named or fingerprinted {name_or_fingerprint!r}")


async def remove_account(connection: asyncpg.Connection, login: str) -> str:
    """Disable an account and remove all its keys (accounts stay, as tombstones do)."""
    async with connection.transaction():
        account = await find_account(connection, login)
        account_uuid = str(account["uuid"])
        for row in await connection.fetch(_QUERIES["list_keys"], account_uuid):
            await _apply(connection, "account.key.removed", account_uuid, key_name=row["name"])
        await _apply(connection, "account.upserted", account_uuid, login=account["login"], disabled=True)
    return account_uuid


async def list_accounts(connection: asyncpg.Connection) -> list[asyncpg.Record]:
    return await connection.fetch(_QUERIES["list_accounts"])


async def list_keys(connection: asyncpg.Connection, login: str) -> list[asyncpg.Record]:
    account = await find_account(connection, login)
    return await connection.fetch(_QUERIES["list_keys"], str(account["uuid"]))

