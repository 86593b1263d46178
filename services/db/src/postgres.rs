//! The PostgreSQL backend (for Kubernetes and for several relay replicas sharing one store).
//!
//! Saves go through one writer task per process that commits everything waiting in one
//! transaction (group commit, as in the SQLite backend). Every save transaction first takes
//! `pg_advisory_xact_lock(WRITER_LOCK)`. Why: serials come from an identity sequence, and
//! sequence values are handed out when the row is inserted, not when the transaction commits.
//! Without the lock, writer A could take serial 10, writer B serial 11, B commit first, and a
//! reader paging by serial would see 11, move its cursor past 10, and never see 10 when A
//! commits. With every writer (of every replica) serialized by the lock, which is released only
//! after the commit is visible, serial order is commit order. The lock also makes the
//! check-then-insert rules (duplicates, replacement, deletions) race-free under READ COMMITTED.
//! `latest_serial` reads `serial_state`, written in the same transaction, so it never reports a
//! serial that is not committed yet.

use std::time::Duration;

use async_trait::async_trait;
use nostr::{Event, EventId, Filter, JsonUtil, Timestamp};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row};
use tokio::sync::mpsc;

use crate::rules::{self, BatchSaver, LimitMode, NormFilter, RawRow, SaveRequest};
use crate::{EventStore, LeaseState, Result, SaveOutcome, SerialEntry, StoreError};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Advisory lock key serializing event writers ("orly" in ASCII).
const WRITER_LOCK: i64 = 0x6f72_6c79;
/// The server's clock in Unix milliseconds (lease times are the database's).
const PG_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
/// The same at the start of the statement (constant within it).
const PG_STMT_MS: &str = "(extract(epoch from now()) * 1000)::bigint";

pub struct PostgresStore {
    pool: PgPool,
    writer: mpsc::Sender<SaveRequest>,
}

impl PostgresStore {
    /// Connects to `url` with a pool of `max_connections` and runs the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<PostgresStore> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        let writer = rules::spawn_writer(PgSaver { pool: pool.clone() });
        Ok(PostgresStore { pool, writer })
    }
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

struct PgSaver {
    pool: PgPool,
}

