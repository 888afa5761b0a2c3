-- Queries on accounts and keys. Each starts with a "-- name:" line and a one-line purpose.

-- name: find_accounts
-- Fetch the accounts whose login is $1 (text) or whose UUID is $2 (NULL unless $1 is a UUID), with their live keys, one row per key.
SELECT a.uuid, a.login, a.disabled, k.name, k.public_key, k.md5_fingerprint, k.sha256_fingerprint
FROM accounts AS a
LEFT JOIN account_keys AS k ON k.account_uuid = a.uuid AND NOT k.removed
WHERE a.login = $1 OR a.uuid = $2::uuid
ORDER BY a.uuid, k.name;

-- name: upsert_account
-- Create or update an account when the revision is newer; return whether it changed.
INSERT INTO accounts AS a (uuid, login, disabled, revision, updated_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (uuid) DO UPDATE
SET login = EXCLUDED.login, disabled = EXCLUDED.disabled, revision = EXCLUDED.revision, updated_at = EXCLUDED.updated_at
WHERE a.revision < EXCLUDED.revision
RETURNING a.uuid;

-- name: upsert_key
-- Add, replace or remove (tombstone) a key when the revision is newer; return whether it changed.
INSERT INTO account_keys AS k (account_uuid, name, removed, public_key, key_type, md5_fingerprint, sha256_fingerprint, revision, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
ON CONFLICT (account_uuid, name) DO UPDATE
SET removed = EXCLUDED.removed,
    public_key = EXCLUDED.public_key,
    key_type = EXCLUDED.key_type,
    md5_fingerprint = EXCLUDED.md5_fingerprint,
    sha256_fingerprint = EXCLUDED.sha256_fingerprint,
    revision = EXCLUDED.revision,
    updated_at = EXCLUDED.updated_at
WHERE k.revision < EXCLUDED.revision
RETURNING k.account_uuid;

-- name: next_account_revision
-- Lock an account's revisions for this transaction and return the next one to use.
SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 7)),
       1 + GREATEST(
           COALESCE((SELECT revision FROM accounts WHERE uuid = $1::uuid), 0),
           COALESCE((SELECT max(revision) FROM account_keys WHERE account_uuid = $1::uuid), 0)
       ) AS revision;

-- name: account_by_login
-- Fetch one account by login or UUID (text), for the operator command.
SELECT uuid, login, disabled, revision FROM accounts WHERE login = $1 OR uuid::text = $1;

-- name: list_accounts
-- List accounts with their count of live keys, for the operator command.
SELECT a.uuid, a.login, a.disabled, count(k.name) FILTER (WHERE NOT k.removed) AS keys
FROM accounts AS a
LEFT JOIN account_keys AS k ON k.account_uuid = a.uuid
GROUP BY a.uuid, a.login, a.disabled
ORDER BY a.login;

-- name: list_keys
-- List the live keys of an account, for the operator command.
SELECT name, key_type, md5_fingerprint, sha256_fingerprint
FROM account_keys
WHERE account_uuid = $1 AND NOT removed
ORDER BY name;

-- name: notify_account_changed
-- Tell every API process that an account or its keys changed; delivered at commit.
SELECT pg_notify('account_changed', $1);
