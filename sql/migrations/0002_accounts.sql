-- Accounts and their public SSH keys, for HTTP Signature authentication.

-- One row per account. login is not unique: accounts arrive as events, and while one
-- account's rename is still in flight another may already carry its old login. An
-- ambiguous login authenticates nobody until the events settle.
CREATE TABLE accounts (
    uuid        uuid        PRIMARY KEY,
    login       text        NOT NULL,
    disabled    boolean     NOT NULL,
    revision    bigint      NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE INDEX accounts_login ON accounts (login);

-- One row per key name of an account. A removed key stays as a tombstone (removed =
-- true, key fields NULL) with the revision of its removal, so a late key-added event
-- cannot bring it back. No foreign key: a key event may arrive before its account.
CREATE TABLE account_keys (
    account_uuid        uuid        NOT NULL,
    name                text        NOT NULL,
    removed             boolean     NOT NULL,
    public_key          text,
    key_type            text,
    md5_fingerprint     text,
    sha256_fingerprint  text,
    revision            bigint      NOT NULL,
    updated_at          timestamptz NOT NULL,
    PRIMARY KEY (account_uuid, name),
    CONSTRAINT account_keys_tombstone_has_no_key CHECK (removed = (public_key IS NULL))
);
