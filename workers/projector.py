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

# Payload of one NOTIFY: at most this many UUIDs (37 bytes each with the comma), well
# under Postgres's 8000-byte payload limit.
_NOTIFY_CHUNK = 200


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

    `apply_account_event` applies one account event inside the same transaction and
    returns whether it changed anything.
    """
    first_seen: dict[str, int] = {}
    for index, event in enumerate(events):
        first_seen.setdefault(event.event_id, index)

    outcomes: list[Outcome] = [Outcome.STALE] * len(events)
    changed: list[str] = []
    async with connection.transaction():
        await connection.execute(_QUERIES["share_writers_lock"])
        winners = _image_winners(events, first_seen)
        if winners:
            rows = [events[index] for index in sorted(winners.values(), key=lambda i: events[i].image_uuid)]
            applied = await connection.fetch(
                _QUERIES["upsert_images"],
                [event.image_uuid for event in rows],
                [event.revision for event in rows],
                [event.owner for event in rows],
                [event.public for event in rows],
                [event.state for event in rows],
                [event.acl_json for event in rows],
                [event.manifest_json for event in rows],
                [event.event_id for event in rows],
                [event.time for event in rows],
            )
            changed = [str(row["uuid"]) for row in applied]
            changed_set = set(changed)
            for image_uuid, index in winners.items():
                if image_uuid in changed_set:
                    outcomes[index] = Outcome.APPLIED

        for index, event in enumerate(events):
            if isinstance(event, AccountEvent) and first_seen[event.event_id] == index:
                if apply_account_event is None:
                    raise AccountEventsUnsupported(event.type)
                if await apply_account_event(connection, event):
                    outcomes[index] = Outcome.APPLIED

        logged = [index for index, event in enumerate(events) if first_seen[event.event_id] == index]
        recorded = await connection.fetch(
            _QUERIES["record_events"],
            [events[i].event_id for i in logged],
            [events[i].type for i in logged],
            [_subject(events[i]) for i in logged],
            [events[i].revision for i in logged],
            [events[i].time for i in logged],
            [_payload(events[i]) for i in logged],
            [outcomes[i].value for i in logged],
        )
        new_ids = {str(row["event_id"]) for row in recorded}
        for index, event in enumerate(events):
            if first_seen[event.event_id] != index or event.event_id not in new_ids:
                outcomes[index] = Outcome.DUPLICATE

        for start in range(0, len(changed), _NOTIFY_CHUNK):
            await connection.execute(_QUERIES["notify_images_changed"], ",".join(changed[start : start + _NOTIFY_CHUNK]))
    return BatchResult(outcomes=outcomes, changed_images=changed)


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
