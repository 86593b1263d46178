-- Feeds of a set of authors for a set of kinds (follow feeds, profiles): one index walk per
-- (author, kind) in created_at order, stopping at the limit.
CREATE INDEX events_pubkey_kind_created ON events (pubkey, kind, created_at DESC, id);
