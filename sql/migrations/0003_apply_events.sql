-- The worker's batch in one statement: one round trip to Postgres instead of six
-- (BEGIN, lock, upsert, log, notify, COMMIT). On a busy machine each round trip waits for
-- a CPU twice, once in the worker and once in the backend, and those waits made most
-- of the time from publish to commit.
--
-- Steps, in the caller's transaction or in the statement's own:
-- 1. Take the writers' lock in shared mode (the rebuild command takes it exclusively).
-- 2. Write the newest event of each image where it is newer than the row. uuids ..
--    event_times hold one element per image, sorted by UUID, so that concurrent workers
--    lock rows in the same order.
-- 3. Append every event to the log in arrival order (log_*). log_outcomes holds the
--    outcome of each account event, which the caller applied before, and NULL for
--    image events, whose outcome is decided here.
-- 4. Notify the API processes of the changed images, at most 200 UUIDs per
--    notification (the payload limit is 8000 bytes).
-- Returns the changed images and the event ids that were not in the log before.
CREATE FUNCTION apply_events(
    uuids uuid[], revisions bigint[], owners text[], publics boolean[], states text[], acls text[],
    manifests text[], event_ids uuid[], event_times timestamptz[],
    log_ids uuid[], log_types text[], log_subjects uuid[], log_revisions bigint[], log_times timestamptz[],
    log_payloads text[], log_outcomes text[], log_winners boolean[],
    OUT changed uuid[], OUT recorded uuid[])
LANGUAGE plpgsql AS $$
DECLARE
    chunk text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1309106414);

    WITH applied AS (
        INSERT INTO images AS i (uuid, revision, deleted, owner, public, state, acl, manifest, event_id, event_time,
                                 applied_at)
        SELECT t.uuid, t.revision, t.manifest IS NULL, t.owner, t.public, t.state,
               CASE WHEN t.acl IS NULL THEN NULL ELSE ARRAY(SELECT json_array_elements_text(t.acl::json)) END,
               t.manifest::json, t.event_id, t.event_time, now()
        FROM unnest(uuids, revisions, owners, publics, states, acls, manifests, event_ids, event_times)
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
        RETURNING i.uuid
    )
    SELECT coalesce(array_agg(applied.uuid), '{}') INTO changed FROM applied;

    -- An image event is applied when it is its image's newest in the batch (a winner)
    -- and the row changed; every other image event is stale.
    WITH logged AS (
        INSERT INTO event_log (event_id, type, subject_uuid, revision, event_time, payload, outcome, recorded_at)
        SELECT t.event_id, t.type, t.subject_uuid, t.revision, t.event_time, t.payload::json,
               coalesce(t.outcome, CASE WHEN t.winner AND t.subject_uuid = ANY (changed) THEN 'applied' ELSE 'stale' END),
               now()
        FROM unnest(log_ids, log_types, log_subjects, log_revisions, log_times, log_payloads, log_outcomes, log_winners)
             WITH ORDINALITY AS t(event_id, type, subject_uuid, revision, event_time, payload, outcome, winner, position)
        ORDER BY t.position
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_log.event_id
    )
    SELECT coalesce(array_agg(logged.event_id), '{}') INTO recorded FROM logged;

    FOR chunk IN
        SELECT string_agg(c.uuid::text, ',') FROM unnest(changed) WITH ORDINALITY AS c(uuid, position)
        GROUP BY (c.position - 1) / 200
    LOOP
        PERFORM pg_notify('image_changed', chunk);
    END LOOP;
END
$$;
