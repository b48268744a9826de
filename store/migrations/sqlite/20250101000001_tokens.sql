-- Tokens are stored by SHA-256 digest only: a dump of these tables holds no usable token.
-- Booleans are 0/1. Times are Unix seconds (the gateway's clock decides expiry, the same on every replica).

CREATE TABLE access_tokens (
    digest      BLOB    PRIMARY KEY,
    client_id   TEXT    NOT NULL,
    subject     TEXT,
    scope       TEXT    NOT NULL,
    metadata    TEXT    NOT NULL,          -- JSON object of name/value pairs
    issued_at   INTEGER  NOT NULL,
    expires_at  INTEGER  NOT NULL,
    family      BLOB    NOT NULL,          -- 16 bytes, shared by every token of one grant
    generation  INTEGER  NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX access_tokens_family ON access_tokens (family);
CREATE INDEX access_tokens_expires_at ON access_tokens (expires_at);

CREATE TABLE refresh_tokens (
    digest       BLOB    PRIMARY KEY,
    client_id    TEXT    NOT NULL,
    subject      TEXT,
    scope        TEXT    NOT NULL,
    metadata     TEXT    NOT NULL,
    issued_at    INTEGER  NOT NULL,
    expires_at   INTEGER  NOT NULL,
    family       BLOB    NOT NULL,
    generation   INTEGER  NOT NULL,
    consumed_at  INTEGER,                   -- set once, by the rotation that consumed the token
    revoked      INTEGER NOT NULL DEFAULT 0,
    replay       BLOB,                     -- sealed response for an idempotent retry
    replay_until INTEGER
) WITHOUT ROWID;
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);
CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at);

CREATE TABLE client_applications (
    client_id     TEXT    PRIMARY KEY,
    name          TEXT    NOT NULL,
    secret_digest BLOB    NOT NULL,        -- SHA-256 of the secret, never the secret
    enabled       INTEGER NOT NULL DEFAULT 1,
    scopes        TEXT    NOT NULL,        -- JSON array
    grant_types   TEXT    NOT NULL,        -- JSON array
    created_at    INTEGER  NOT NULL
);
