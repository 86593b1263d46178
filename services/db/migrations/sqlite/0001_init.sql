-- orly event store, SQLite schema.

-- Every stored event. `serial` is never reused (AUTOINCREMENT keeps the high-water mark in
-- sqlite_sequence even after deletes).
CREATE TABLE events (
    serial     INTEGER PRIMARY KEY AUTOINCREMENT,
    id         BLOB    NOT NULL UNIQUE,
    pubkey     BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    kind       INTEGER NOT NULL,
    -- replacement key: '' for replaceable kinds, the d tag for addressable ones, else NULL
    d          TEXT,
    -- NIP-40 expiration (unix seconds) or NULL
    expires_at INTEGER,
    json       TEXT    NOT NULL
);
CREATE INDEX events_pubkey_created ON events (pubkey, created_at DESC, id);
CREATE INDEX events_kind_created ON events (kind, created_at DESC, id);
CREATE INDEX events_created ON events (created_at DESC, id);
CREATE INDEX events_replace ON events (kind, pubkey, d) WHERE d IS NOT NULL;
CREATE INDEX events_expires ON events (expires_at) WHERE expires_at IS NOT NULL;

-- Single-letter tags (first value) for `#x` filters.
CREATE TABLE tags (
    name       TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    serial     INTEGER NOT NULL REFERENCES events (serial) ON DELETE CASCADE,
    PRIMARY KEY (name, value, created_at, serial)
) WITHOUT ROWID;
CREATE INDEX tags_serial ON tags (serial);

-- NIP-09 `e` deletions: `id` was deleted by `pubkey` (blocks the event if it is that author's).
CREATE TABLE deleted_ids (
    id     BLOB NOT NULL,
    pubkey BLOB NOT NULL,
    PRIMARY KEY (id, pubkey)
) WITHOUT ROWID;

-- NIP-09 `a` deletions: every version with created_at <= deleted_until is gone for good.
CREATE TABLE deleted_addrs (
    kind          INTEGER NOT NULL,
    pubkey        BLOB    NOT NULL,
    d             TEXT    NOT NULL,
    deleted_until INTEGER NOT NULL,
    PRIMARY KEY (kind, pubkey, d)
) WITHOUT ROWID;

CREATE TABLE markers (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);

CREATE TABLE leases (
    name          TEXT PRIMARY KEY NOT NULL,
    holder        TEXT    NOT NULL,
    expires_at_ms INTEGER NOT NULL
);

CREATE TABLE relay_identity (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    secret BLOB NOT NULL
);