#[async_trait]
impl BatchSaver for PgSaver {
    async fn save_batch(&mut self, events: &[Event]) -> Result<Vec<SaveOutcome>> {
        let now = rules::now_secs();
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITER_LOCK)
            .execute(&mut *tx)
            .await?;
        let mut outcomes = Vec::with_capacity(events.len());
        let mut max_serial = None;
        for ev in events {
            let out = save_one(&mut tx, ev, now).await?;
            if let SaveOutcome::Stored { serial } = out {
                max_serial = Some(serial);
            }
            outcomes.push(out);
        }
        if let Some(s) = max_serial {
            sqlx::query("UPDATE serial_state SET latest = GREATEST(latest, $1) WHERE id = 1")
                .bind(rules::clamp_limit(s))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

/// Saves one event inside the writer's transaction (lock held). Every refusal is decided
/// before the first write.
async fn save_one(conn: &mut PgConnection, ev: &Event, now: i64) -> Result<SaveOutcome> {
    if let Some(out) = rules::precheck(ev, now) {
        return Ok(out);
    }
    let id = ev.id.as_bytes().as_slice();
    let pk = ev.pubkey.as_bytes().as_slice();
    let kind = i32::from(rules::event_kind(ev));
    let created = rules::ts_i64(ev.created_at.as_secs());
    let d = rules::replace_key(ev);

    let row = sqlx::query(
        "SELECT EXISTS(SELECT 1 FROM events WHERE id = $1), \
                EXISTS(SELECT 1 FROM deleted_ids WHERE id = $1 AND pubkey = $2), \
                EXISTS(SELECT 1 FROM deleted_addrs WHERE kind = $3 AND pubkey = $2 AND d = $4 \
                       AND deleted_until >= $5), \
                EXISTS(SELECT 1 FROM events WHERE kind = $3 AND pubkey = $2 AND d = $4 \
                       AND (created_at > $5 OR (created_at = $5 AND id < $1)))",
    )
    .bind(id)
    .bind(pk)
    .bind(kind)
    .bind(d)
    .bind(created)
    .fetch_one(&mut *conn)
    .await?;
    let (dup, del_id, del_addr, newer): (bool, bool, bool, bool) = (
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    );
    if dup {
        return Ok(SaveOutcome::Duplicate);
    }
    // NIP-09: deleting a deletion has no effect, so kind 5 is never blocked by `e` targets.
    if (del_id && kind != 5) || del_addr {
        return Ok(SaveOutcome::Rejected(rules::MSG_DELETED.into()));
    }
    if newer {
        return Ok(SaveOutcome::Rejected(rules::MSG_NEWER.into()));
    }

    let targets = if kind == 5 {
        let t = rules::deletion_targets(ev);
        if t.foreign_addr {
            return Ok(SaveOutcome::Rejected(rules::MSG_FOREIGN_DELETE.into()));
        }
        let ids: Vec<Vec<u8>> = t.ids.iter().map(|i| i.as_bytes().to_vec()).collect();
        if !ids.is_empty() {
            let foreign: bool = sqlx::query_scalar(
                "SELECT EXISTS(SELECT 1 FROM events WHERE id = ANY($1) AND pubkey <> $2)",
            )
            .bind(&ids)
            .bind(pk)
            .fetch_one(&mut *conn)
            .await?;
            if foreign {
                return Ok(SaveOutcome::Rejected(rules::MSG_FOREIGN_DELETE.into()));
            }
        }
        Some((t, ids))
    } else {
        None
    };

    if let Some(d) = d {
        sqlx::query("DELETE FROM events WHERE kind = $1 AND pubkey = $2 AND d = $3")
            .bind(kind)
            .bind(pk)
            .bind(d)
            .execute(&mut *conn)
            .await?;
    }
    let serial: i64 = sqlx::query_scalar(
        "INSERT INTO events (id, pubkey, created_at, kind, d, expires_at, json) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING serial",
    )
    .bind(id)
    .bind(pk)
    .bind(created)
    .bind(kind)
    .bind(d)
    .bind(rules::expiration(ev))
    .bind(ev.as_json())
    .fetch_one(&mut *conn)
    .await?;
    let tags = rules::index_tags(ev);
    if !tags.is_empty() {
        let (names, values): (Vec<String>, Vec<String>) = tags.into_iter().unzip();
        sqlx::query(
            "INSERT INTO tags (name, value, created_at, serial) \
             SELECT n, v, $3, $4 FROM unnest($1::text[], $2::text[]) AS t(n, v) \
             ON CONFLICT DO NOTHING",
        )
        .bind(names)
        .bind(values)
        .bind(created)
        .bind(serial)
        .execute(&mut *conn)
        .await?;
    }

    if let Some((t, ids)) = targets {
        if !ids.is_empty() {
            sqlx::query(
                "INSERT INTO deleted_ids (id, pubkey) SELECT unnest($1::bytea[]), $2 \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&ids)
            .bind(pk)
            .execute(&mut *conn)
            .await?;
            sqlx::query("DELETE FROM events WHERE id = ANY($1) AND pubkey = $2 AND kind <> 5")
                .bind(&ids)
                .bind(pk)
                .execute(&mut *conn)
                .await?;
        }
        for a in &t.addrs {
            sqlx::query(
                "INSERT INTO deleted_addrs (kind, pubkey, d, deleted_until) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (kind, pubkey, d) DO UPDATE \
                 SET deleted_until = GREATEST(deleted_addrs.deleted_until, EXCLUDED.deleted_until)",
            )
            .bind(i32::from(a.kind))
            .bind(pk)
            .bind(&a.d)
            .bind(created)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "DELETE FROM events WHERE kind = $1 AND pubkey = $2 AND d = $3 AND created_at <= $4",
            )
            .bind(i32::from(a.kind))
            .bind(pk)
            .bind(&a.d)
            .bind(created)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(SaveOutcome::Stored {
        serial: rules::u64_of(serial, "serial")?,
    })
}

// ---------------------------------------------------------------------------------------
// Query building
// ---------------------------------------------------------------------------------------

enum Arg {
    Int(i64),
    Text(String),
    Bytes(Vec<Vec<u8>>),
    Ints(Vec<i32>),
    Texts(Vec<String>),
}

struct Args(Vec<Arg>);

impl Args {
    /// Adds a bind and returns its placeholder.
    fn push(&mut self, a: Arg) -> String {
        self.0.push(a);
        format!("${}", self.0.len())
    }
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, Postgres, PgArguments>,
    args: Args,
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    for a in args.0 {
        q = match a {
            Arg::Int(v) => q.bind(v),
            Arg::Text(v) => q.bind(v),
            Arg::Bytes(v) => q.bind(v),
            Arg::Ints(v) => q.bind(v),
            Arg::Texts(v) => q.bind(v),
        };
    }
    q
}

fn where_clause(f: &NormFilter, now: i64, args: &mut Args) -> String {
    let mut w: Vec<String> = Vec::new();
    if !f.ids.is_empty() {
        let p = args.push(Arg::Bytes(f.ids.iter().map(|v| v.to_vec()).collect()));
        w.push(format!("e.id = ANY({p})"));
    }
    if !f.authors.is_empty() {
        let p = args.push(Arg::Bytes(f.authors.iter().map(|v| v.to_vec()).collect()));
        w.push(format!("e.pubkey = ANY({p})"));
    }
    if !f.kinds.is_empty() {
        let kinds = f
            .kinds
            .iter()
            .map(|k| i32::try_from(*k).unwrap_or(-1))
            .collect();
        let p = args.push(Arg::Ints(kinds));
        w.push(format!("e.kind = ANY({p})"));
    }
    if let Some(s) = f.since {
        let p = args.push(Arg::Int(s));
        w.push(format!("e.created_at >= {p}"));
    }
    if let Some(u) = f.until {
        let p = args.push(Arg::Int(u));
        w.push(format!("e.created_at <= {p}"));
    }
    for (name, values) in &f.tags {
        let pn = args.push(Arg::Text(name.clone()));
        let pv = args.push(Arg::Texts(values.clone()));
        w.push(format!(
            "e.serial IN (SELECT t.serial FROM tags t WHERE t.name = {pn} AND t.value = ANY({pv}))"
        ));
    }
    let p = args.push(Arg::Int(now));
    w.push(format!("(e.expires_at IS NULL OR e.expires_at > {p})"));
    w.join(" AND ")
}

fn select_sql(f: &NormFilter, cols: &str, now: i64, args: &mut Args) -> String {
    let w = where_clause(f, now, args);
    match f.limit {
        Some(l) => {
            let p = args.push(Arg::Int(rules::clamp_limit(l)));
            format!(
                "SELECT {cols} FROM events e WHERE {w} \
                 ORDER BY e.created_at DESC, e.id ASC LIMIT {p}"
            )
        }
        None => format!("SELECT {cols} FROM events e WHERE {w}"),
    }
}

impl PostgresStore {
    /// `EXPLAIN` of one filter's query, for tests and benches.
    #[doc(hidden)]
    pub async fn explain(&self, filter: &Filter) -> Result<Vec<String>> {
        let Some(f) = rules::normalize(filter, LimitMode::Query) else {
            return Ok(vec![]);
        };
        let mut args = Args(Vec::new());
        let sql = format!(
            "EXPLAIN {}",
            select_sql(
                &f,
                "e.created_at, e.id, e.json",
                rules::now_secs(),
                &mut args
            )
        );
        let rows = bind_all(sqlx::query(&sql), args)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
    }
}

fn raw_row(r: &PgRow) -> Result<RawRow> {
    Ok(RawRow {
        created_at: r.try_get(0)?,
        id: r.try_get(1)?,
        json: r.try_get(2)?,
    })
}

fn serial_entry(r: &PgRow) -> Result<SerialEntry> {
    let id: Vec<u8> = r.try_get(1)?;
    let pk: Vec<u8> = r.try_get(2)?;
    let kind: i32 = r.try_get(4)?;
    Ok(SerialEntry {
        serial: rules::u64_of(r.try_get(0)?, "serial")?,
        id: rules::event_id(&id)?,
        pubkey: rules::public_key(&pk)?,
        created_at: Timestamp::from(rules::u64_of(r.try_get(3)?, "created_at")?),
        kind: rules::kind_of(i64::from(kind))?,
    })
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn save_event(&self, event: &Event) -> Result<SaveOutcome> {
        if let Some(out) = rules::precheck(event, rules::now_secs()) {
            return Ok(out);
        }
        rules::save_via(&self.writer, event).await
    }

    async fn query(&self, filters: &[Filter]) -> Result<Vec<Event>> {
        let now = rules::now_secs();
        let mut rows = Vec::new();
        for filter in filters {
            let Some(f) = rules::normalize(filter, LimitMode::Query) else {
                continue;
            };
            let mut args = Args(Vec::new());
            let sql = select_sql(&f, "e.created_at, e.id, e.json", now, &mut args);
            for r in bind_all(sqlx::query(&sql), args)
                .fetch_all(&self.pool)
                .await?
            {
                rows.push(raw_row(&r)?);
            }
        }
        rules::finish_rows(rows)
    }

    async fn count(&self, filters: &[Filter]) -> Result<u64> {
        let now = rules::now_secs();
        let mut args = Args(Vec::new());
        let arms: Vec<String> = filters
            .iter()
            .filter_map(|f| rules::normalize(f, LimitMode::Ignore))
            .map(|f| select_sql(&f, "e.serial", now, &mut args))
            .collect();
        if arms.is_empty() {
            return Ok(0);
        }
        let sql = format!("SELECT COUNT(*) FROM ({}) AS u", arms.join(" UNION "));
        let n: i64 = bind_all(sqlx::query(&sql), args)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        rules::u64_of(n, "count")
    }

    async fn fetch_by_ids(&self, ids: &[EventId]) -> Result<Vec<Event>> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let ids: Vec<Vec<u8>> = ids.iter().map(|i| i.as_bytes().to_vec()).collect();
        let rows = sqlx::query(
            "SELECT json FROM events WHERE id = ANY($1) AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(ids)
        .bind(rules::now_secs())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| rules::parse_event(r.try_get(0)?))
            .collect()
    }

    async fn negentropy_items(&self, filters: &[Filter]) -> Result<Vec<(Timestamp, EventId)>> {
        let now = rules::now_secs();
        let mut set = std::collections::BTreeSet::new();
        for filter in filters {
            let Some(f) = rules::normalize(filter, LimitMode::IfPresent) else {
                continue;
            };
            let mut args = Args(Vec::new());
            let sql = select_sql(&f, "e.created_at, e.id", now, &mut args);
            for r in bind_all(sqlx::query(&sql), args)
                .fetch_all(&self.pool)
                .await?
            {
                let created: i64 = r.try_get(0)?;
                let id: Vec<u8> = r.try_get(1)?;
                set.insert((created, id));
            }
        }
        set.into_iter()
            .map(|(c, id)| {
                Ok((
                    Timestamp::from(rules::u64_of(c, "created_at")?),
                    rules::event_id(&id)?,
                ))
            })
            .collect()
    }

    async fn delete_event(&self, id: &EventId) -> Result<bool> {
        let r = sqlx::query("DELETE FROM events WHERE id = $1")
            .bind(id.as_bytes().as_slice())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn delete_expired(&self) -> Result<u64> {
        let r = sqlx::query("DELETE FROM events WHERE expires_at IS NOT NULL AND expires_at <= $1")
            .bind(rules::now_secs())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn latest_serial(&self) -> Result<u64> {
        let s: Option<i64> = sqlx::query_scalar("SELECT latest FROM serial_state WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        rules::u64_of(s.unwrap_or(0), "serial")
    }

    async fn ids_by_serial_range(
        &self,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<SerialEntry>> {
        if from > to || limit == 0 {
            return Ok(vec![]);
        }
        let rows = sqlx::query(
            "SELECT serial, id, pubkey, created_at, kind FROM events \
             WHERE serial >= $1 AND serial <= $2 AND (expires_at IS NULL OR expires_at > $3) \
             ORDER BY serial ASC LIMIT $4",
        )
        .bind(rules::clamp_limit(from))
        .bind(rules::clamp_limit(to))
        .bind(rules::now_secs())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(serial_entry).collect()
    }

    async fn fetch_by_serials(&self, serials: &[u64]) -> Result<Vec<(u64, Event)>> {
        if serials.is_empty() {
            return Ok(vec![]);
        }
        let serials: Vec<i64> = serials.iter().map(|s| rules::clamp_limit(*s)).collect();
        let rows = sqlx::query(
            "SELECT serial, json FROM events WHERE serial = ANY($1) \
             AND (expires_at IS NULL OR expires_at > $2) ORDER BY serial",
        )
        .bind(serials)
        .bind(rules::now_secs())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    rules::u64_of(r.try_get(0)?, "serial")?,
                    rules::parse_event(r.try_get(1)?)?,
                ))
            })
            .collect()
    }

    async fn serial_by_id(&self, id: &EventId) -> Result<Option<u64>> {
        let s: Option<i64> = sqlx::query_scalar("SELECT serial FROM events WHERE id = $1")
            .bind(id.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await?;
        s.map(|s| rules::u64_of(s, "serial")).transpose()
    }

    async fn relay_identity_secret(&self) -> Result<[u8; 32]> {
        let get = || {
            sqlx::query_scalar::<_, Vec<u8>>("SELECT secret FROM relay_identity WHERE id = 1")
                .fetch_optional(&self.pool)
        };
        if let Some(s) = get().await? {
            return rules::identity_secret(&s);
        }
        sqlx::query(
            "INSERT INTO relay_identity (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(rules::new_identity_secret().to_vec())
        .execute(&self.pool)
        .await?;
        match get().await? {
            Some(s) => rules::identity_secret(&s),
            None => Err(StoreError::Corrupt("relay identity secret vanished".into())),
        }
    }

    async fn set_marker(&self, key: &str, value: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO markers (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_marker(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM markers WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn delete_marker(&self, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM markers WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_markers(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let rows = sqlx::query(
            "SELECT key, value FROM markers WHERE starts_with(key, $1) ORDER BY key COLLATE \"C\"",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<LeaseState> {
        // now() is the statement's (autocommit) start on the server: one instant throughout.
        let row = sqlx::query_as::<_, (String, i64, i64)>(&format!(
            "INSERT INTO leases (name, holder, expires_at_ms) VALUES ($1, $2, {PG_STMT_MS} + $3) \
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
                 expires_at_ms = EXCLUDED.expires_at_ms \
             WHERE leases.expires_at_ms <= {PG_STMT_MS} OR leases.holder = EXCLUDED.holder \
             RETURNING holder, expires_at_ms, {PG_STMT_MS}"
        ))
        .bind(name)
        .bind(holder)
        .bind(ttl_ms)
        .fetch_optional(&self.pool)
        .await?;
        if let Some((h, expires, now)) = row {
            return Ok(rules::lease_state(holder, now, Some((h, expires)), None));
        }
        let row = sqlx::query_as::<_, (i64, Option<String>, Option<i64>)>(&format!(
            "SELECT {PG_NOW_MS}, (SELECT holder FROM leases WHERE name = $1), \
                    (SELECT expires_at_ms FROM leases WHERE name = $1)"
        ))
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        Ok(rules::lease_state(holder, row.0, None, row.1.zip(row.2)))
    }

    async fn set_marker_fenced(
        &self,
        key: &str,
        value: &[u8],
        lease: &str,
        holder: &str,
    ) -> Result<bool> {
        let r = sqlx::query(&format!(
            "INSERT INTO markers (key, value) SELECT $1, $2 \
             WHERE EXISTS (SELECT 1 FROM leases WHERE name = $3 AND holder = $4 \
                           AND expires_at_ms > {PG_NOW_MS}) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
        ))
        .bind(key)
        .bind(value)
        .bind(lease)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn clock_ms(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(&format!("SELECT {PG_NOW_MS}"))
            .fetch_one(&self.pool)
            .await?)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
