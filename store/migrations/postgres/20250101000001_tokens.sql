-- Tokens are stored by SHA-256 digest only: a dump of these tables holds no usable token.
-- Times are Unix seconds (the gateway's clock decides expiry, the same on every replica).

CREATE TABLE access_tokens (
    digest      BYTEA   PRIMARY KEY,
    client_id   TEXT    NOT NULL,
    subject     TEXT,
    scope       TEXT    NOT NULL,
    metadata    TEXT    NOT NULL,          -- JSON object of name/value pairs
    issued_at   BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    family      BYTEA   NOT NULL,          -- 16 bytes, shared by every token of one grant
    generation  BIGINT  NOT NULL,
    revoked     BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX access_tokens_family ON access_tokens (family);
CREATE INDEX access_tokens_expires_at ON access_tokens (expires_at);

CREATE TABLE refresh_tokens (
    digest       BYTEA   PRIMARY KEY,
    client_id    TEXT    NOT NULL,
    subject      TEXT,
    scope        TEXT    NOT NULL,
    metadata     TEXT    NOT NULL,
    issued_at    BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL,
    family       BYTEA   NOT NULL,
    generation   BIGINT  NOT NULL,
    consumed_at  BIGINT,                   -- set once, by the rotation that consumed the token
    revoked      BOOLEAN NOT NULL DEFAULT FALSE,
    replay       BYTEA,                    -- sealed response for an idempotent retry
    replay_until BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);
CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at);

CREATE TABLE client_applications (
    client_id     TEXT    PRIMARY KEY,
    name          TEXT    NOT NULL,
    secret_digest BYTEA   NOT NULL,        -- SHA-256 of the secret, never the secret
    enabled       BOOLEAN NOT NULL DEFAULT TRUE,
    scopes        TEXT    NOT NULL,        -- JSON array
    grant_types   TEXT    NOT NULL,        -- JSON array
    created_at    BIGINT  NOT NULL
);
