-- The images read model and the log of every event it was built from.

-- One row per image UUID ever seen. A deleted image stays as a tombstone (deleted = true,
-- manifest NULL) with its revision, so that an older event arriving late cannot bring it back.
CREATE TABLE images (
    uuid        uuid        PRIMARY KEY,
    revision    bigint      NOT NULL,
    deleted     boolean     NOT NULL,
    -- Visibility fields, copied out of the manifest. owner is text, not uuid: real
    -- manifests carry owners that are not UUIDs, and they are served as they are.
    owner       text,
    public      boolean,
    state       text,
    acl         text[],
    -- The complete IMGAPI manifest as received. json, not jsonb, keeps key order and
    -- duplicate-free text exactly as published, which the byte-exact answers depend on.
    manifest    json,
    event_id    uuid        NOT NULL,
    event_time  timestamptz NOT NULL,
    applied_at  timestamptz NOT NULL,
    CONSTRAINT images_tombstone_has_no_manifest CHECK (deleted = (manifest IS NULL))
);

-- Append-only log of every valid event received (image and account events), in arrival
-- order. The unique event_id makes a redelivered or twice-published event a no-op; the
-- rebuild command recomputes the images read model from the image events in it.
CREATE TABLE event_log (
    seq          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL,
    type         text        NOT NULL,
    -- The image UUID of an image event, the account UUID of an account event.
    subject_uuid uuid        NOT NULL,
    revision     bigint      NOT NULL,
    event_time   timestamptz NOT NULL,
    -- The manifest of an image event (NULL for image.deleted), the account or key
    -- object of an account event.
    payload      json,
    outcome      text        NOT NULL,
    recorded_at  timestamptz NOT NULL,
    CONSTRAINT event_log_event_id_key UNIQUE (event_id),
    CONSTRAINT event_log_outcome_check CHECK (outcome IN ('applied', 'stale'))
);

CREATE INDEX event_log_subject_revision ON event_log (subject_uuid, revision DESC, seq);
