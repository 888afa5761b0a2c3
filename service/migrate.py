"""Apply the numbered migrations of `sql/migrations/` once each, in order.

Two processes may run this at the same time (two release jobs, or a job and a developer):
a session advisory lock makes the second wait, and it then finds nothing left to apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

log = structlog.get_logger("migrate")

# Arbitrary constant that identifies this service's migration lock among advisory locks.
MIGRATION_LOCK_KEY = 0x1_3A6E_5EED

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """Return the migrations shipped in `sql/migrations`, ordered by version."""
    found = []
    for entry in resources.files("sql").joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if not match:
            continue
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version number: {versions}")
    return found


async def _connect_creating_database(dsn: str, timeout: float) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, timeout=timeout)
    except asyncpg.InvalidCatalogNameError:
        pass
    # The database does not exist yet: create it from the maintenance database, which
    # works for a local cluster or a role with CREATEDB, and fails clearly otherwise.
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin_dsn = urlunsplit(parts._replace(path="/postgres"))
    admin = await asyncpg.connect(admin_dsn, timeout=timeout)
    try:
        await admin.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
        log.info("database_created", database=name)
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Another process created it first. When both try at the same moment, Postgres
        # reports a unique violation on its catalog rather than "already exists".
        pass
    finally:
        await admin.close()
    return await asyncpg.connect(dsn, timeout=timeout)


async def migrate(dsn: str, *, timeout: float = 10.0) -> list[int]:
    """Apply pending migrations and return the versions applied by this call."""
    migrations = available_migrations()
    connection = await _connect_creating_database(dsn, timeout)
    applied_now: list[int] = []
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await connection.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version    integer     PRIMARY KEY,
                    name       text        NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            done = {row["version"] for row in await connection.fetch("SELECT version FROM schema_migrations")}
            for migration in migrations:
                if migration.version in done:
                    continue
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                applied_now.append(migration.version)
                log.info("migration_applied", version=migration.version, name=migration.name)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await connection.close()
    if not applied_now:
        log.info("migrations_current", version=migrations[-1].version if migrations else 0)
    return applied_now
