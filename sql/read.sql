-- Queries of the API. Each starts with a "-- name:" line and a one-line purpose.

-- name: get_image
-- Fetch the fields an answer and the visibility rules need; tombstones come back too.
SELECT revision, deleted, owner, public, state, acl, manifest::text AS manifest
FROM images
WHERE uuid = $1;

-- name: ping_database
-- Check that the database answers, for readiness.
SELECT 1;

-- name: warm_images
-- A page of live images to fill an API process's cache at start, in UUID order after $1.
SELECT uuid::text AS uuid, owner, public, state, acl, manifest::text AS manifest
FROM images
WHERE NOT deleted AND images.uuid > $1::uuid
-- images.uuid, not the text column of the same name above: that one has no index.
ORDER BY images.uuid
LIMIT $2;
