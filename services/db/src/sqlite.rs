//! The SQLite backend (the embedded default).
//!
//! One file in WAL mode with `synchronous=NORMAL`: a committed transaction survives a process
//! crash (`kill -9`); only a power loss may drop the last transactions. SQLite allows one
//! writer at a time, so every `save_event` goes to a single writer (a task on a thread of its
//! own) that owns its own connection and commits everything waiting in one transaction
//! (group commit, at most [`MAX_WRITE_BATCH`](crate::rules::MAX_WRITE_BATCH) events). Each
//! event keeps its own outcome: the insert of plain events skips duplicate and deleted ids
//! itself, other refusals are decided by checks before any write, and if the batch fails with
//! a database error it is rolled back and its events are retried one by one. Serials come from
//! `INTEGER PRIMARY KEY AUTOINCREMENT`, so with one writer serial order is commit order.
//! Reads (and the rare small writes: markers, leases, admin deletes) use a separate pool of
//! configurable size. The writer puts every committed event on the feed ([`crate::feed`]), and
//! a query runs in one read transaction, so the serial it reports and the rows it streams come
//! from the same snapshot. Pool queries read their statements to the end (`fetch_all`): one
//! left mid-way keeps a read snapshot open on an idle connection, and the WAL then cannot be
//! truncated past it.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use nostr::{Event, EventId, Filter, Timestamp};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row, Sqlite};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::feed::{Feed, FeedHub, SerialSource};
use crate::query::{self, Bind};
use crate::rules::{self, BatchSaver, LimitMode, Pending, SaveRequest};
use crate::{
    EventStore, LeaseState, QueryStream, RawEvent, Result, SaveOutcome, SerialEntry, StoreError,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Default size of the read pool (`ORLY_DB_MAX_CONNECTIONS` sets it).
pub const DEFAULT_READ_CONNECTIONS: u32 = 8;
/// Rows a streamed query reads ahead of its consumer.
const STREAM_AHEAD: usize = 64;
/// How often the WAL is checkpointed in the background.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL size above which the writer checkpoints and restarts it. Under non-stop writes a
/// PASSIVE checkpoint never catches up with the writer, so without this the WAL grows
/// without bound (it reached 10 GB at 600,000 events).
pub const DEFAULT_WAL_LIMIT_BYTES: u64 = 64 << 20;
/// Serials / ids fetched per statement.
const FETCH_CHUNK: usize = 256;
/// SQLite's clock in Unix milliseconds (lease times are the database's, not the callers').
const SQLITE_NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

pub struct SqliteStore {
    pool: SqlitePool,
    writer: mpsc::Sender<SaveRequest>,
    hub: Arc<FeedHub>,
    reader: Arc<Reader>,
}

/// How a SQLite store is opened.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Read connections (queries run concurrently up to this many).
    pub read_connections: u32,
    /// WAL size that triggers a restarting checkpoint.
    pub wal_limit_bytes: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            read_connections: DEFAULT_READ_CONNECTIONS,
            wal_limit_bytes: DEFAULT_WAL_LIMIT_BYTES,
        }
    }
}

/// The read side the feed catches up from (not the whole store: the store owns the feed).
struct Reader {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database file at `path`.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// [`open`](Self::open) with the WAL size that triggers a restarting checkpoint.
    pub async fn open_with_wal_limit(path: &Path, wal_limit_bytes: u64) -> Result<SqliteStore> {
        Self::open_with(
            path,
            SqliteOptions {
                wal_limit_bytes,
                ..SqliteOptions::default()
            },
        )
        .await
    }

