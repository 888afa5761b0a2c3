"""`python -m workers rebuild`: recompute the images read model from the event log and swap
it in atomically, while the API keeps answering and the workers keep applying events.

1. Hold the workers for a moment (an advisory lock every batch takes in shared mode), note
   the newest log position, take a snapshot, let them go on.
2. Fill `images_rebuild` from the log as of that snapshot: per image, the event with the
   newest revision (the one that was applied, on a tie).
3. In one transaction, hold the workers again, recompute the images that received events
   since step 1, compare with the live table (reported, not required to match), rename
   the tables and their indexes, and notify every API process to flush its cache.
4. Drop the old table.
"""

from __future__ import annotations

import re
import time

import asyncpg
import structlog

from service import db

log = structlog.get_logger("rebuild")

_QUERIES = db.load_queries("rebuild.sql")


async def _rename_indexes(connection: asyncpg.Connection) -> None:
    """Give the new table's indexes the names the old table's indexes had."""
    old = await connection.fetch(_QUERIES["index_names"], "images_old")
    new = await connection.fetch(_QUERIES["index_names"], "images")

    def shape(row) -> str:
        # "CREATE UNIQUE INDEX images_pkey ON public.images USING btree (uuid)" without the
        # index and table names, which is what pairs an index with its copy.
        return re.sub(r"INDEX \S+ ON \S+", "INDEX ON", row["indexdef"])

    old_by_shape = {shape(row): row["indexname"] for row in old}
    for row in new:
        original = old_by_shape.get(shape(row))
        if original is None or original == row["indexname"]:
            continue
        await connection.execute(f'ALTER INDEX "{original}" RENAME TO "{original}_old"')
        await connection.execute(f'ALTER INDEX "{row["indexname"]}" RENAME TO "{original}"')


async def rebuild(dsn: str, *, swap: bool = True, timeout: float = 10.0) -> dict[str, int]:
    """Rebuild the read model from `event_log`; return row and difference counts."""
    started = time.monotonic()
    connection = await asyncpg.connect(dsn, timeout=timeout, server_settings={"application_name": "cloudapi-images-rebuild"})
    try:
        await connection.execute(_QUERIES["drop_rebuild_table"])
        await connection.execute(_QUERIES["create_rebuild_table"])

        async with connection.transaction(isolation="repeatable_read"):
            await connection.execute(_QUERIES["hold_writers"])
            try:
                # The first query of the transaction takes its snapshot: with no batch in
                # flight, every event up to `position` is committed and in it.
                position = await connection.fetchval(_QUERIES["last_seq"])
            finally:
                await connection.execute(_QUERIES["release_writers"])
            filled = await connection.execute(_QUERIES["fill_rebuild_table"], position)
        log.info("rebuild_filled", rows=int(filled.split()[-1]), log_position=position)

        async with connection.transaction():
            await connection.execute(_QUERIES["hold_writers_in_transaction"])
            await connection.execute(_QUERIES["catch_up_remove"], position)
            caught_up = await connection.execute(_QUERIES["catch_up_insert"], position)
            differences = await connection.fetchval(_QUERIES["compare_tables"])
            rows = await connection.fetchval("SELECT count(*) FROM images_rebuild")
            if swap:
                await connection.execute("ALTER TABLE images RENAME TO images_old")
                await connection.execute("ALTER TABLE images_rebuild RENAME TO images")
                await _rename_indexes(connection)
                await connection.execute(_QUERIES["flush_caches"])
        if swap:
            await connection.execute("DROP TABLE images_old")
        else:
            await connection.execute(_QUERIES["drop_rebuild_table"])
    finally:
        await connection.close()
    result = {"rows": rows, "differences": differences, "caught_up": int(caught_up.split()[-1])}
    log.info(
        "rebuild_finished" if swap else "rebuild_checked",
        duration_s=round(time.monotonic() - started, 3),
        **result,
    )
    return result
