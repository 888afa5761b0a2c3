-- Queries of the workers. Each starts with a "-- name:" line and a one-line purpose.

-- name: share_writers_lock
-- Take the lock the rebuild command holds exclusively to see a moment with no batch in flight.
SELECT pg_advisory_xact_lock_shared(1309106414);

-- name: upsert_images
-- Apply the newest event of each image in a batch, only where it is newer than the row; return the images changed.
INSERT INTO images AS i (uuid, revision, deleted, owner, public, state, acl, manifest, event_id, event_time, applied_at)
SELECT t.uuid, t.revision, t.manifest IS NULL, t.owner, t.public, t.state,
       CASE WHEN t.acl IS NULL THEN NULL ELSE ARRAY(SELECT json_array_elements_text(t.acl::json)) END,
       t.manifest::json, t.event_id, t.event_time, now()
FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::boolean[], $5::text[], $6::text[], $7::text[], $8::uuid[], $9::timestamptz[])
     AS t(uuid, revision, owner, public, state, acl, manifest, event_id, event_time)
ORDER BY t.uuid
ON CONFLICT (uuid) DO UPDATE
SET revision = EXCLUDED.revision,
    deleted = EXCLUDED.deleted,
    owner = EXCLUDED.owner,
    public = EXCLUDED.public,
    state = EXCLUDED.state,
    acl = EXCLUDED.acl,
    manifest = EXCLUDED.manifest,
    event_id = EXCLUDED.event_id,
    event_time = EXCLUDED.event_time,
    applied_at = EXCLUDED.applied_at
WHERE i.revision < EXCLUDED.revision
RETURNING i.uuid;

-- name: record_events
-- Append a batch of events to the log in arrival order; return the ids that were not there before.
INSERT INTO event_log (event_id, type, subject_uuid, revision, event_time, payload, outcome, recorded_at)
SELECT t.event_id, t.type, t.subject_uuid, t.revision, t.event_time, t.payload::json, t.outcome, now()
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::bigint[], $5::timestamptz[], $6::text[], $7::text[])
     WITH ORDINALITY AS t(event_id, type, subject_uuid, revision, event_time, payload, outcome, position)
ORDER BY t.position
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id;

-- name: find_recorded_events
-- Return which of the given event ids the log already holds.
SELECT event_id FROM event_log WHERE event_id = ANY($1::uuid[]);

-- name: notify_images_changed
-- Tell every API process which images changed; delivered when the transaction commits.
SELECT pg_notify('image_changed', $1);