    /// [`open`](Self::open) with explicit options.
    pub async fn open_with(path: &Path, options: SqliteOptions) -> Result<SqliteStore> {
        let wal_limit_bytes = options.wal_limit_bytes;
        let opts = SqliteConnectOptions::from_str("sqlite:")
            .map_err(StoreError::Database)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("temp_store", "memory")
            // A WAL reset past this size truncates the file to it (see `bound_wal`).
            .pragma("journal_size_limit", wal_limit_bytes.to_string());
        // The writer never checkpoints on commit (a checkpoint fsyncs, which would stall every
        // save behind it); a background task checkpoints from a pool connection instead.
        let mut conn = opts
            .clone()
            .pragma("cache_size", "-16000")
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await?;
        MIGRATOR.run(&mut conn).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .min_connections(1)
            .connect_with(opts)
            .await?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = std::path::PathBuf::from(wal);
        let checkpointing = Arc::new(tokio::sync::Mutex::new(()));
        let hub = FeedHub::new(latest_serial(&pool).await?);
        let writer = rules::spawn_writer_thread(
            SqliteSaver {
                conn,
                wal: wal.clone(),
                wal_limit: wal_limit_bytes,
                checkpointing: checkpointing.clone(),
            },
            hub.clone(),
        )?;
        tokio::spawn(checkpoint_loop(
            pool.clone(),
            writer.downgrade(),
            wal,
            wal_limit_bytes,
            checkpointing,
        ));
        Ok(SqliteStore {
            reader: Arc::new(Reader { pool: pool.clone() }),
            pool,
            writer,
            hub,
        })
    }

    /// This store's feed hub.
    pub fn hub(&self) -> &Arc<FeedHub> {
        &self.hub
    }
}

/// Checkpoints the WAL every [`CHECKPOINT_EVERY`] while the store is open. PASSIVE never
/// blocks the writer or readers; the WAL is reused once a checkpoint caught up. (When it never
/// catches up, the writer itself restarts the WAL: see [`SqliteSaver::bound_wal`].)
async fn checkpoint_loop(
    pool: SqlitePool,
    writer: mpsc::WeakSender<SaveRequest>,
    wal: std::path::PathBuf,
    wal_limit: u64,
    checkpointing: Arc<tokio::sync::Mutex<()>>,
) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if writer.upgrade().is_none() {
            break;
        }
        // Over the limit the writer restarts the WAL; a passive checkpoint running then would hold
        // SQLite's checkpoint lock and make the writer's restart give up (under load a
        // passive checkpoint takes seconds), so the two take turns.
        if std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > wal_limit {
            continue;
        }
        let _one_checkpointer = checkpointing.lock().await;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
    // Final checkpoint so the file is compact for the next open.
    let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&pool)
        .await;
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

struct SqliteSaver {
    conn: SqliteConnection,
    wal: std::path::PathBuf,
    wal_limit: u64,
    /// Held by whoever checkpoints (the background loop or the writer's restart).
    checkpointing: Arc<tokio::sync::Mutex<()>>,
}

impl SqliteSaver {
    /// Restarts the WAL once it outgrows its limit: everything is checkpointed and the next
    /// batch writes from the start of the file again (cut back to the limit by
    /// `journal_size_limit`). Done by the writer between batches, as the only writer it cannot
    /// be starved of the lock, and the previous batch has been answered already; readers are
    /// short, the busy timeout covers them. Not TRUNCATE: a truncated WAL grows again page by
    /// page, and the file system allocates every page anew (block mapping, page-cache pages,
    /// zeroing), which cost ~2% of the relay's CPU under a saturating ingest; a restarted one
    /// overwrites pages it already has.
    async fn bound_wal(&mut self) {
        let size = std::fs::metadata(&self.wal).map(|m| m.len()).unwrap_or(0);
        if size <= self.wal_limit {
            return;
        }
        let _turn = self.checkpointing.clone().lock_owned().await;
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(RESTART)")
            .fetch_one(&mut self.conn)
            .await
        {
            Ok((0, _, _)) => tracing::debug!(wal_bytes = size, "WAL restarted"),
            Ok(_) => tracing::debug!(wal_bytes = size, "WAL restart deferred: readers busy"),
            Err(e) => tracing::warn!(error = %e, "restarting WAL checkpoint failed"),
        }
    }
}

