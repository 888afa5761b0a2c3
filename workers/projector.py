"""Apply a batch of decoded events to the read model in one transaction.

`apply_batch` decides, per event, applied / stale / duplicate, and never touches the
broker: settlement happens in the consumer, after the commit. Applying is keyed on the
per-image revision (a row changes only when the event is newer than it), and every event
is appended to `event_log` in the same transaction, keyed on its event id, so a
redelivery, a duplicate publish or a crash between commit and ack changes nothing the
second time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import orjson

from service import db
from workers.contract import AccountEvent, Event, ImageEvent
from workers.settlement import Outcome

_QUERIES = db.load_queries("write.sql")

@dataclass(frozen=True, slots=True)
class BatchResult:
    outcomes: list[Outcome]
    changed_images: list[str]


class AccountEventsUnsupported(Exception):
    """Account events need the accounts schema, which this build does not have."""


def _image_winners(events: Sequence[Event], first_seen: dict[str, int]) -> dict[str, int]:
    """Return, per image, the index of the newest event in the batch (first one on ties)."""
    winners: dict[str, int] = {}
    for index, event in enumerate(events):
        if not isinstance(event, ImageEvent) or first_seen[event.event_id] != index:
            continue
        best = winners.get(event.image_uuid)
        if best is None or event.revision > events[best].revision:
            winners[event.image_uuid] = index
    return winners


async def apply_batch(
    connection: asyncpg.Connection,
    events: Sequence[Event],
    *,
    apply_account_event: Callable[[asyncpg.Connection, AccountEvent], Awaitable[bool]] | None = None,
) -> BatchResult:
    """Apply `events` (in arrival order) in one transaction and return each one's outcome.

    A batch of image events is one statement, `apply_events` (migration 0003), in its
    own transaction: one round trip. A batch with account events runs in a transaction
    that takes the writers' lock, applies each account event with `apply_account_event`
    (which returns whether it changed anything), then calls the same statement.
    """
    first_seen: dict[str, int] = {}
    for index, event in enumerate(events):
        first_seen.setdefault(event.event_id, index)
    logged = [index for index, event in enumerate(events) if first_seen[event.event_id] == index]
    winners = _image_winners(events, first_seen)

    outcomes: list[Outcome] = [Outcome.STALE] * len(events)
    accounts = [index for index in logged if isinstance(events[index], AccountEvent)]
    if accounts:
        if apply_account_event is None:
            raise AccountEventsUnsupported(events[accounts[0]].type)
        async with connection.transaction():
            # apply_events takes the same shared lock again, which the transaction already holds.
            await connection.execute(_QUERIES["share_writers_lock"])
            for index in accounts:
                if await apply_account_event(connection, events[index]):
                    outcomes[index] = Outcome.APPLIED
            row = await _apply_events(connection, events, winners, logged, outcomes)
    else:
        row = await _apply_events(connection, events, winners, logged, outcomes)

    changed = [str(image_uuid) for image_uuid in row["changed"]]
    changed_set = set(changed)
    for image_uuid, index in winners.items():
        if image_uuid in changed_set:
            outcomes[index] = Outcome.APPLIED
    new_ids = {str(event_id) for event_id in row["recorded"]}
    for index, event in enumerate(events):
        if first_seen[event.event_id] != index or event.event_id not in new_ids:
            outcomes[index] = Outcome.DUPLICATE
    return BatchResult(outcomes=outcomes, changed_images=changed)


async def _apply_events(
    connection: asyncpg.Connection,
    events: Sequence[Event],
    winners: dict[str, int],
    logged: list[int],
    outcomes: list[Outcome],
) -> asyncpg.Record:
    rows = [events[index] for index in sorted(winners.values(), key=lambda i: events[i].image_uuid)]
    winner_set = set(winners.values())
    return await connection.fetchrow(
        _QUERIES["apply_events"],
        [event.image_uuid for event in rows],
        [event.revision for event in rows],
        [event.owner for event in rows],
        [event.public for event in rows],
        [event.state for event in rows],
        [event.acl_json for event in rows],
        [event.manifest_json for event in rows],
        [event.event_id for event in rows],
        [event.time for event in rows],
        [events[i].event_id for i in logged],
        [events[i].type for i in logged],
        [_subject(events[i]) for i in logged],
        [events[i].revision for i in logged],
        [events[i].time for i in logged],
        [_payload(events[i]) for i in logged],
        # The database decides the outcome of image events.
        [None if isinstance(events[i], ImageEvent) else outcomes[i].value for i in logged],
        [i in winner_set for i in logged],
    )


def _subject(event: Event) -> str:
    return event.image_uuid if isinstance(event, ImageEvent) else event.account_uuid


def _payload(event: Event) -> str | None:
    if isinstance(event, ImageEvent):
        return event.manifest_json
    if event.type == "account.upserted":
        return orjson.dumps({"login": event.login, "disabled": event.disabled}).decode()
    if event.type == "account.key.added":
        return orjson.dumps({"name": event.key_name, "public_key": event.public_key}).decode()
    return orjson.dumps({"name": event.key_name}).decode()
