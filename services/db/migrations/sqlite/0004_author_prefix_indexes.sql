-- The author indexes hold the first 8 bytes of the pubkey instead of all 32: each entry is
-- about 20 bytes instead of 48. Under a saturating ingest every committed batch writes each
-- index page it touched to the WAL, and these two indexes were the widest of the random ones
-- (SQLite alone, 100,000 events in batches of 1,200: 17.1 KiB written per event instead of
-- 20.5, bench/scripts/sqlite-schema-cost.py). A walk goes down the prefix and compares the
-- whole pubkey on each row (query.rs), so a shared prefix costs rows read, never a wrong answer.
DROP INDEX events_pubkey_created;
DROP INDEX events_pubkey_kind_created;
CREATE INDEX events_author_created ON events (substr(pubkey, 1, 8), created_at DESC);
CREATE INDEX events_author_kind_created ON events (substr(pubkey, 1, 8), kind, created_at DESC);