#[async_trait]
impl BatchSaver for SqliteSaver {
    async fn save_batch(&mut self, events: &[Pending]) -> Result<Vec<SaveOutcome>> {
        self.bound_wal().await;
        let now = rules::now_secs();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.conn)
            .await?;
        match save_all(&mut self.conn, events, now).await {
            Ok(outcomes) => {
                if let Err(e) = sqlx::query("COMMIT").execute(&mut self.conn).await {
                    let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
                    return Err(e.into());
                }
                Ok(outcomes)
            }
            Err(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
                Err(e)
            }
        }
    }
}

/// Plain events (regular kinds other than deletions) only interact through their ids, so
/// runs of them are checked in one statement and inserted in one more; other events go one
/// by one through [`save_one`]. Order is kept: a run is flushed before the next other event.
async fn save_all(
    conn: &mut SqliteConnection,
    events: &[Pending],
    now: i64,
) -> Result<Vec<SaveOutcome>> {
    let mut outcomes: Vec<Option<SaveOutcome>> = vec![None; events.len()];
    let mut run: Vec<usize> = Vec::new();
    for (i, p) in events.iter().enumerate() {
        let ev = &p.event;
        if let Some(out) = rules::precheck(ev, now) {
            outcomes[i] = Some(out);
            continue;
        }
        let kind = rules::event_kind(ev);
        if kind != 5 && rules::kind_class(kind) == rules::KindClass::Regular {
            run.push(i);
            continue;
        }
        save_run(conn, events, &mut run, &mut outcomes).await?;
        outcomes[i] = Some(save_one(conn, ev, &p.json, now).await?);
    }
    save_run(conn, events, &mut run, &mut outcomes).await?;
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| StoreError::Corrupt("event without outcome".into())))
        .collect()
}

/// Appends `s` as a JSON string.
fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// Appends 32 bytes as a JSON string of lowercase hex.
fn push_json_hex(buf: &mut Vec<u8>, bytes: &[u8; 32]) {
    let mut hex = [0u8; 64];
    // 64 bytes is exactly the room 32 bytes need.
    let _ = hex::encode_to_slice(bytes, &mut hex);
    buf.push(b'"');
    buf.extend_from_slice(&hex);
    buf.push(b'"');
}

fn json_text(buf: Vec<u8>) -> Result<String> {
    String::from_utf8(buf).map_err(|e| StoreError::Corrupt(format!("batch JSON: {e}")))
}

