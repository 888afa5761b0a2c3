"""What happens to a message, decided in one place.

The consumer computes an `Outcome` for every message and looks up its `Settlement` here;
neither the decoder nor the projector touches the broker.

| outcome              | settlement   | why                                                        |
|----------------------|--------------|------------------------------------------------------------|
| applied              | ack          | committed                                                  |
| stale                | ack          | an equal or newer revision is stored; nothing to do        |
| duplicate            | ack          | this event id is already in the log                        |
| invalid              | dead-letter  | breaks the contract; retrying cannot help                  |
| rejected_by_database | dead-letter  | Postgres refuses this one event (the rest of the batch is  |
|                      |              | applied without it)                                        |
| database_unavailable | hold         | says nothing about the message: stop consuming, retry the  |
|                      |              | database with backoff, settle after the commit             |
| shutting_down        | leave        | not settled; the broker redelivers it after the channel    |
|                      |              | closes                                                     |

Dead-lettering publishes a copy to the dead-letter exchange with the reason in headers,
waits for the broker's confirm, then acks the original: so the reason travels with the
message, and the message is never dropped when the dead-letter publish fails. A failed
publish returns the original to the queue (a nack with requeue), to be dead-lettered
again when it is redelivered.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    STALE = "stale"
    DUPLICATE = "duplicate"
    INVALID = "invalid"
    REJECTED_BY_DATABASE = "rejected_by_database"
    DATABASE_UNAVAILABLE = "database_unavailable"
    SHUTTING_DOWN = "shutting_down"


class Settlement(enum.Enum):
    ACK = "ack"
    DEAD_LETTER = "dead_letter"
    HOLD = "hold"
    LEAVE = "leave"


SETTLEMENTS: dict[Outcome, Settlement] = {
    Outcome.APPLIED: Settlement.ACK,
    Outcome.STALE: Settlement.ACK,
    Outcome.DUPLICATE: Settlement.ACK,
    Outcome.INVALID: Settlement.DEAD_LETTER,
    Outcome.REJECTED_BY_DATABASE: Settlement.DEAD_LETTER,
    Outcome.DATABASE_UNAVAILABLE: Settlement.HOLD,
    Outcome.SHUTTING_DOWN: Settlement.LEAVE,
}


def settlement_for(outcome: Outcome) -> Settlement:
    """Return what to do with a message whose processing ended in `outcome`."""
    return SETTLEMENTS[outcome]
