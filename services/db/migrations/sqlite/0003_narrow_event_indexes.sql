-- The time-ordered indexes no longer repeat the 32-byte event id: every SQLite index entry
-- already ends with the rowid (the serial), and a query breaks created_at ties by id with a
-- small sort of the equal-created_at rows only ("USE TEMP B-TREE FOR RIGHT PART OF ORDER BY").
-- The id made each entry about 33 bytes longer; under a saturating ingest every committed
-- batch writes each index page it touched to the WAL, so the wider entries cost about a third
-- of the writer's time (see docs/benchmarks.md).
DROP INDEX events_pubkey_created;
DROP INDEX events_kind_created;
DROP INDEX events_created;
DROP INDEX events_pubkey_kind_created;
CREATE INDEX events_pubkey_created ON events (pubkey, created_at DESC);
CREATE INDEX events_kind_created ON events (kind, created_at DESC);
CREATE INDEX events_created ON events (created_at DESC);
CREATE INDEX events_pubkey_kind_created ON events (pubkey, kind, created_at DESC);
