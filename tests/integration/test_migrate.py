"""`python -m service migrate`: applies each migration once, records it, creates a missing
database, and is safe when two processes run it at the same time."""

import asyncio
import os
import secrets
import sys

import asyncpg

from service.migrate import available_migrations
from tests.conftest import ADMIN_DSN, _dsn_for


async def _migrate_command(dsn: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "migrate",
        env={**os.environ, "DATABASE_URL": dsn, "LOG_LEVEL": "info"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, output.decode()


async def _drop_database(name: str) -> None:
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_two_concurrent_runs_on_a_missing_database():
    name = f"cloudapi_migrate_{secrets.token_hex(4)}"
    dsn = _dsn_for(name)
    try:
        results = await asyncio.gather(_migrate_command(dsn), _migrate_command(dsn))

        assert [status for status, _ in results] == [0, 0], results
        connection = await asyncpg.connect(dsn)
        try:
            versions = [row["version"] for row in await connection.fetch("SELECT version FROM schema_migrations ORDER BY version")]
            tables = {row["tablename"] for row in await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        finally:
            await connection.close()
        assert versions == [migration.version for migration in available_migrations()]
        assert {"images", "event_log", "accounts", "account_keys", "schema_migrations"} <= tables
        applied = sum(output.count('"migration_applied"') for _, output in results)
        assert applied == len(versions)

        status, output = await _migrate_command(dsn)
        assert status == 0
        assert '"migrations_current"' in output
    finally:
        await _drop_database(name)


async def test_accounts_command_without_migration():
    name = f"cloudapi_migrate_{secrets.token_hex(4)}"
    dsn = _dsn_for(name)
    try:
        status, _ = await _migrate_command(dsn)
        assert status == 0
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute("ALTER FUNCTION apply_events RENAME TO apply_events_later")
        finally:
            await connection.close()

        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "accounts", "add", "bob",
            env={**os.environ, "DATABASE_URL": dsn, "LOG_LEVEL": "warning"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
        message = stderr.decode()
        assert process.returncode == 1
        assert "run `python -m service migrate` first" in message
        assert "Traceback" not in message
    finally:
        await _drop_database(name)