/// Saves a run of plain events (see [`save_all`]) in two statements; empties `run`. The
/// insert skips duplicates and deleted ids itself and returns the serial of each row it
/// wrote, so nothing is looked up by id twice; the few events it skipped are told apart
/// afterwards. The rows go to SQLite as one JSON array written directly (no intermediate
/// values: the writer builds thousands of them per batch).
async fn save_run(
    conn: &mut SqliteConnection,
    events: &[Pending],
    run: &mut Vec<usize>,
    outcomes: &mut [Option<SaveOutcome>],
) -> Result<()> {
    use std::io::Write as _;
    if run.is_empty() {
        return Ok(());
    }
    // [[id, pubkey, created_at, kind, expires_at, json], …]
    let size: usize = run.iter().map(|&i| events[i].json.len() + 256).sum();
    let mut rows = Vec::with_capacity(size + 2);
    rows.push(b'[');
    for (k, &i) in run.iter().enumerate() {
        let ev = &events[i].event;
        if k > 0 {
            rows.push(b',');
        }
        rows.push(b'[');
        push_json_hex(&mut rows, ev.id.as_bytes());
        rows.push(b',');
        push_json_hex(&mut rows, &ev.pubkey.to_bytes());
        let _ = write!(
            rows,
            ",{},{},",
            rules::ts_i64(ev.created_at.as_secs()),
            rules::event_kind(ev)
        );
        let _ = match rules::expiration(ev) {
            Some(x) => write!(rows, "{x},"),
            None => write!(rows, "null,"),
        };
        push_json_str(&mut rows, &events[i].json);
        rows.push(b']');
    }
    rows.push(b']');
    let inserted = sqlx::query(
        "INSERT INTO events (id, pubkey, created_at, kind, d, expires_at, json) \
             SELECT unhex(j.value ->> 0), unhex(j.value ->> 1), j.value ->> 2, j.value ->> 3, \
                    NULL, j.value ->> 4, j.value ->> 5 \
             FROM json_each(?1) AS j \
             WHERE NOT EXISTS (SELECT 1 FROM deleted_ids AS x \
                               WHERE x.id = unhex(j.value ->> 0) AND x.pubkey = unhex(j.value ->> 1)) \
             ORDER BY j.key \
         ON CONFLICT (id) DO NOTHING \
         RETURNING serial, id",
    )
    .bind(json_text(rows)?)
    .fetch_all(&mut *conn)
    .await?;
    let mut serials: std::collections::HashMap<[u8; 32], i64> =
        std::collections::HashMap::with_capacity(inserted.len());
    for r in &inserted {
        let id: Vec<u8> = r.try_get(1)?;
        let id: [u8; 32] = id
            .try_into()
            .map_err(|_| StoreError::Corrupt("stored id is not 32 bytes".into()))?;
        serials.insert(id, r.try_get(0)?);
    }

    // [[name, value, created_at, serial], …]
    let mut tags = Vec::new();
    for &i in run.iter() {
        let ev = &events[i].event;
        // Taken by the first copy of an id: a later copy in this run is told apart like any
        // skipped event (by then it is stored, or it was refused as the first was).
        let Some(serial) = serials.remove(ev.id.as_bytes()) else {
            outcomes[i] = Some(skipped(conn, ev).await?);
            continue;
        };
        outcomes[i] = Some(SaveOutcome::Stored {
            serial: rules::u64_of(serial, "serial")?,
        });
        for (name, value) in rules::index_tags(ev) {
            tags.push(if tags.is_empty() { b'[' } else { b',' });
            tags.push(b'[');
            push_json_str(&mut tags, name);
            tags.push(b',');
            push_json_str(&mut tags, value);
            let _ = write!(
                tags,
                ",{},{serial}]",
                rules::ts_i64(ev.created_at.as_secs())
            );
        }
    }
    if !tags.is_empty() {
        tags.push(b']');
        sqlx::query(
            "INSERT OR IGNORE INTO tags (name, value, created_at, serial) \
             SELECT t.value ->> 0, t.value ->> 1, t.value ->> 2, t.value ->> 3 \
             FROM json_each(?1) AS t",
        )
        .bind(json_text(tags)?)
        .execute(&mut *conn)
        .await?;
    }
    run.clear();
    Ok(())
}

/// Whether `ev`'s id is stored, and whether its author deleted it (NIP-09 `e`).
async fn stored_or_deleted(conn: &mut SqliteConnection, ev: &Event) -> Result<(bool, bool)> {
    Ok(sqlx::query_as(
        "SELECT EXISTS(SELECT 1 FROM events WHERE id = ?1), \
                EXISTS(SELECT 1 FROM deleted_ids WHERE id = ?1 AND pubkey = ?2)",
    )
    .bind(ev.id.as_bytes().as_slice())
    .bind(ev.pubkey.as_bytes().as_slice())
    .fetch_one(&mut *conn)
    .await?)
}

/// Why the batch insert skipped `ev`: it was stored already (before, or as an earlier copy in
/// this batch), or its author deleted it.
async fn skipped(conn: &mut SqliteConnection, ev: &Event) -> Result<SaveOutcome> {
    let (dup, deleted) = stored_or_deleted(conn, ev).await?;
    if dup {
        Ok(SaveOutcome::Duplicate)
    } else if deleted {
        Ok(SaveOutcome::Rejected(rules::MSG_DELETED.into()))
    } else {
        Err(StoreError::Corrupt(
            "the batch insert skipped an event that is neither stored nor deleted".into(),
        ))
    }
}

