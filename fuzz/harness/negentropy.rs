//! NIP-77 sessions as the relay drives them (`NegentropyHandler::open` with a NEG-OPEN's filter
//! and message, `message` with each NEG-MSG, then `close`) on an in-process
//! [`NegentropyEngine`] over a small SQLite store: the promises checked by the property tests
//! (`services/sync-negentropy/tests/fuzz_messages.rs`) and the cargo-fuzz target `negentropy`,
//! which include this file. Each function panics only when a promise is broken.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use nostr::{Event, EventBuilder, EventId, Filter, Keys, Kind, Timestamp};
use orly_db::sqlite::SqliteStore;
use orly_db::SharedStore;
use orly_sync_negentropy::{
    EngineSettings, NegError, NegReply, NegentropyEngine, NegentropyHandler,
};

/// The version byte of negentropy protocol V1.
pub const V1: u8 = 0x61;
/// Records a session may hold in the fixture: the widest preset filter is refused.
pub const MAX_RECORDS: usize = 320;
/// Largest message the fixture's engine accepts.
pub const MAX_MESSAGE_BYTES: usize = 8192;
/// `created_at` of the first stored event.
pub const BASE: u64 = 1_700_000_000;

/// A store with 400 events (250 kind-1 by one key, 100 kind-7 and 50 kind-1 by another, in
/// seconds shared by up to three), an engine over it and a runtime to drive it.
pub struct Fixture {
    pub rt: tokio::runtime::Runtime,
    pub engine: Arc<NegentropyEngine>,
    pub events: Vec<Event>,
    /// Filters to open sessions with: all, kind 1, kind 7, one author, since, limit, ids,
    /// nothing.
    pub filters: Vec<Filter>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// The `(created_at, id)` records of the stored events `filter` matches, as a session
    /// holds them (`limit` keeps the newest).
    pub fn records(&self, filter: &Filter) -> Vec<(Timestamp, EventId)> {
        let mut out: Vec<(Timestamp, EventId)> = self
            .events
            .iter()
            .filter(|e| filter.match_event(e, nostr::filter::MatchEventOptions::new()))
            .map(|e| (e.created_at, e.id))
            .collect();
        out.sort_by(|a, b| b.cmp(a));
        if let Some(limit) = filter.limit {
            out.truncate(limit);
        }
        out.sort();
        out
    }
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temporary directory");
        let (a, b) = (Keys::generate(), Keys::generate());
        let note = |keys: &Keys, kind: u16, i: usize| {
            EventBuilder::new(Kind::from(kind), format!("fuzz {kind} {i}"))
                .custom_created_at(Timestamp::from(BASE + i as u64 / 3))
                .sign_with_keys(keys)
                .expect("signed")
        };
        let mut events: Vec<Event> = (0..250).map(|i| note(&a, 1, i)).collect();
        events.extend((0..100).map(|i| note(&b, 7, i)));
        events.extend((100..150).map(|i| note(&b, 1, i)));
        let engine = rt.block_on(async {
            let store: SharedStore = Arc::new(
                SqliteStore::open(&dir.path().join("fuzz.db"))
                    .await
                    .expect("store"),
            );
            for chunk in events.chunks(100) {
                for r in futures::future::join_all(chunk.iter().map(|e| store.save_event(e))).await
                {
                    r.expect("saved");
                }
            }
            NegentropyEngine::new(
                store,
                EngineSettings {
                    max_records: MAX_RECORDS,
                    max_message_bytes: MAX_MESSAGE_BYTES,
                    ..EngineSettings::default()
                },
            )
            .expect("engine")
        });
        let filters = vec![
            Filter::new(),
            Filter::new().kind(Kind::TextNote),
            Filter::new().kind(Kind::Reaction),
            Filter::new().author(a.public_key()),
            Filter::new()
                .kind(Kind::TextNote)
                .since(Timestamp::from(BASE + 40)),
            Filter::new().kind(Kind::TextNote).limit(16),
            Filter::new().ids(events.iter().step_by(7).map(|e| e.id)),
            Filter::new().kind(Kind::from(30_000)),
        ];
        Fixture {
            rt,
            engine,
            events,
            filters,
            _dir: dir,
        }
    })
}

