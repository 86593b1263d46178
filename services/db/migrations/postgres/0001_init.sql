-- orly event store, PostgreSQL schema.

-- Every stored event. Serials come from an identity column (never reused); writers are
-- serialized with an advisory lock (see postgres.rs) so serial order equals commit order.
CREATE TABLE events (
    serial     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         BYTEA    NOT NULL UNIQUE,
    pubkey     BYTEA    NOT NULL,
    created_at BIGINT   NOT NULL,
    kind       INTEGER  NOT NULL,
    -- replacement key: '' for replaceable kinds, the d tag for addressable ones, else NULL
    d          TEXT,
    -- NIP-40 expiration (unix seconds) or NULL
    expires_at BIGINT,
    json       TEXT     NOT NULL
);
CREATE INDEX events_pubkey_created ON events (pubkey, created_at DESC, id);
CREATE INDEX events_kind_created ON events (kind, created_at DESC, id);
CREATE INDEX events_created ON events (created_at DESC, id);
CREATE INDEX events_replace ON events (kind, pubkey, d) WHERE d IS NOT NULL;
CREATE INDEX events_expires ON events (expires_at) WHERE expires_at IS NOT NULL;

-- Single-letter tags (first value) for `#x` filters.
CREATE TABLE tags (
    name       TEXT   NOT NULL,
    value      TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    serial     BIGINT NOT NULL REFERENCES events (serial) ON DELETE CASCADE,
    PRIMARY KEY (name, value, created_at, serial)
);
CREATE INDEX tags_serial ON tags (serial);

-- The highest committed serial (written under the writer lock, so readers never see a
-- serial whose transaction has not committed yet).
CREATE TABLE serial_state (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    latest BIGINT NOT NULL
);
INSERT INTO serial_state (id, latest) VALUES (1, 0);

-- NIP-09 `e` deletions: `id` was deleted by `pubkey` (blocks the event if it is that author's).
CREATE TABLE deleted_ids (
    id     BYTEA NOT NULL,
    pubkey BYTEA NOT NULL,
    PRIMARY KEY (id, pubkey)
);

-- NIP-09 `a` deletions: every version with created_at <= deleted_until is gone for good.
CREATE TABLE deleted_addrs (
    kind          INTEGER NOT NULL,
    pubkey        BYTEA   NOT NULL,
    d             TEXT    NOT NULL,
    deleted_until BIGINT  NOT NULL,
    PRIMARY KEY (kind, pubkey, d)
);

CREATE TABLE markers (
    key   TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE leases (
    name          TEXT PRIMARY KEY,
    holder        TEXT   NOT NULL,
    expires_at_ms BIGINT NOT NULL
);

CREATE TABLE relay_identity (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    secret BYTEA NOT NULL
);
