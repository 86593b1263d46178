-- Feeds of a set of authors for a set of kinds (follow feeds, profiles): one index walk per
-- (author, kind) in created_at order, stopping at the limit.
CREATE INDEX events_pubkey_kind_created ON events (pubkey, kind, created_at DESC, id);

-- Ephemeral events too large for a NOTIFY payload (8000 bytes) wait here for the listeners
-- to read them; rows older than a minute are purged.
CREATE TABLE ephemeral_events (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    json       TEXT   NOT NULL,
    created_ms BIGINT NOT NULL
);