/// A connection id no other call uses (property tests run in parallel on one engine).
pub fn connection_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("fuzz-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Arbitrary bytes as one NIP-77 session: the first byte picks a preset filter (or, when the
/// input starts with `{`, a JSON filter runs to the first newline; one that does not parse
/// becomes `{}`); the rest is a NEG-OPEN message and NEG-MSG messages, each prefixed with its
/// length (two bytes, big-endian). With the first byte's top bit set, the NEG-OPEN message is
/// a valid initial message of a client holding some of the records, with the next bytes XORed
/// into it.
pub fn negentropy(data: &[u8]) {
    let fx = fixture();
    let (filter, rest) = match data.first() {
        None => return,
        Some(b'{') => {
            let end = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
            let filter = serde_json::from_slice::<Filter>(&data[..end]).unwrap_or_default();
            (filter, data.get(end + 1..).unwrap_or_default())
        }
        Some(&b) => (
            fx.filters[usize::from(b & 0x7f) % fx.filters.len()].clone(),
            &data[1..],
        ),
    };
    let mut messages = split_messages(rest);
    if data[0] & 0x80 != 0 && data[0] != b'{' {
        let client: Vec<(Timestamp, EventId)> = fx
            .records(&filter)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| rest.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
            .map(|(_, r)| r)
            .collect();
        let mut initial = initial_message(&client, 0);
        let noise = messages.first().cloned().unwrap_or_default();
        for (i, b) in noise.iter().enumerate() {
            if let Some(x) = initial.get_mut(i) {
                *x ^= b;
            }
        }
        match messages.first_mut() {
            Some(first) => *first = initial,
            None => messages.push(initial),
        }
    }
    let Some((open, rest)) = messages.split_first() else {
        return;
    };
    let _ = session(&filter, open, rest);
}

/// `data` cut into messages: two bytes of length (big-endian), that many bytes (or what is
/// left), again.
pub fn split_messages(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([data[0], data[1]])).min(data.len() - 2);
        out.push(data[2..2 + n].to_vec());
        data = &data[2 + n..];
    }
    out
}

/// The initial message of a negentropy client holding `items` (`frame_size` 0: unlimited).
pub fn initial_message(items: &[(Timestamp, EventId)], frame_size: u64) -> Vec<u8> {
    let storage = orly_sync_negentropy::set::build_storage(items).expect("storage");
    let mut client = negentropy::Negentropy::owned(storage, frame_size).expect("client");
    client.initiate().expect("initial message")
}

/// One session on its own connection: NEG-OPEN with `filter` and `open`, a NEG-MSG per entry of
/// `messages`, NEG-CLOSE; returns the answers (NEG-OPEN's first). Checks that
/// - every error is a NEG-ERR reason with its NIP-01 prefix, and none is ours (`error: `:
///   a client's bytes never make an internal fault);
/// - a reply is a V1 message (it starts with 0x61);
/// - a NEG-OPEN of another V1.x version gets the version byte alone and opens nothing, one that
///   is no negentropy message is refused as `invalid: `, one larger than the limit `blocked: `;
/// - after an error the session is gone: the next NEG-MSG gets `closed: `, as after NEG-CLOSE.
pub fn session(
    filter: &Filter,
    open: &[u8],
    messages: &[Vec<u8>],
) -> Vec<Result<NegReply, NegError>> {
    let fx = fixture();
    let conn = connection_id();
    let handler: &dyn NegentropyHandler = fx.engine.as_ref();
    fx.rt.block_on(async {
        let mut out = Vec::new();
        let first = handler.open(&conn, "s", filter, open).await;
        check(&first, open);
        if open.len() > MAX_MESSAGE_BYTES {
            assert!(matches!(first, Err(NegError::Blocked(_))), "{first:?}");
        } else if open
            .first()
            .is_some_and(|v| (0x60..=0x6f).contains(v) && *v != V1)
        {
            assert_eq!(
                first,
                Ok(NegReply {
                    message: vec![V1],
                    complete: true
                })
            );
        } else if !open.first().is_some_and(|v| (0x60..=0x6f).contains(v)) {
            assert!(matches!(first, Err(NegError::Invalid(_))), "{first:?}");
        }
        let mut alive = first.is_ok() && open.first() == Some(&V1);
        out.push(first);
        for m in messages {
            let r = handler.message(&conn, "s", m).await;
            check(&r, m);
            if !alive {
                assert!(
                    matches!(r, Err(NegError::Closed(_))),
                    "after the session ended: {r:?}"
                );
            }
            alive = r.is_ok();
            out.push(r);
        }
        handler.close(&conn, "s").await;
        let after = handler.message(&conn, "s", &[V1]).await;
        assert!(
            matches!(after, Err(NegError::Closed(_))),
            "after NEG-CLOSE: {after:?}"
        );
        handler.close_connection(&conn).await;
        out
    })
}

fn check(r: &Result<NegReply, NegError>, input: &[u8]) {
    match r {
        Ok(reply) => {
            assert_eq!(reply.message.first(), Some(&V1), "reply {reply:?}");
            assert_eq!(reply.complete, reply.message.len() <= 1);
        }
        Err(e) => {
            let reason = e.reason();
            assert!(
                ["blocked: ", "closed: ", "invalid: "]
                    .iter()
                    .any(|p| reason.starts_with(p)),
                "NEG-ERR {reason:?} for {} bytes {:02x?}",
                input.len(),
                &input[..input.len().min(64)]
            );
        }
    }
}
