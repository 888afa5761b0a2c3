-- Queries of the workers. Each starts with a "-- name:" line and a one-line purpose.

-- name: share_writers_lock
-- Take the lock the rebuild command holds exclusively to see a moment with no batch in flight.
SELECT pg_advisory_xact_lock_shared(1309106414);

-- name: apply_events
-- Apply a batch in one statement: lock, newest image rows, event log, notifications (migration 0003).
SELECT changed, recorded
FROM apply_events($1::uuid[], $2::bigint[], $3::text[], $4::boolean[], $5::text[], $6::text[], $7::text[], $8::uuid[],
                  $9::timestamptz[], $10::uuid[], $11::text[], $12::uuid[], $13::bigint[], $14::timestamptz[],
                  $15::text[], $16::text[], $17::boolean[]);

-- name: find_recorded_events
-- Return which of the given event ids the log already holds.
SELECT event_id FROM event_log WHERE event_id = ANY($1::uuid[]);