/// Saves one event inside the writer's open transaction. Every refusal is decided before
/// the first write.
async fn save_one(
    conn: &mut SqliteConnection,
    ev: &Event,
    json: &str,
    now: i64,
) -> Result<SaveOutcome> {
    if let Some(out) = rules::precheck(ev, now) {
        return Ok(out);
    }
    let id = ev.id.as_bytes().as_slice();
    let pk = ev.pubkey.as_bytes().as_slice();
    let kind = i64::from(rules::event_kind(ev));
    let created = rules::ts_i64(ev.created_at.as_secs());
    let d = rules::replace_key(ev);

    // Regular events need two probes; replaceable/addressable ones two more. The explicit
    // `d IS NOT NULL` lets SQLite use the partial index `events_replace`.
    let (dup, del_id, del_addr, newer) = if d.is_some() {
        let row = sqlx::query(
            "SELECT EXISTS(SELECT 1 FROM events WHERE id = ?1), \
                    EXISTS(SELECT 1 FROM deleted_ids WHERE id = ?1 AND pubkey = ?2), \
                    EXISTS(SELECT 1 FROM deleted_addrs WHERE kind = ?3 AND pubkey = ?2 AND d = ?4 \
                           AND deleted_until >= ?5), \
                    EXISTS(SELECT 1 FROM events INDEXED BY events_replace \
                           WHERE d IS NOT NULL AND kind = ?3 AND pubkey = ?2 AND d = ?4 \
                           AND (created_at > ?5 OR (created_at = ?5 AND id < ?1)))",
        )
        .bind(id)
        .bind(pk)
        .bind(kind)
        .bind(d)
        .bind(created)
        .fetch_one(&mut *conn)
        .await?;
        (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        )
    } else {
        let (dup, deleted) = stored_or_deleted(conn, ev).await?;
        (dup, deleted, false, false)
    };
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
    let targets = (kind == 5).then(|| rules::deletion_targets(ev));

    // One round trip to the SQLite worker: remove older versions, insert the event and its
    // tags, read the serial back.
    let tags = rules::index_tags(ev);
    let tags_json = if tags.is_empty() {
        None
    } else {
        Some(
            serde_json::to_string(&tags)
                .map_err(|e| StoreError::Corrupt(format!("encoding tags: {e}")))?,
        )
    };
    let rows = sqlx::query(
        "DELETE FROM events INDEXED BY events_replace \
             WHERE ?5 IS NOT NULL AND d IS NOT NULL AND kind = ?4 AND pubkey = ?2 AND d = ?5; \
         INSERT INTO events (id, pubkey, created_at, kind, d, expires_at, json) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7); \
         INSERT OR IGNORE INTO tags (name, value, created_at, serial) \
             SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), ?3, \
                    (SELECT serial FROM events WHERE id = ?1) \
             FROM json_each(coalesce(?8, '[]')) AS j; \
         SELECT serial FROM events WHERE id = ?1;",
    )
    .bind(id)
    .bind(pk)
    .bind(created)
    .bind(kind)
    .bind(d)
    .bind(rules::expiration(ev))
    .bind(json)
    .bind(tags_json)
    .fetch_all(&mut *conn)
    .await?;
    let serial: i64 = match rows.last() {
        Some(r) => r.try_get(0)?,
        None => return Err(StoreError::Corrupt("inserted event has no serial".into())),
    };

    if let Some(t) = targets {
        for target in &t.ids {
            let tid = target.as_bytes().as_slice();
            sqlx::query("INSERT OR IGNORE INTO deleted_ids (id, pubkey) VALUES (?1, ?2)")
                .bind(tid)
                .bind(pk)
                .execute(&mut *conn)
                .await?;
            sqlx::query("DELETE FROM events WHERE id = ?1 AND pubkey = ?2 AND kind != 5")
                .bind(tid)
                .bind(pk)
                .execute(&mut *conn)
                .await?;
        }
        for a in &t.addrs {
            sqlx::query(
                "INSERT INTO deleted_addrs (kind, pubkey, d, deleted_until) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (kind, pubkey, d) DO UPDATE \
                 SET deleted_until = max(deleted_until, excluded.deleted_until)",
            )
            .bind(i64::from(a.kind))
            .bind(pk)
            .bind(&a.d)
            .bind(created)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "DELETE FROM events INDEXED BY events_replace \
                 WHERE d IS NOT NULL AND kind = ?1 AND pubkey = ?2 AND d = ?3 AND created_at <= ?4",
            )
            .bind(i64::from(a.kind))
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

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    binds: Vec<Bind>,
) -> sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>> {
    for b in binds {
        q = match b {
            Bind::Int(v) => q.bind(v),
            Bind::Blob(v) => q.bind(v),
            Bind::Text(v) => q.bind(v),
            // SQLite has no arrays: the dialect never produces these.
            Bind::Blobs(_) | Bind::Ints(_) | Bind::Texts(_) => q,
        };
    }
    q
}

/// One statement answering every filter of a query, with its binds.
fn query_sql(filters: &[Filter], now: i64) -> Option<(String, Vec<Bind>)> {
    let mut d = query::Sqlite::default();
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

fn raw_event(r: &SqliteRow) -> Result<RawEvent> {
    let id: Vec<u8> = r.try_get(2)?;
    let pk: Vec<u8> = r.try_get(3)?;
    let json: String = r.try_get(5)?;
    Ok(RawEvent {
        serial: rules::u64_of(r.try_get(0)?, "serial")?,
        created_at: rules::u64_of(r.try_get(1)?, "created_at")?,
        id: rules::event_id(&id)?.to_bytes(),
        pubkey: rules::public_key(&pk)?.to_bytes(),
        kind: rules::kind_of(r.try_get(4)?)?,
        json: Arc::from(json),
    })
}

async fn latest_serial<'c, E: sqlx::SqliteExecutor<'c>>(conn: E) -> Result<u64> {
    // fetch_all steps the statement to its end: a statement left mid-way (fetch_optional)
    // keeps its read snapshot open on an idle pool connection, and the WAL cannot be
    // truncated past it.
    let seq: Vec<i64> = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
        .fetch_all(conn)
        .await?;
    rules::u64_of(seq.first().copied().unwrap_or(0), "serial")
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
            "SELECT {} FROM events e WHERE e.serial >= ?1 AND e.serial <= ?2 \
             AND (e.expires_at IS NULL OR e.expires_at > ?3) ORDER BY e.serial ASC LIMIT ?4",
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

impl SqliteStore {
    /// `EXPLAIN QUERY PLAN` of one filter's query, for tests and benches.
    #[doc(hidden)]
    pub async fn explain(&self, filter: &Filter) -> Result<Vec<String>> {
        let Some((sql, binds)) = query_sql(std::slice::from_ref(filter), rules::now_secs()) else {
            return Ok(vec![]);
        };
        let sql = format!("EXPLAIN QUERY PLAN {sql}");
        let rows = bind_all(sqlx::query(&sql), binds)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(3).map_err(StoreError::from))
            .collect()
    }
}

fn serial_entry(r: &SqliteRow) -> Result<SerialEntry> {
    let id: Vec<u8> = r.try_get(1)?;
    let pk: Vec<u8> = r.try_get(2)?;
    Ok(SerialEntry {
        serial: rules::u64_of(r.try_get(0)?, "serial")?,
        id: rules::event_id(&id)?,
        pubkey: rules::public_key(&pk)?,
        created_at: Timestamp::from(rules::u64_of(r.try_get(3)?, "created_at")?),
        kind: rules::kind_of(r.try_get(4)?)?,
    })
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn save_json(&self, event: &Event, json: &str) -> Result<SaveOutcome> {
        // Refusals that need no database do not queue behind the writer.
        if let Some(out) = rules::precheck(event, rules::now_secs()) {
            return Ok(out);
        }
        rules::save_via(&self.writer, event, json).await
    }

    async fn publish_ephemeral(&self, event: RawEvent) -> Result<()> {
        self.hub.publish_ephemeral(event);
        Ok(())
    }

    fn watch(&self, after: u64) -> Feed {
        self.hub.watch(after, self.reader.clone())
    }

    async fn query_stream(&self, filters: &[Filter]) -> Result<QueryStream> {
        let plan = query_sql(filters, rules::now_secs());
        // One read transaction: its first read fixes the snapshot, so the serial and the rows
        // agree (a REQ hands over to the live feed right after this serial).
        let mut tx = self.pool.begin().await?;
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
                // A consumer that went away (a CLOSEd REQ) ends the read.
                if out.send(item).await.is_err() || failed {
                    break;
                }
            }
            // Dropping the transaction rolls it back: a read-only snapshot ends.
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
        let mut d = query::Sqlite::default();
        let arms: Vec<String> = filters
            .iter()
            .filter_map(|f| rules::normalize(f, LimitMode::Ignore))
            .map(|f| query::unlimited(&f, "e.serial", now, &mut d))
            .collect();
        if arms.is_empty() {
            return Ok(0);
        }
        let sql = format!("SELECT COUNT(*) FROM ({})", arms.join(" UNION "));
        let rows = bind_all(sqlx::query(&sql), d.binds)
            .fetch_all(&self.pool)
            .await?;
        let n: i64 = rows.first().ok_or(sqlx::Error::RowNotFound)?.try_get(0)?;
        rules::u64_of(n, "count")
    }

    async fn fetch_by_ids(&self, ids: &[EventId]) -> Result<Vec<Event>> {
        let now = rules::now_secs();
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(FETCH_CHUNK) {
            let sql = format!(
                "SELECT json FROM events WHERE id IN ({}) \
                 AND (expires_at IS NULL OR expires_at > ?)",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.as_bytes().as_slice());
            }
            for r in q.bind(now).fetch_all(&self.pool).await? {
                out.push(rules::parse_event(r.try_get(0)?)?);
            }
        }
        Ok(out)
    }

    async fn negentropy_items(&self, filters: &[Filter]) -> Result<Vec<(Timestamp, EventId)>> {
        let now = rules::now_secs();
        let mut set = std::collections::BTreeSet::new();
        for filter in filters {
            let Some(f) = rules::normalize(filter, LimitMode::IfPresent) else {
                continue;
            };
            let mut d = query::Sqlite::default();
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
        let r = sqlx::query("DELETE FROM events WHERE id = ?1")
            .bind(id.as_bytes().as_slice())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn delete_expired(&self) -> Result<u64> {
        let r = sqlx::query("DELETE FROM events WHERE expires_at IS NOT NULL AND expires_at <= ?1")
            .bind(rules::now_secs())
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
             WHERE serial >= ?1 AND serial <= ?2 AND (expires_at IS NULL OR expires_at > ?3) \
             ORDER BY serial ASC LIMIT ?4",
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
        let now = rules::now_secs();
        let mut out = Vec::with_capacity(serials.len());
        for chunk in serials.chunks(FETCH_CHUNK) {
            let sql = format!(
                "SELECT serial, json FROM events WHERE serial IN ({}) \
                 AND (expires_at IS NULL OR expires_at > ?)",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for s in chunk {
                q = q.bind(rules::clamp_limit(*s));
            }
            for r in q.bind(now).fetch_all(&self.pool).await? {
                let serial = rules::u64_of(r.try_get(0)?, "serial")?;
                out.push((serial, rules::parse_event(r.try_get(1)?)?));
            }
        }
        out.sort_by_key(|(s, _)| *s);
        out.dedup_by_key(|(s, _)| *s);
        Ok(out)
    }

    async fn serial_by_id(&self, id: &EventId) -> Result<Option<u64>> {
        let s: Vec<i64> = sqlx::query_scalar("SELECT serial FROM events WHERE id = ?1")
            .bind(id.as_bytes().as_slice())
            .fetch_all(&self.pool)
            .await?;
        s.first().map(|s| rules::u64_of(*s, "serial")).transpose()
    }

    async fn relay_identity_secret(&self) -> Result<[u8; 32]> {
        let get = || {
            sqlx::query_scalar::<_, Vec<u8>>("SELECT secret FROM relay_identity WHERE id = 1")
                .fetch_all(&self.pool)
        };
        if let Some(s) = get().await?.first() {
            return rules::identity_secret(s);
        }
        sqlx::query(
            "INSERT INTO relay_identity (id, secret) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(rules::new_identity_secret().to_vec())
        .execute(&self.pool)
        .await?;
        match get().await?.first() {
            Some(s) => rules::identity_secret(s),
            None => Err(StoreError::Corrupt("relay identity secret vanished".into())),
        }
    }

    async fn set_marker(&self, key: &str, value: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO markers (key, value) VALUES (?1, ?2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_marker(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM markers WHERE key = ?1")
                .bind(key)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .next(),
        )
    }

    async fn delete_marker(&self, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM markers WHERE key = ?1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_markers(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let rows = sqlx::query(
            "SELECT key, value FROM markers WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<LeaseState> {
        // SQLite's clock, not ours: upsert where free, lapsed or ours.
        // 'now' is fixed for the whole statement, so every use below is the same instant.
        let row = sqlx::query_as::<_, (String, i64, i64)>(&format!(
            "INSERT INTO leases (name, holder, expires_at_ms) VALUES (?1, ?2, {SQLITE_NOW_MS} + ?3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                 expires_at_ms = excluded.expires_at_ms \
             WHERE leases.expires_at_ms <= {SQLITE_NOW_MS} OR leases.holder = excluded.holder \
             RETURNING holder, expires_at_ms, {SQLITE_NOW_MS}"
        ))
        .bind(name)
        .bind(holder)
        .bind(ttl_ms)
        .fetch_all(&self.pool)
        .await?;
        if let Some((h, expires, now)) = row.into_iter().next() {
            return Ok(rules::lease_state(holder, now, Some((h, expires)), None));
        }
        let (now, current) = {
            let row = sqlx::query_as::<_, (i64, Option<String>, Option<i64>)>(&format!(
                "SELECT {SQLITE_NOW_MS}, (SELECT holder FROM leases WHERE name = ?1), \
                        (SELECT expires_at_ms FROM leases WHERE name = ?1)"
            ))
            .bind(name)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .next()
            .ok_or(sqlx::Error::RowNotFound)?;
            (row.0, row.1.zip(row.2))
        };
        Ok(rules::lease_state(holder, now, None, current))
    }

    async fn set_marker_fenced(
        &self,
        key: &str,
        value: &[u8],
        lease: &str,
        holder: &str,
    ) -> Result<bool> {
        let r = sqlx::query(&format!(
            "INSERT INTO markers (key, value) SELECT ?1, ?2 \
             WHERE EXISTS (SELECT 1 FROM leases WHERE name = ?3 AND holder = ?4 \
                           AND expires_at_ms > {SQLITE_NOW_MS}) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value"
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
        sqlx::query_scalar(&format!("SELECT {SQLITE_NOW_MS}"))
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| sqlx::Error::RowNotFound.into())
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM leases WHERE name = ?1 AND holder = ?2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
