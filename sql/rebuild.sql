-- Queries of the rebuild command. Each starts with a "-- name:" line and a one-line purpose.

-- name: hold_writers
-- Wait until no worker transaction is applying events, and keep new ones waiting (session lock).
SELECT pg_advisory_lock(1309106414);

-- name: release_writers
-- Let worker transactions apply events again.
SELECT pg_advisory_unlock(1309106414);

-- name: hold_writers_in_transaction
-- The same wait, held until the end of this transaction.
SELECT pg_advisory_xact_lock(1309106414);

-- name: last_seq
-- The newest log position; every event up to it is committed while writers are held.
SELECT coalesce(max(seq), 0) FROM event_log;

-- name: create_rebuild_table
-- An empty copy of the images table, with its constraints and indexes.
CREATE TABLE images_rebuild (LIKE images INCLUDING ALL);

-- name: drop_rebuild_table
-- Remove a rebuild table left by an interrupted run.
DROP TABLE IF EXISTS images_rebuild;

-- name: fill_rebuild_table
-- Recompute the row of every image from the log, up to position $1: its newest revision wins.
INSERT INTO images_rebuild (uuid, revision, deleted, owner, public, state, acl, manifest, event_id, event_time, applied_at)
SELECT DISTINCT ON (l.subject_uuid)
       l.subject_uuid, l.revision, l.payload IS NULL,
       l.payload->>'owner', (l.payload->>'public')::boolean, l.payload->>'state',
       CASE WHEN json_typeof(l.payload->'acl') = 'array'
            THEN ARRAY(SELECT json_array_elements_text(l.payload->'acl')) END,
       l.payload, l.event_id, l.event_time, l.recorded_at
FROM event_log AS l
WHERE l.type LIKE 'image.%' AND l.seq <= $1
ORDER BY l.subject_uuid, l.revision DESC, (l.outcome = 'applied') DESC, l.seq;

-- name: catch_up_remove
-- Drop the rebuilt rows of images that have events after position $1.
DELETE FROM images_rebuild
WHERE uuid IN (SELECT subject_uuid FROM event_log WHERE type LIKE 'image.%' AND seq > $1);

-- name: catch_up_insert
-- Recompute, from the whole log, the images that have events after position $1.
WITH changed AS (
    SELECT DISTINCT subject_uuid FROM event_log WHERE type LIKE 'image.%' AND seq > $1
)
INSERT INTO images_rebuild (uuid, revision, deleted, owner, public, state, acl, manifest, event_id, event_time, applied_at)
SELECT DISTINCT ON (l.subject_uuid)
       l.subject_uuid, l.revision, l.payload IS NULL,
       l.payload->>'owner', (l.payload->>'public')::boolean, l.payload->>'state',
       CASE WHEN json_typeof(l.payload->'acl') = 'array'
            THEN ARRAY(SELECT json_array_elements_text(l.payload->'acl')) END,
       l.payload, l.event_id, l.event_time, l.recorded_at
FROM event_log AS l
WHERE l.type LIKE 'image.%' AND l.subject_uuid IN (SELECT subject_uuid FROM changed)
ORDER BY l.subject_uuid, l.revision DESC, (l.outcome = 'applied') DESC, l.seq;

-- name: compare_tables
-- Count rows that differ between the live table and the rebuilt one, in either direction.
SELECT count(*) FROM (
    (SELECT uuid, revision, deleted, owner, public, state, acl, manifest::text, event_id, event_time, applied_at FROM images
     EXCEPT ALL
     SELECT uuid, revision, deleted, owner, public, state, acl, manifest::text, event_id, event_time, applied_at FROM images_rebuild)
    UNION ALL
    (SELECT uuid, revision, deleted, owner, public, state, acl, manifest::text, event_id, event_time, applied_at FROM images_rebuild
     EXCEPT ALL
     SELECT uuid, revision, deleted, owner, public, state, acl, manifest::text, event_id, event_time, applied_at FROM images)
) AS differences;

-- name: index_names
-- The indexes of a table, with the definition that pairs an original with its copy.
SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1;

-- name: flush_caches
-- Tell every API process to drop its whole image cache.
SELECT pg_notify('image_changed', '*');
