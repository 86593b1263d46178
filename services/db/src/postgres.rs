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
//!
//! The feed ([`crate::feed`]): every save transaction sends `NOTIFY orly_events, '<highest
//! serial>'`, delivered at commit to every process that listens — every relay and orly-db
//! replica on this database — each of which reads the new range and puts it on its own feed
//! (its own writer's commits go there at once). Ephemeral events travel as `NOTIFY
//! orly_ephemeral` payloads (through a short-lived table when too large), so every replica
//! delivers each one once. A listener that lost its connection reads what it missed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use nostr::{Event, EventId, Filter, Timestamp};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::feed::{Feed, FeedHub, SerialSource};
use crate::query::{self, Bind};
use crate::rules::{self, BatchSaver, LimitMode, Pending, SaveRequest};
use crate::{
    EventStore, LeaseState, QueryStream, RawEvent, Result, SaveOutcome, SerialEntry, StoreError,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Advisory lock key serializing event writers ("orly" in ASCII).
const WRITER_LOCK: i64 = 0x6f72_6c79;
/// The server's clock in Unix milliseconds (lease times are the database's).
const PG_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
/// The same at the start of the statement (constant within it).
const PG_STMT_MS: &str = "(extract(epoch from now()) * 1000)::bigint";

/// Rows a streamed query reads ahead of its consumer.
const STREAM_AHEAD: usize = 64;
/// Channel of committed serials.
const EVENTS_CHANNEL: &str = "orly_events";
/// Channel of ephemeral events.
const EPHEMERAL_CHANNEL: &str = "orly_ephemeral";
/// Largest ephemeral event sent inline in a NOTIFY payload (PostgreSQL's limit is 8000 bytes).
const MAX_INLINE_NOTIFY: usize = 7900;
/// Prefix of a payload naming a row of `ephemeral_events` instead of carrying the event.
const EPHEMERAL_REF: char = '@';
/// How long a large ephemeral event waits in `ephemeral_events`.
const EPHEMERAL_KEEP_MS: i64 = 60_000;

pub struct PostgresStore {
    pool: PgPool,
    writer: mpsc::Sender<SaveRequest>,
    hub: Arc<FeedHub>,
    reader: Arc<Reader>,
    listener: tokio::task::JoinHandle<()>,
}

/// The read side the feed catches up from.
struct Reader {
    pool: PgPool,
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
        let reader = Arc::new(Reader { pool: pool.clone() });
        // Listen before reading the latest serial, so no commit falls between the two.
        let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
        listener
            .listen_all([EVENTS_CHANNEL, EPHEMERAL_CHANNEL])
            .await?;
        let hub = FeedHub::new(latest_serial(&pool).await?);
        let writer = rules::spawn_writer(PgSaver { pool: pool.clone() }, hub.clone());
        let listener = tokio::spawn(listen(listener, hub.clone(), reader.clone()));
        Ok(PostgresStore {
            pool,
            writer,
            hub,
            reader,
            listener,
        })
    }

    /// This store's feed hub.
    pub fn hub(&self) -> &Arc<FeedHub> {
        &self.hub
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

async fn latest_serial<'c, E: sqlx::PgExecutor<'c>>(conn: E) -> Result<u64> {
    let s: Option<i64> = sqlx::query_scalar("SELECT latest FROM serial_state WHERE id = 1")
        .fetch_optional(conn)
        .await?;
    rules::u64_of(s.unwrap_or(0), "serial")
}

/// Puts what other processes committed (and every ephemeral event) on the hub.
async fn listen(mut listener: sqlx::postgres::PgListener, hub: Arc<FeedHub>, reader: Arc<Reader>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) if n.channel() == EVENTS_CHANNEL => {
                let target = n.payload().trim().parse::<u64>().unwrap_or(0);
                publish_up_to(&hub, &reader, target).await;
            }
            Ok(Some(n)) => {
                let payload = n.payload();
                let json = match payload.strip_prefix(EPHEMERAL_REF) {
                    Some(id) => match ephemeral_row(&reader.pool, id).await {
                        Ok(Some(json)) => json,
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read a large ephemeral event");
                            continue;
                        }
                    },
                    None => payload.to_string(),
                };
                match RawEvent::from_json(0, json) {
                    Ok(e) => hub.publish_ephemeral(e),
                    Err(e) => tracing::warn!(error = %e, "malformed ephemeral notification"),
                }
            }
            // The connection was lost and is back: notifications meanwhile are gone, the
            // events are not.
            Ok(None) => {
                tracing::info!("feed listener reconnected; reading what it missed");
                match latest_serial(&reader.pool).await {
                    Ok(latest) => publish_up_to(&hub, &reader, latest).await,
                    Err(e) => tracing::warn!(error = %e, "feed catch-up failed"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "feed listener failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Publishes every stored event above the hub's last serial up to `target`.
async fn publish_up_to(hub: &FeedHub, reader: &Reader, target: u64) {
    while hub.last() < target {
        match reader
            .events_by_serial_range(hub.last() + 1, target, 1000)
            .await
        {
            Ok(page) if page.is_empty() => {
                // Serials with no (live) event: rolled back, deleted or expired.
                hub.advance(target);
                return;
            }
            Ok(page) => {
                let short = page.len() < 1000;
                hub.publish_stored(page);
                if short {
                    hub.advance(target);
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, target, "feed: cannot read new events");
                return;
            }
        }
    }
}

async fn ephemeral_row(pool: &PgPool, id: &str) -> Result<Option<String>> {
    let Ok(id) = id.parse::<i64>() else {
        return Ok(None);
    };
    Ok(
        sqlx::query_scalar("SELECT json FROM ephemeral_events WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

struct PgSaver {
    pool: PgPool,
}

#[async_trait]
impl BatchSaver for PgSaver {
    async fn save_batch(&mut self, events: &[Pending]) -> Result<Vec<SaveOutcome>> {
        let now = rules::now_secs();
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITER_LOCK)
            .execute(&mut *tx)
            .await?;
        let mut outcomes = Vec::with_capacity(events.len());
        let mut max_serial = None;
        for p in events {
            let out = save_one(&mut tx, &p.event, &p.json, now).await?;
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
            // Delivered at commit, in commit order, to every listening process.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(EVENTS_CHANNEL)
                .bind(s.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

/// Saves one event inside the writer's transaction (lock held). Every refusal is decided
/// before the first write.
async fn save_one(
    conn: &mut PgConnection,
    ev: &Event,
    json: &str,
    now: i64,
) -> Result<SaveOutcome> {
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

    // NIP-09: only the author's own targets are removed (others are ignored below).
    let targets = (kind == 5).then(|| {
        let t = rules::deletion_targets(ev);
        let ids: Vec<Vec<u8>> = t.ids.iter().map(|i| i.as_bytes().to_vec()).collect();
        (t, ids)
    });

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
    .bind(json)
    .fetch_one(&mut *conn)
    .await?;
    let tags = rules::index_tags(ev);
    if !tags.is_empty() {
        let (names, values): (Vec<String>, Vec<String>) = tags
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .unzip();
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
// Reading
// ---------------------------------------------------------------------------------------

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, Postgres, PgArguments>,
    binds: Vec<Bind>,
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    for b in binds {
        q = match b {
            Bind::Int(v) => q.bind(v),
            Bind::Text(v) => q.bind(v),
            Bind::Blob(v) => q.bind(v),
            Bind::Blobs(v) => q.bind(v),
            Bind::Ints(v) => q.bind(v),
            Bind::Texts(v) => q.bind(v),
        };
    }
    q
}

/// One statement answering every filter of a query, with its binds.
fn query_sql(filters: &[Filter], now: i64) -> Option<(String, Vec<Bind>)> {
    let mut d = query::Postgres::default();
    let arms: Vec<String> = filters
        .iter()
        .filter_map(|f| rules::normalize(f, LimitMode::Query))
        .map(|f| {
            let limit = f.limit.unwrap_or(rules::MAX_UNLIMITED_RESULTS);
            query::limited(&f, query::EVENT_COLS, limit, now, &mut d)
        })
        .collect();
    query::union(arms).map(|sql| (sql, d.binds))
}

fn raw_event(r: &PgRow) -> Result<RawEvent> {
    let id: Vec<u8> = r.try_get(2)?;
    let pk: Vec<u8> = r.try_get(3)?;
    let kind: i32 = r.try_get(4)?;
    let json: String = r.try_get(5)?;
    Ok(RawEvent {
        serial: rules::u64_of(r.try_get(0)?, "serial")?,
        created_at: rules::u64_of(r.try_get(1)?, "created_at")?,
        id: rules::event_id(&id)?.to_bytes(),
        pubkey: rules::public_key(&pk)?.to_bytes(),
        kind: rules::kind_of(i64::from(kind))?,
        json: Arc::from(json),
    })
}

#[async_trait]
impl SerialSource for Reader {
    async fn events_by_serial_range(
        &self,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<RawEvent>> {
        if from > to || limit == 0 {
            return Ok(vec![]);
        }
        let rows = sqlx::query(&format!(
            "SELECT {} FROM events e WHERE e.serial >= $1 AND e.serial <= $2 \
             AND (e.expires_at IS NULL OR e.expires_at > $3) ORDER BY e.serial ASC LIMIT $4",
            query::EVENT_COLS
        ))
        .bind(rules::clamp_limit(from))
        .bind(rules::clamp_limit(to))
        .bind(rules::now_secs())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(raw_event).collect()
    }
}

impl PostgresStore {
    /// `EXPLAIN` of one filter's query, for tests and benches. `as_if_large` turns off the
    /// plans PostgreSQL prefers only for small tables (sequential and bitmap scans, hash and
    /// merge joins) for the statement, so a test table shows the index walk a large store gets.
    #[doc(hidden)]
    pub async fn explain(&self, filter: &Filter, as_if_large: bool) -> Result<Vec<String>> {
        let Some((sql, binds)) = query_sql(std::slice::from_ref(filter), rules::now_secs()) else {
            return Ok(vec![]);
        };
        let mut tx = self.pool.begin().await?;
        if as_if_large {
            for knob in [
                "enable_seqscan",
                "enable_bitmapscan",
                "enable_hashjoin",
                "enable_mergejoin",
            ] {
                sqlx::query(&format!("SET LOCAL {knob} = off"))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let sql = format!("EXPLAIN {sql}");
        let rows = bind_all(sqlx::query(&sql), binds)
            .fetch_all(&mut *tx)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
    }
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

    async fn save_json(&self, event: &Event, json: &str) -> Result<SaveOutcome> {
        if let Some(out) = rules::precheck(event, rules::now_secs()) {
            return Ok(out);
        }
        rules::save_via(&self.writer, event, json).await
    }

    async fn publish_ephemeral(&self, event: RawEvent) -> Result<()> {
        // Through the database even for our own feed: every listener, this process's
        // included, gets it exactly once.
        let payload = if event.json.len() <= MAX_INLINE_NOTIFY {
            event.json.to_string()
        } else {
            let id: i64 = sqlx::query_scalar(&format!(
                "INSERT INTO ephemeral_events (json, created_ms) VALUES ($1, {PG_NOW_MS}) RETURNING id"
            ))
            .bind(event.json.as_ref())
            .fetch_one(&self.pool)
            .await?;
            format!("{EPHEMERAL_REF}{id}")
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(EPHEMERAL_CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn watch(&self, after: u64) -> Feed {
        self.hub.watch(after, self.reader.clone())
    }

    async fn query_stream(&self, filters: &[Filter]) -> Result<QueryStream> {
        let plan = query_sql(filters, rules::now_secs());
        // One snapshot for the serial and the rows (serial_state is written in the same
        // transaction as the events, under the writer lock).
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let serial = latest_serial(&mut *tx).await?;
        let Some((sql, binds)) = plan else {
            return Ok(QueryStream {
                serial,
                events: futures::stream::empty().boxed(),
            });
        };
        let (out, rx) = mpsc::channel(STREAM_AHEAD);
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut rows = bind_all(sqlx::query(&sql), binds).fetch(&mut *tx);
            while let Some(row) = rows.next().await {
                let item = row.map_err(StoreError::from).and_then(|r| raw_event(&r));
                if let Ok(e) = &item {
                    if !seen.insert(e.serial) {
                        continue;
                    }
                }
                let failed = item.is_err();
                if out.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(QueryStream {
            serial,
            events: ReceiverStream::new(rx).boxed(),
        })
    }

    async fn events_by_serial_range(
        &self,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<RawEvent>> {
        self.reader.events_by_serial_range(from, to, limit).await
    }

    async fn count(&self, filters: &[Filter]) -> Result<u64> {
        let now = rules::now_secs();
        let mut d = query::Postgres::default();
        let arms: Vec<String> = filters
            .iter()
            .filter_map(|f| rules::normalize(f, LimitMode::Ignore))
            .map(|f| query::unlimited(&f, "e.serial", now, &mut d))
            .collect();
        if arms.is_empty() {
            return Ok(0);
        }
        let sql = format!("SELECT COUNT(*) FROM ({}) AS u", arms.join(" UNION "));
        let n: i64 = bind_all(sqlx::query(&sql), d.binds)
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
            let mut d = query::Postgres::default();
            let sql = match f.limit {
                Some(l) => query::limited(&f, "e.created_at, e.id", l, now, &mut d),
                None => query::unlimited(&f, "e.created_at, e.id", now, &mut d),
            };
            for r in bind_all(sqlx::query(&sql), d.binds)
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
        // Large ephemeral events every listener has long read.
        sqlx::query(&format!(
            "DELETE FROM ephemeral_events WHERE created_ms < {PG_NOW_MS} - $1"
        ))
        .bind(EPHEMERAL_KEEP_MS)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    async fn latest_serial(&self) -> Result<u64> {
        latest_serial(&self.pool).await
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
