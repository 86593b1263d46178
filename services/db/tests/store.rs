//! Behaviour tests of the `EventStore` backends, written once and run against SQLite (a temp
//! dir) and PostgreSQL (a fresh database per test on the server at `ORLY_TEST_PG_URL`; see
//! `scripts/test-postgres.sh`). Without `ORLY_TEST_PG_URL` the PostgreSQL tests say so and pass.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nostr::JsonUtil;
use nostr::{Event, EventBuilder, EventId, Filter, Keys, Kind, SingleLetterTag, Tag, Timestamp};
use orly_db::postgres::PostgresStore;
use orly_db::sqlite::SqliteStore;
use orly_db::{EventStore, Feed, RawEvent, SaveOutcome};
use sqlx::Connection;

const T0: u64 = 1_700_000_000;

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

enum Backend {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres {
        admin_url: String,
        db: String,
        url: String,
    },
}

struct Fx {
    store: Arc<dyn EventStore>,
    backend: Backend,
}

impl Fx {
    async fn sqlite() -> Fx {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("orly.db");
        let store = SqliteStore::open(&path).await.expect("open sqlite");
        Fx {
            store: Arc::new(store),
            backend: Backend::Sqlite { _dir: dir, path },
        }
    }

    async fn postgres() -> Option<Fx> {
        let Ok(admin_url) = std::env::var("ORLY_TEST_PG_URL") else {
            // CI sets ORLY_TEST_REQUIRE_PG so that a missing server fails instead of passing.
            assert!(
                std::env::var_os("ORLY_TEST_REQUIRE_PG").is_none(),
                "ORLY_TEST_REQUIRE_PG is set but ORLY_TEST_PG_URL is not: start PostgreSQL with scripts/test-postgres.sh"
            );
            println!("skipping PostgreSQL store tests: ORLY_TEST_PG_URL is not set");
            return None;
        };
        let db = format!("orly_test_{:016x}", rand::random::<u64>());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("connect admin");
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut admin)
            .await
            .expect("create database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &db);
        let store = PostgresStore::connect(&url, 8)
            .await
            .expect("connect postgres");
        Some(Fx {
            store: Arc::new(store),
            backend: Backend::Postgres { admin_url, db, url },
        })
    }

    /// A second, independent handle on the same database (as after a restart).
    async fn reopen(&self) -> Arc<dyn EventStore> {
        match &self.backend {
            Backend::Sqlite { path, .. } => {
                Arc::new(SqliteStore::open(path).await.expect("reopen"))
            }
            Backend::Postgres { url, .. } => {
                Arc::new(PostgresStore::connect(url, 4).await.expect("reconnect"))
            }
        }
    }

    async fn finish(self) {
        let Fx { store, backend } = self;
        drop(store);
        if let Backend::Postgres { admin_url, db, .. } = backend {
            if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
        }
    }
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{db}?{q}"),
        None => format!("{host_part}/{db}"),
    }
}

macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fx = super::Fx::sqlite().await;
                    super::$name(&fx).await;
                    fx.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(fx) = super::Fx::postgres().await else { return };
                    super::$name(&fx).await;
                    fx.finish().await;
                }
            )*
        }
    };
}

store_tests!(
    save_and_duplicate,
    filter_fields,
    tag_queries,
    limit_and_ordering,
    or_filters_with_separate_limits,
    replaceable_events,
    addressable_events,
    deletion_by_e_tag,
    deletion_by_a_tag,
    expiration,
    ephemeral_refused,
    serials,
    feed_replays_then_follows_in_serial_order,
    ephemeral_events_are_live_only,
    queries_report_their_snapshot_serial_and_keep_the_stored_json,
    negentropy_items,
    markers,
    leases,
    fenced_markers_and_the_database_clock,
    identity_secret_persists,
    count,
    concurrent_saves,
    one_batch_gives_each_event_its_own_outcome,
    search_is_unsupported,
    admin_delete,
    large_filter_lists,
    authors_sharing_a_key_prefix_stay_apart,
);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn ev(keys: &Keys, kind: u16, content: &str, created_at: u64, tags: Vec<Tag>) -> Event {
    EventBuilder::new(Kind::from(kind), content)
        .tags(tags)
        .custom_created_at(Timestamp::from(created_at))
        .sign_with_keys(keys)
        .expect("sign")
}

fn tag(parts: &[&str]) -> Tag {
    Tag::parse(parts.iter().copied()).expect("tag")
}

async fn stored(store: &dyn EventStore, e: &Event) -> u64 {
    match store.save_event(e).await.expect("save") {
        SaveOutcome::Stored { serial } => serial,
        other => panic!("expected Stored for {}, got {other:?}", e.id),
    }
}

async fn rejected(store: &dyn EventStore, e: &Event, prefix: &str) {
    match store.save_event(e).await.expect("save") {
        SaveOutcome::Rejected(msg) => {
            assert!(msg.starts_with(prefix), "expected {prefix}..., got {msg:?}")
        }
        other => panic!("expected Rejected({prefix}...), got {other:?}"),
    }
}

async fn ids(store: &dyn EventStore, filters: Vec<Filter>) -> Vec<EventId> {
    store
        .query(&filters)
        .await
        .expect("query")
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// Expected order: created_at descending, then id ascending.
fn ordered(events: &[&Event]) -> Vec<EventId> {
    let mut v: Vec<&Event> = events.to_vec();
    v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
    v.into_iter().map(|e| e.id).collect()
}

fn now() -> u64 {
    Timestamp::now().as_secs()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

async fn save_and_duplicate(fx: &Fx) {
    let s = fx.store.as_ref();
    s.ping().await.expect("ping");
    let k = Keys::generate();
    let e = ev(&k, 1, "hello", T0, vec![]);
    let serial = stored(s, &e).await;
    assert_eq!(s.save_event(&e).await.unwrap(), SaveOutcome::Duplicate);
    assert_eq!(s.serial_by_id(&e.id).await.unwrap(), Some(serial));
    let got = s.fetch_by_ids(&[e.id, EventId::all_zeros()]).await.unwrap();
    assert_eq!(got, vec![e.clone()]);
    assert_eq!(ids(s, vec![Filter::new()]).await, vec![e.id]);
    assert_eq!(s.serial_by_id(&EventId::all_zeros()).await.unwrap(), None);
}

async fn filter_fields(fx: &Fx) {
    let s = fx.store.as_ref();
    let (a, b) = (Keys::generate(), Keys::generate());
    let e1 = ev(&a, 1, "a1", T0 + 10, vec![]);
    let e2 = ev(&a, 7, "a7", T0 + 20, vec![]);
    let e3 = ev(&b, 1, "b1", T0 + 30, vec![]);
    let e4 = ev(&b, 42, "b42", T0 + 40, vec![]);
    for e in [&e1, &e2, &e3, &e4] {
        stored(s, e).await;
    }
    assert_eq!(ids(s, vec![Filter::new().id(e2.id)]).await, vec![e2.id]);
    assert_eq!(
        ids(s, vec![Filter::new().ids([e1.id, e4.id])]).await,
        ordered(&[&e1, &e4])
    );
    assert_eq!(
        ids(s, vec![Filter::new().author(a.public_key())]).await,
        ordered(&[&e1, &e2])
    );
    assert_eq!(
        ids(
            s,
            vec![Filter::new().authors([a.public_key(), b.public_key()])]
        )
        .await,
        ordered(&[&e1, &e2, &e3, &e4])
    );
    assert_eq!(
        ids(s, vec![Filter::new().kind(Kind::from(1))]).await,
        ordered(&[&e1, &e3])
    );
    assert_eq!(
        ids(
            s,
            vec![Filter::new().kinds([Kind::from(7), Kind::from(42)])]
        )
        .await,
        ordered(&[&e2, &e4])
    );
    // since / until are inclusive
    assert_eq!(
        ids(s, vec![Filter::new().since(Timestamp::from(T0 + 20))]).await,
        ordered(&[&e2, &e3, &e4])
    );
    assert_eq!(
        ids(s, vec![Filter::new().until(Timestamp::from(T0 + 20))]).await,
        ordered(&[&e1, &e2])
    );
    assert_eq!(
        ids(
            s,
            vec![Filter::new()
                .since(Timestamp::from(T0 + 20))
                .until(Timestamp::from(T0 + 30))]
        )
        .await,
        ordered(&[&e2, &e3])
    );
    assert!(ids(
        s,
        vec![Filter::new()
            .since(Timestamp::from(T0 + 31))
            .until(Timestamp::from(T0 + 30))]
    )
    .await
    .is_empty());
    // all fields together
    assert_eq!(
        ids(
            s,
            vec![Filter::new()
                .author(b.public_key())
                .kind(Kind::from(1))
                .since(Timestamp::from(T0))
                .until(Timestamp::from(T0 + 100))
                .id(e3.id)]
        )
        .await,
        vec![e3.id]
    );
    assert!(ids(
        s,
        vec![Filter::new().author(a.public_key()).kind(Kind::from(42))]
    )
    .await
    .is_empty());
}

async fn tag_queries(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    let (p1, p2) = (Keys::generate().public_key(), Keys::generate().public_key());
    let e1 = ev(
        &k,
        1,
        "1",
        T0 + 1,
        vec![Tag::public_key(p1), Tag::hashtag("nostr")],
    );
    let e2 = ev(
        &k,
        1,
        "2",
        T0 + 2,
        vec![Tag::public_key(p2), Tag::hashtag("rust")],
    );
    let e3 = ev(
        &k,
        1,
        "3",
        T0 + 3,
        vec![Tag::public_key(p1), Tag::public_key(p2)],
    );
    let e4 = ev(
        &k,
        1,
        "4",
        T0 + 4,
        vec![tag(&["L", "label"]), tag(&["t", "nostr", "x"])],
    );
    for e in [&e1, &e2, &e3, &e4] {
        stored(s, e).await;
    }
    let p = SingleLetterTag::lowercase(nostr::Alphabet::P);
    let t = SingleLetterTag::lowercase(nostr::Alphabet::T);
    let upper_l = SingleLetterTag::uppercase(nostr::Alphabet::L);
    assert_eq!(
        ids(s, vec![Filter::new().custom_tag(p, p1.to_hex())]).await,
        ordered(&[&e1, &e3])
    );
    // any value matches
    assert_eq!(
        ids(
            s,
            vec![Filter::new().custom_tags(p, [p1.to_hex(), p2.to_hex()])]
        )
        .await,
        ordered(&[&e1, &e2, &e3])
    );
    // tag keys are AND'd
    assert_eq!(
        ids(
            s,
            vec![Filter::new()
                .custom_tag(p, p1.to_hex())
                .custom_tag(t, "nostr")]
        )
        .await,
        vec![e1.id]
    );
    assert_eq!(
        ids(s, vec![Filter::new().hashtag("nostr")]).await,
        ordered(&[&e1, &e4])
    );
    assert_eq!(
        ids(s, vec![Filter::new().custom_tag(upper_l, "label")]).await,
        vec![e4.id]
    );
    // only the first value is indexed
    assert!(ids(s, vec![Filter::new().custom_tag(t, "x")])
        .await
        .is_empty());
    // with other fields
    assert_eq!(
        ids(
            s,
            vec![Filter::new()
                .custom_tag(p, p2.to_hex())
                .author(k.public_key())
                .since(Timestamp::from(T0 + 3))]
        )
        .await,
        vec![e3.id]
    );
    assert!(ids(
        s,
        vec![Filter::new().custom_tag(p, p2.to_hex()).kind(Kind::from(7))]
    )
    .await
    .is_empty());
    // a tag filter with no values matches nothing
    let mut f = Filter::new();
    f.generic_tags.insert(p, Default::default());
    assert!(ids(s, vec![f]).await.is_empty());
}

async fn limit_and_ordering(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    let mut all = Vec::new();
    for i in 0..10u64 {
        // pairs share created_at, so the id decides
        all.push(ev(&k, 1, &format!("n{i}"), T0 + i / 2, vec![]));
    }
    for e in &all {
        stored(s, e).await;
    }
    let refs: Vec<&Event> = all.iter().collect();
    let expected = ordered(&refs);
    assert_eq!(ids(s, vec![Filter::new()]).await, expected);
    assert_eq!(
        ids(s, vec![Filter::new().limit(3)]).await,
        expected[..3].to_vec()
    );
    assert_eq!(
        ids(s, vec![Filter::new().limit(1)]).await,
        expected[..1].to_vec()
    );
    assert!(ids(s, vec![Filter::new().limit(0)]).await.is_empty());
    assert_eq!(ids(s, vec![Filter::new().limit(100)]).await, expected);
    assert_eq!(
        ids(
            s,
            vec![Filter::new()
                .author(k.public_key())
                .kind(Kind::from(1))
                .limit(5)]
        )
        .await,
        expected[..5].to_vec()
    );
    // the limit keeps the newest matching events even with until
    let until = ids(
        s,
        vec![Filter::new().until(Timestamp::from(T0 + 2)).limit(2)],
    )
    .await;
    let older: Vec<&Event> = refs
        .iter()
        .copied()
        .filter(|e| e.created_at.as_secs() <= T0 + 2)
        .collect();
    assert_eq!(until, ordered(&older)[..2].to_vec());
}

async fn or_filters_with_separate_limits(fx: &Fx) {
    let s = fx.store.as_ref();
    let (a, b) = (Keys::generate(), Keys::generate());
    let mut ea = Vec::new();
    let mut eb = Vec::new();
    for i in 0..5u64 {
        ea.push(ev(&a, 1, &format!("a{i}"), T0 + i * 2, vec![]));
        eb.push(ev(&b, 1, &format!("b{i}"), T0 + i * 2 + 1, vec![]));
    }
    for e in ea.iter().chain(eb.iter()) {
        stored(s, e).await;
    }
    let got = ids(
        s,
        vec![
            Filter::new().author(a.public_key()).limit(2),
            Filter::new().author(b.public_key()).limit(3),
        ],
    )
    .await;
    assert_eq!(got, ordered(&[&ea[4], &ea[3], &eb[4], &eb[3], &eb[2]]));
    // overlapping filters are deduplicated
    let got = ids(
        s,
        vec![
            Filter::new().author(a.public_key()),
            Filter::new().kind(Kind::from(1)).limit(1),
        ],
    )
    .await;
    let mut exp: Vec<&Event> = ea.iter().collect();
    exp.push(&eb[4]);
    assert_eq!(got, ordered(&exp));
    let got = ids(
        s,
        vec![Filter::new().id(ea[0].id), Filter::new().id(ea[0].id)],
    )
    .await;
    assert_eq!(got, vec![ea[0].id]);
}

async fn replaceable_events(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    let v1 = ev(&k, 0, "{\"name\":\"v1\"}", T0 + 10, vec![]);
    let v2 = ev(&k, 0, "{\"name\":\"v2\"}", T0 + 20, vec![]);
    let old = ev(&k, 0, "{\"name\":\"old\"}", T0 + 5, vec![]);
    stored(s, &v1).await;
    stored(s, &v2).await;
    let f = || vec![Filter::new().author(k.public_key()).kind(Kind::from(0))];
    assert_eq!(ids(s, f()).await, vec![v2.id]);
    rejected(s, &old, "duplicate:").await;
    rejected(s, &v1, "duplicate:").await; // older, already replaced
    assert_eq!(ids(s, f()).await, vec![v2.id]);
    // equal created_at: the lowest id wins
    let (x, y) = (
        ev(&k, 0, "{\"name\":\"x\"}", T0 + 30, vec![]),
        ev(&k, 0, "{\"name\":\"y\"}", T0 + 30, vec![]),
    );
    let (low, high) = if x.id < y.id { (x, y) } else { (y, x) };
    stored(s, &high).await;
    stored(s, &low).await;
    assert_eq!(ids(s, f()).await, vec![low.id]);
    rejected(s, &high, "duplicate:").await;
    // other kinds and authors are independent
    let other = Keys::generate();
    let o = ev(&other, 0, "{}", T0, vec![]);
    stored(s, &o).await;
    let list = ev(&k, 10_002, "", T0, vec![]);
    stored(s, &list).await;
    let c3a = ev(&k, 3, "", T0 + 1, vec![]);
    let c3b = ev(&k, 3, "", T0 + 2, vec![]);
    stored(s, &c3a).await;
    stored(s, &c3b).await;
    assert_eq!(
        ids(s, vec![Filter::new().author(k.public_key())]).await,
        ordered(&[&low, &list, &c3b])
    );
    assert_eq!(
        s.fetch_by_ids(&[v1.id, v2.id, c3a.id]).await.unwrap(),
        vec![]
    );
}

async fn addressable_events(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    let a1 = ev(&k, 30_023, "a1", T0 + 1, vec![Tag::identifier("a")]);
    let a2 = ev(&k, 30_023, "a2", T0 + 2, vec![Tag::identifier("a")]);
    let b1 = ev(&k, 30_023, "b1", T0 + 1, vec![Tag::identifier("b")]);
    let nod = ev(&k, 30_023, "no d", T0 + 1, vec![]);
    let nod2 = ev(&k, 30_023, "empty d", T0 + 2, vec![Tag::identifier("")]);
    let other_kind = ev(&k, 30_024, "other", T0 + 1, vec![Tag::identifier("a")]);
    for e in [&a1, &b1, &nod, &other_kind] {
        stored(s, e).await;
    }
    stored(s, &a2).await;
    stored(s, &nod2).await; // no d tag and an empty d tag are the same address
    let all = ids(s, vec![Filter::new().author(k.public_key())]).await;
    assert_eq!(all, ordered(&[&a2, &b1, &nod2, &other_kind]));
    rejected(s, &a1, "duplicate:").await;
    let d = SingleLetterTag::lowercase(nostr::Alphabet::D);
    assert_eq!(
        ids(
            s,
            vec![Filter::new().kind(Kind::from(30_023)).custom_tag(d, "a")]
        )
        .await,
        vec![a2.id]
    );
    // tie-break
    let x = ev(&k, 30_023, "x", T0 + 9, vec![Tag::identifier("t")]);
    let y = ev(&k, 30_023, "y", T0 + 9, vec![Tag::identifier("t")]);
    let (low, high) = if x.id < y.id { (x, y) } else { (y, x) };
    stored(s, &low).await;
    rejected(s, &high, "duplicate:").await;
}

async fn deletion_by_e_tag(fx: &Fx) {
    let s = fx.store.as_ref();
    let (a, b) = (Keys::generate(), Keys::generate());
    let target = ev(&a, 1, "to delete", T0, vec![]);
    let keep = ev(&a, 1, "keep", T0 + 1, vec![]);
    let theirs = ev(&b, 1, "b's", T0 + 2, vec![]);
    for e in [&target, &keep, &theirs] {
        stored(s, e).await;
    }
    // NIP-09: a deletion naming someone else's event is stored, and removes only its own
    // author's targets (it used to be refused whole)
    let mixed = ev(
        &b,
        5,
        "",
        T0 + 5,
        vec![Tag::event(target.id), Tag::event(theirs.id)],
    );
    stored(s, &mixed).await;
    assert_eq!(
        s.fetch_by_ids(&[target.id]).await.unwrap().len(),
        1,
        "a's event survives b's deletion"
    );
    assert!(s.fetch_by_ids(&[theirs.id]).await.unwrap().is_empty());
    // ...and does not block a's event from arriving again elsewhere
    assert_eq!(s.save_event(&target).await.unwrap(), SaveOutcome::Duplicate);

    let del = ev(&a, 5, "", T0 + 5, vec![Tag::event(target.id)]);
    stored(s, &del).await;
    assert!(s.fetch_by_ids(&[target.id]).await.unwrap().is_empty());
    assert_eq!(
        ids(s, vec![Filter::new().author(a.public_key())]).await,
        ordered(&[&del, &keep])
    );
    // the deleted event is refused when it arrives again
    rejected(s, &target, "blocked:").await;
    // deleting an event that is not stored yet blocks it when it arrives
    let later = ev(&a, 1, "later", T0 + 3, vec![]);
    let pre = ev(&a, 5, "", T0 + 6, vec![Tag::event(later.id)]);
    stored(s, &pre).await;
    rejected(s, &later, "blocked:").await;
    // ...but only for its author's events
    let bs = ev(&b, 1, "b again", T0 + 4, vec![]);
    let pre_b = ev(&a, 5, "", T0 + 7, vec![Tag::event(bs.id)]);
    stored(s, &pre_b).await;
    stored(s, &bs).await;
    // deleting a deletion has no effect
    let undo = ev(&a, 5, "", T0 + 8, vec![Tag::event(del.id)]);
    stored(s, &undo).await;
    assert_eq!(s.fetch_by_ids(&[del.id]).await.unwrap().len(), 1);
    rejected(s, &target, "blocked:").await;
    // a deletion is a regular event: duplicates are duplicates
    assert_eq!(s.save_event(&del).await.unwrap(), SaveOutcome::Duplicate);
}

async fn deletion_by_a_tag(fx: &Fx) {
    let s = fx.store.as_ref();
    let (a, b) = (Keys::generate(), Keys::generate());
    let addr = format!("30023:{}:post", a.public_key().to_hex());
    let v1 = ev(&a, 30_023, "v1", T0 + 10, vec![Tag::identifier("post")]);
    let other = ev(&a, 30_023, "other", T0 + 10, vec![Tag::identifier("other")]);
    stored(s, &v1).await;
    stored(s, &other).await;
    // someone else's `a` target is ignored, the rest of the deletion stands (NIP-09)
    let b_post = ev(&b, 30_023, "b's", T0 + 10, vec![Tag::identifier("post")]);
    stored(s, &b_post).await;
    let b_addr = format!("30023:{}:post", b.public_key().to_hex());
    let foreign = ev(
        &b,
        5,
        "",
        T0 + 20,
        vec![tag(&["a", &addr]), tag(&["a", &b_addr])],
    );
    stored(s, &foreign).await;
    assert_eq!(s.fetch_by_ids(&[v1.id]).await.unwrap().len(), 1);
    assert!(s.fetch_by_ids(&[b_post.id]).await.unwrap().is_empty());

    let del = ev(&a, 5, "", T0 + 20, vec![tag(&["a", &addr])]);
    stored(s, &del).await;
    assert!(s.fetch_by_ids(&[v1.id]).await.unwrap().is_empty());
    assert_eq!(s.fetch_by_ids(&[other.id]).await.unwrap().len(), 1);
    // versions up to the deletion's created_at are refused; newer ones are accepted
    rejected(s, &v1, "blocked:").await;
    let v_eq = ev(&a, 30_023, "at", T0 + 20, vec![Tag::identifier("post")]);
    rejected(s, &v_eq, "blocked:").await;
    let v_new = ev(&a, 30_023, "new", T0 + 21, vec![Tag::identifier("post")]);
    stored(s, &v_new).await;
    // replaceable kinds via `a` with an empty d
    let meta = ev(&a, 0, "{}", T0 + 10, vec![]);
    stored(s, &meta).await;
    let del0 = ev(
        &a,
        5,
        "",
        T0 + 30,
        vec![tag(&["a", &format!("0:{}:", a.public_key().to_hex())])],
    );
    stored(s, &del0).await;
    assert!(s.fetch_by_ids(&[meta.id]).await.unwrap().is_empty());
    rejected(s, &meta, "blocked:").await;
}

async fn expiration(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    let past = ev(
        &k,
        1,
        "past",
        T0,
        vec![Tag::expiration(Timestamp::from(now() - 10))],
    );
    rejected(s, &past, "invalid:").await;
    let soon = ev(
        &k,
        1,
        "soon",
        now(),
        vec![Tag::expiration(Timestamp::from(now() + 2))],
    );
    let later = ev(
        &k,
        1,
        "later",
        now(),
        vec![Tag::expiration(Timestamp::from(now() + 3600))],
    );
    stored(s, &soon).await;
    stored(s, &later).await;
    let f = || vec![Filter::new().author(k.public_key())];
    assert_eq!(ids(s, f()).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(ids(s, f()).await, vec![later.id]);
    assert!(s.fetch_by_ids(&[soon.id]).await.unwrap().is_empty());
    assert_eq!(s.count(&f()).await.unwrap(), 1);
    assert_eq!(s.delete_expired().await.unwrap(), 1);
    assert_eq!(s.serial_by_id(&soon.id).await.unwrap(), None);
    assert_eq!(s.delete_expired().await.unwrap(), 0);
}

async fn ephemeral_refused(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    let e = ev(&k, 20_001, "ephemeral", T0, vec![]);
    rejected(s, &e, "invalid:").await;
    assert!(ids(s, vec![Filter::new()]).await.is_empty());
    assert_eq!(s.latest_serial().await.unwrap(), 0);
}

async fn serials(fx: &Fx) {
    let s = fx.store.as_ref();
    assert_eq!(s.latest_serial().await.unwrap(), 0);
    let k = Keys::generate();
    let evs: Vec<Event> = (0..6)
        .map(|i| ev(&k, 1, &format!("{i}"), T0 + 100 - i, vec![]))
        .collect();
    let mut serials = Vec::new();
    for e in &evs {
        serials.push(stored(s, e).await);
    }
    assert!(serials.windows(2).all(|w| w[0] < w[1]), "{serials:?}");
    assert_eq!(s.latest_serial().await.unwrap(), serials[5]);

    let range = s
        .ids_by_serial_range(serials[1], serials[4], 100)
        .await
        .unwrap();
    assert_eq!(
        range.iter().map(|r| r.serial).collect::<Vec<_>>(),
        serials[1..=4].to_vec()
    );
    assert_eq!(range[0].id, evs[1].id);
    assert_eq!(range[0].pubkey, k.public_key());
    assert_eq!(range[0].created_at, evs[1].created_at);
    assert_eq!(range[0].kind, 1);
    let limited = s.ids_by_serial_range(0, u64::MAX, 2).await.unwrap();
    assert_eq!(
        limited.iter().map(|r| r.serial).collect::<Vec<_>>(),
        serials[..2].to_vec()
    );
    assert!(s
        .ids_by_serial_range(serials[4], serials[1], 10)
        .await
        .unwrap()
        .is_empty());

    let fetched = s
        .fetch_by_serials(&[serials[3], serials[0], 999_999])
        .await
        .unwrap();
    let mut fetched_ids: Vec<(u64, EventId)> =
        fetched.into_iter().map(|(s, e)| (s, e.id)).collect();
    fetched_ids.sort();
    assert_eq!(
        fetched_ids,
        vec![(serials[0], evs[0].id), (serials[3], evs[3].id)]
    );

    // a serial is never reused, and the latest serial does not go back
    assert!(s.delete_event(&evs[5].id).await.unwrap());
    assert_eq!(s.latest_serial().await.unwrap(), serials[5]);
    let next = stored(s, &ev(&k, 1, "next", T0, vec![])).await;
    assert!(next > serials[5]);
    assert_eq!(s.latest_serial().await.unwrap(), next);
    // a refused event takes no serial
    rejected(s, &ev(&k, 20_000, "x", T0, vec![]), "invalid:").await;
    let after = stored(s, &ev(&k, 1, "after", T0, vec![])).await;
    assert!(after > next);
}

/// The next feed item, or a panic after a generous wait.
async fn next_item(feed: &mut Feed) -> std::sync::Arc<RawEvent> {
    tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .expect("a feed item in time")
        .expect("the feed is open")
}

async fn feed_replays_then_follows_in_serial_order(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    let first: Vec<Event> = (0..3)
        .map(|i| ev(&k, 1, &format!("old {i}"), T0 + i, vec![]))
        .collect();
    let mut serials = Vec::new();
    for e in &first {
        serials.push(stored(s, e).await);
    }
    // Watching from the first serial replays the two after it, then goes live.
    let mut feed = s.watch(serials[0]);
    for (i, want) in serials[1..].iter().enumerate() {
        let got = next_item(&mut feed).await;
        assert_eq!(got.serial, *want);
        assert_eq!(got.event_id(), first[i + 1].id);
        assert_eq!(
            &*got.json,
            first[i + 1].as_json(),
            "the stored JSON, byte for byte"
        );
    }
    // Live: concurrent saves arrive once each, in serial order.
    let live: Vec<Event> = (0..40)
        .map(|i| ev(&k, 1, &format!("live {i}"), T0 + 100 + i, vec![]))
        .collect();
    let saves = futures::future::join_all(live.iter().map(|e| s.save_event(e))).await;
    let mut want: Vec<u64> = saves
        .into_iter()
        .map(|o| match o.unwrap() {
            SaveOutcome::Stored { serial } => serial,
            other => panic!("{other:?}"),
        })
        .collect();
    want.sort();
    let mut got = Vec::new();
    for _ in 0..want.len() {
        got.push(next_item(&mut feed).await.serial);
    }
    assert_eq!(got, want);
    // A second handle on the same database (a restart, or another replica on PostgreSQL)
    // replays from any serial.
    let again = fx.reopen().await;
    let mut from_start = again.watch(0);
    assert_eq!(next_item(&mut from_start).await.serial, serials[0]);
}

async fn ephemeral_events_are_live_only(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    // One published before the watch starts (a probe shows it went through this process's
    // feed — over PostgreSQL that happens when the notification arrives) is not replayed.
    let mut probe = s.watch(s.latest_serial().await.unwrap());
    let before = ev(&k, 24_133, "before anyone watches", T0, vec![]);
    s.publish_ephemeral(RawEvent::from_event(0, &before))
        .await
        .unwrap();
    assert_eq!(next_item(&mut probe).await.event_id(), before.id);
    let mut feed = s.watch(s.latest_serial().await.unwrap());
    let e = ev(
        &k,
        24_133,
        "request",
        T0,
        vec![tag(&["p", &"a".repeat(64)])],
    );
    s.publish_ephemeral(RawEvent::from_event(0, &e))
        .await
        .unwrap();
    let big = ev(&k, 24_133, &"x".repeat(20_000), T0, vec![]);
    s.publish_ephemeral(RawEvent::from_event(0, &big))
        .await
        .unwrap();
    let got = next_item(&mut feed).await;
    assert!(got.is_ephemeral());
    assert_eq!(got.event_id(), e.id);
    assert_eq!(&*got.json, e.as_json());
    // (over PostgreSQL's NOTIFY payload limit: carried through a table)
    assert_eq!(next_item(&mut feed).await.event_id(), big.id);
    // Never stored.
    assert!(s.fetch_by_ids(&[e.id, before.id]).await.unwrap().is_empty());
}

async fn queries_report_their_snapshot_serial_and_keep_the_stored_json(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    let a = ev(&k, 1, "a \"quoted\" \u{1F600}", T0, vec![]);
    let sa = stored(s, &a).await;
    let q = s
        .query_stream(&[Filter::new().author(k.public_key())])
        .await
        .unwrap();
    // Stored after the query started: not in its answer, and above its serial.
    let b = ev(&k, 1, "b", T0 + 1, vec![]);
    let sb = stored(s, &b).await;
    assert_eq!(q.serial, sa);
    let rows: Vec<RawEvent> = q.events.map(|r| r.unwrap()).collect().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].serial, sa);
    assert_eq!(&*rows[0].json, a.as_json());
    assert_eq!(rows[0].kind, 1);
    assert_eq!(rows[0].pubkey, k.public_key().to_bytes());
    let q2 = s
        .query_stream(&[Filter::new().author(k.public_key())])
        .await
        .unwrap();
    assert_eq!(q2.serial, sb);
    // A filter that can match nothing still reports the serial.
    let none = s
        .query_stream(&[Filter::new().search("unsupported")])
        .await
        .unwrap();
    assert_eq!(none.serial, sb);
    // The JSON given at save is what is served, byte for byte.
    let c = ev(&k, 1, "c", T0 + 2, vec![]);
    let spaced = serde_json::to_string_pretty(
        &serde_json::from_str::<serde_json::Value>(&c.as_json()).unwrap(),
    )
    .unwrap();
    let sc = match s.save_json(&c, &spaced).await.unwrap() {
        SaveOutcome::Stored { serial } => serial,
        other => panic!("{other:?}"),
    };
    let got = s.events_by_serial_range(sc, sc, 1).await.unwrap();
    assert_eq!(&*got[0].json, spaced);
}

async fn negentropy_items(fx: &Fx) {
    let s = fx.store.as_ref();
    let (a, b) = (Keys::generate(), Keys::generate());
    let mut evs = Vec::new();
    for i in 0..6u64 {
        let e = ev(
            if i % 2 == 0 { &a } else { &b },
            1,
            &format!("{i}"),
            T0 + i / 2,
            vec![],
        );
        stored(s, &e).await;
        evs.push(e);
    }
    let items = s.negentropy_items(&[Filter::new()]).await.unwrap();
    let mut exp: Vec<(Timestamp, EventId)> = evs.iter().map(|e| (e.created_at, e.id)).collect();
    exp.sort();
    assert_eq!(items, exp);
    let items = s
        .negentropy_items(&[
            Filter::new().author(a.public_key()),
            Filter::new().id(evs[1].id),
        ])
        .await
        .unwrap();
    let mut exp: Vec<(Timestamp, EventId)> = evs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0 || *i == 1)
        .map(|(_, e)| (e.created_at, e.id))
        .collect();
    exp.sort();
    assert_eq!(items, exp);
}

async fn markers(fx: &Fx) {
    let s = fx.store.as_ref();
    assert_eq!(s.get_marker("sync/a").await.unwrap(), None);
    s.set_marker("sync/a", b"1").await.unwrap();
    s.set_marker("sync/b", &[0, 255, 7]).await.unwrap();
    s.set_marker("other", b"x").await.unwrap();
    s.set_marker("sync/a", b"2").await.unwrap();
    assert_eq!(s.get_marker("sync/a").await.unwrap(), Some(b"2".to_vec()));
    assert_eq!(
        s.list_markers("sync/").await.unwrap(),
        vec![
            ("sync/a".to_string(), b"2".to_vec()),
            ("sync/b".to_string(), vec![0, 255, 7])
        ]
    );
    assert_eq!(s.list_markers("").await.unwrap().len(), 3);
    assert!(s.list_markers("nope").await.unwrap().is_empty());
    s.delete_marker("sync/a").await.unwrap();
    s.delete_marker("missing").await.unwrap();
    assert_eq!(s.get_marker("sync/a").await.unwrap(), None);
    assert_eq!(s.list_markers("sync/").await.unwrap().len(), 1);
}

async fn leases(fx: &Fx) {
    let s = fx.store.as_ref();
    let a = s.acquire_lease("leader", "A", 60_000).await.unwrap();
    assert!(a.acquired);
    assert_eq!(a.holder, "A");
    assert!(a.remaining_ms > 59_000 && a.remaining_ms <= 60_000, "{a:?}");
    let b = s.acquire_lease("leader", "B", 60_000).await.unwrap();
    assert!(!b.acquired);
    assert_eq!(b.holder, "A");
    assert_eq!(b.expires_at_ms, a.expires_at_ms);
    // renewal by the holder
    tokio::time::sleep(Duration::from_millis(5)).await;
    let a2 = s.acquire_lease("leader", "A", 60_000).await.unwrap();
    assert!(a2.acquired);
    assert!(a2.expires_at_ms > a.expires_at_ms);
    // other leases are independent
    assert!(
        s.acquire_lease("other", "B", 60_000)
            .await
            .unwrap()
            .acquired
    );
    // release by a non-holder does nothing; by the holder frees it
    s.release_lease("leader", "B").await.unwrap();
    assert!(
        !s.acquire_lease("leader", "B", 60_000)
            .await
            .unwrap()
            .acquired
    );
    s.release_lease("leader", "A").await.unwrap();
    assert!(
        s.acquire_lease("leader", "B", 60_000)
            .await
            .unwrap()
            .acquired
    );
    // an expired lease can be taken
    assert!(s.acquire_lease("short", "A", 20).await.unwrap().acquired);
    assert!(!s.acquire_lease("short", "B", 20).await.unwrap().acquired);
    tokio::time::sleep(Duration::from_millis(40)).await;
    let b = s.acquire_lease("short", "B", 60_000).await.unwrap();
    assert!(b.acquired);
    assert_eq!(b.holder, "B");
    // concurrent contenders: exactly one wins
    let mut tasks = Vec::new();
    for i in 0..8 {
        let st = fx.store.clone();
        tasks.push(tokio::spawn(async move {
            st.acquire_lease("race", &format!("h{i}"), 60_000)
                .await
                .unwrap()
                .acquired
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
}

async fn fenced_markers_and_the_database_clock(fx: &Fx) {
    let s = fx.store.as_ref();
    let clock = s.clock_ms().await.unwrap();
    let local = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // The database runs on this machine in tests: its clock agrees with ours.
    assert!((clock - local).abs() < 5_000, "db {clock} vs local {local}");
    let lease = "distributed:lease:peer";
    // Nobody holds the lease: a fenced write is refused and changes nothing.
    assert!(!s.set_marker_fenced("k", b"x", lease, "A").await.unwrap());
    assert_eq!(s.get_marker("k").await.unwrap(), None);
    assert!(s.acquire_lease(lease, "A", 60_000).await.unwrap().acquired);
    assert!(s.set_marker_fenced("k", b"a1", lease, "A").await.unwrap());
    assert!(!s.set_marker_fenced("k", b"b1", lease, "B").await.unwrap());
    assert_eq!(
        s.get_marker("k").await.unwrap().as_deref(),
        Some(&b"a1"[..])
    );
    // A lapses; B takes over and writes; the deposed A can no longer move the value back.
    assert!(s.acquire_lease("short", "A", 50).await.unwrap().acquired);
    assert!(s.set_marker_fenced("k2", b"a", "short", "A").await.unwrap());
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(!s
        .set_marker_fenced("k2", b"late", "short", "A")
        .await
        .unwrap());
    let b = s.acquire_lease("short", "B", 60_000).await.unwrap();
    assert!(b.acquired, "{b:?}");
    assert!(s.set_marker_fenced("k2", b"b", "short", "B").await.unwrap());
    assert!(!s
        .set_marker_fenced("k2", b"a-again", "short", "A")
        .await
        .unwrap());
    assert_eq!(
        s.get_marker("k2").await.unwrap().as_deref(),
        Some(&b"b"[..])
    );
    // A lease held by another reports the time it has left, not ours.
    let seen = s.acquire_lease("short", "A", 60_000).await.unwrap();
    assert!(
        !seen.acquired && seen.holder == "B" && seen.remaining_ms > 50_000,
        "{seen:?}"
    );
}

async fn identity_secret_persists(fx: &Fx) {
    let first = fx.store.relay_identity_secret().await.unwrap();
    assert!(nostr::SecretKey::from_slice(&first).is_ok());
    assert_eq!(fx.store.relay_identity_secret().await.unwrap(), first);
    let reopened = fx.reopen().await;
    assert_eq!(reopened.relay_identity_secret().await.unwrap(), first);
    // events written before are visible after reopening too
    let k = Keys::generate();
    let e = ev(&k, 1, "persist", T0, vec![]);
    stored(fx.store.as_ref(), &e).await;
    assert_eq!(reopened.fetch_by_ids(&[e.id]).await.unwrap().len(), 1);
}

async fn count(fx: &Fx) {
    let s = fx.store.as_ref();
    let (a, b) = (Keys::generate(), Keys::generate());
    for i in 0..5u64 {
        stored(s, &ev(&a, 1, &format!("a{i}"), T0 + i, vec![])).await;
    }
    for i in 0..3u64 {
        stored(s, &ev(&b, 7, &format!("b{i}"), T0 + i, vec![])).await;
    }
    assert_eq!(s.count(&[Filter::new()]).await.unwrap(), 8);
    assert_eq!(
        s.count(&[Filter::new().author(a.public_key()).limit(1)])
            .await
            .unwrap(),
        5
    );
    assert_eq!(
        s.count(&[
            Filter::new().author(a.public_key()),
            Filter::new().kind(Kind::from(1))
        ])
        .await
        .unwrap(),
        5
    );
    assert_eq!(
        s.count(&[
            Filter::new().author(a.public_key()),
            Filter::new().author(b.public_key())
        ])
        .await
        .unwrap(),
        8
    );
    assert_eq!(
        s.count(&[Filter::new().since(Timestamp::from(T0 + 3))])
            .await
            .unwrap(),
        2
    );
    assert_eq!(s.count(&[]).await.unwrap(), 0);
}

/// Saves sent together are committed as one batch by the writer: copies within the batch,
/// events stored before and events their author deleted must each get their own outcome,
/// and the stored ones their tags.
async fn one_batch_gives_each_event_its_own_outcome(fx: &Fx) {
    let s = fx.store.as_ref();
    let (a, b) = (Keys::generate(), Keys::generate());
    let old = ev(&a, 1, "stored before", T0, vec![]);
    stored(s, &old).await;
    let gone = ev(&a, 1, "deleted before it arrives", T0 + 1, vec![]);
    stored(s, &ev(&a, 5, "", T0 + 2, vec![Tag::event(gone.id)])).await;
    let fresh: Vec<Event> = (0..50)
        .map(|i| {
            let p = if i % 2 == 0 { &a } else { &b };
            ev(
                &b,
                1,
                &format!("fresh {i}"),
                T0 + 10 + i,
                vec![Tag::public_key(p.public_key()), Tag::hashtag("batch")],
            )
        })
        .collect();
    // Interleaved: fresh, its copy, the stored one, the deleted one, …
    let mut sent: Vec<&Event> = Vec::new();
    for (i, e) in fresh.iter().enumerate() {
        sent.push(e);
        if i % 5 == 0 {
            sent.push(e);
            sent.push(&old);
            sent.push(&gone);
        }
    }
    let outcomes = futures::future::join_all(sent.iter().map(|e| s.save_event(e))).await;
    let mut stored_once = HashMap::new();
    for (e, out) in sent.iter().zip(outcomes) {
        match out.unwrap() {
            SaveOutcome::Stored { serial } => {
                assert!(
                    stored_once.insert(e.id, serial).is_none(),
                    "{} stored twice",
                    e.id
                );
            }
            SaveOutcome::Duplicate => {
                assert!(e.id == old.id || fresh.iter().any(|f| f.id == e.id))
            }
            SaveOutcome::Rejected(msg) => {
                assert_eq!(e.id, gone.id, "{msg}");
                assert!(msg.starts_with("blocked:"), "{msg}");
            }
        }
    }
    assert_eq!(
        stored_once.len(),
        fresh.len(),
        "every fresh event stored once"
    );
    assert!(fresh.iter().all(|f| stored_once.contains_key(&f.id)));
    let tagged = ids(s, vec![Filter::new().hashtag("batch")]).await;
    assert_eq!(tagged.len(), fresh.len());
    let to_a = ids(s, vec![Filter::new().pubkey(a.public_key())]).await;
    assert_eq!(to_a.len(), fresh.len() / 2);
    assert!(s.fetch_by_ids(&[gone.id]).await.unwrap().is_empty());
}

async fn concurrent_saves(fx: &Fx) {
    let keys: Vec<Keys> = (0..8).map(|_| Keys::generate()).collect();
    let mut tasks = Vec::new();
    for (ki, k) in keys.iter().enumerate() {
        for i in 0..40u64 {
            let st = fx.store.clone();
            let e = ev(
                k,
                1,
                &format!("{ki}-{i}"),
                T0 + i,
                vec![Tag::hashtag("load")],
            );
            tasks.push(tokio::spawn(async move {
                let serial = match st.save_event(&e).await.unwrap() {
                    SaveOutcome::Stored { serial } => serial,
                    other => panic!("{other:?}"),
                };
                (serial, e.id)
            }));
        }
    }
    let mut serials = HashSet::new();
    let mut all_ids = Vec::new();
    for t in tasks {
        let (serial, id) = t.await.unwrap();
        assert!(serials.insert(serial), "serial {serial} handed out twice");
        all_ids.push(id);
    }
    assert_eq!(serials.len(), 320);
    assert_eq!(
        fx.store.latest_serial().await.unwrap(),
        *serials.iter().max().unwrap()
    );
    let got = fx
        .store
        .query(&[Filter::new().hashtag("load").limit(1000)])
        .await
        .unwrap();
    assert_eq!(got.len(), 320);
    let got_ids: HashSet<EventId> = got.iter().map(|e| e.id).collect();
    assert!(all_ids.iter().all(|id| got_ids.contains(id)));
    let range = fx
        .store
        .ids_by_serial_range(0, u64::MAX, 1000)
        .await
        .unwrap();
    assert_eq!(range.len(), 320);
}

async fn search_is_unsupported(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    stored(s, &ev(&k, 1, "find me", T0, vec![])).await;
    assert!(ids(s, vec![Filter::new().search("find")]).await.is_empty());
    assert_eq!(
        ids(s, vec![Filter::new().search("find"), Filter::new()])
            .await
            .len(),
        1
    );
}

async fn admin_delete(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    let p = Keys::generate().public_key();
    let e = ev(&k, 1, "x", T0, vec![Tag::public_key(p)]);
    stored(s, &e).await;
    assert!(s.delete_event(&e.id).await.unwrap());
    assert!(!s.delete_event(&e.id).await.unwrap());
    let ptag = SingleLetterTag::lowercase(nostr::Alphabet::P);
    assert!(ids(s, vec![Filter::new().custom_tag(ptag, p.to_hex())])
        .await
        .is_empty());
    // an administrative delete does not block the event
    stored(s, &e).await;
}

async fn large_filter_lists(fx: &Fx) {
    let s = fx.store.as_ref();
    let k = Keys::generate();
    let p = Keys::generate().public_key();
    let e = ev(&k, 1, "needle", T0, vec![Tag::public_key(p)]);
    stored(s, &e).await;
    stored(s, &ev(&k, 1, "hay", T0 + 1, vec![])).await;
    let many_ids: Vec<EventId> = (0..600u32)
        .map(|i| ev(&k, 1, &format!("x{i}"), T0, vec![]).id)
        .chain([e.id])
        .collect();
    assert_eq!(
        ids(s, vec![Filter::new().ids(many_ids.clone())]).await,
        vec![e.id]
    );
    let many_authors: Vec<nostr::PublicKey> = (0..600)
        .map(|_| Keys::generate().public_key())
        .chain([k.public_key()])
        .collect();
    assert_eq!(
        ids(s, vec![Filter::new().authors(many_authors).ids(many_ids)]).await,
        vec![e.id]
    );
    let kinds: Vec<Kind> = (1000..1600u16)
        .map(Kind::from)
        .chain([Kind::from(1)])
        .collect();
    assert_eq!(
        ids(
            s,
            vec![Filter::new().kinds(kinds).until(Timestamp::from(T0))]
        )
        .await,
        vec![e.id]
    );
    let ptag = SingleLetterTag::lowercase(nostr::Alphabet::P);
    let values: Vec<String> = (0..600)
        .map(|i| format!("v{i}"))
        .chain([p.to_hex()])
        .collect();
    assert_eq!(
        ids(s, vec![Filter::new().custom_tags(ptag, values)]).await,
        vec![e.id]
    );
    let serials: Vec<u64> = (1..2000).collect();
    assert_eq!(s.fetch_by_serials(&serials).await.unwrap().len(), 2);
}

// ---------------------------------------------------------------------------------------
// Performance (ignored by default):
//   cargo test -p orly-db --release --test store -- --ignored --nocapture perf
// ---------------------------------------------------------------------------------------

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn time_queries(
    store: &Arc<dyn EventStore>,
    name: &str,
    mut make: impl FnMut(usize) -> Filter,
) -> usize {
    let mut times = Vec::new();
    let mut total = 0;
    for i in 0..500 {
        let f = make(i);
        let t = std::time::Instant::now();
        let got = store.query(&[f]).await.unwrap();
        times.push(t.elapsed());
        total += got.len();
    }
    times.sort();
    println!(
        "{name:<14} p50 {:>8.3} ms  p99 {:>8.3} ms  (avg {} results)",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        total / times.len()
    );
    total
}

async fn perf_run(store: Arc<dyn EventStore>, explain: Option<&SqliteStore>) {
    // ORLY_PERF_EVENTS overrides the store size (default 100,000).
    #[allow(non_snake_case)]
    let N: usize = std::env::var("ORLY_PERF_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    const AUTHORS: usize = 1_000;
    let keys: Vec<Keys> = (0..AUTHORS).map(|_| Keys::generate()).collect();
    let pubs: Vec<nostr::PublicKey> = keys.iter().map(|k| k.public_key()).collect();
    let t = std::time::Instant::now();
    let events: Vec<Event> = {
        let mut out = Vec::with_capacity(N);
        let mut rng_state = 0x1234_5678_u64;
        let mut rnd = move || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        for i in 0..N {
            let k = &keys[rnd() as usize % AUTHORS];
            let kind = if i % 10 == 0 { 7 } else { 1 };
            let tags = vec![
                Tag::public_key(pubs[rnd() as usize % AUTHORS]),
                Tag::public_key(pubs[rnd() as usize % AUTHORS]),
                Tag::hashtag(format!("t{}", rnd() % 50)),
            ];
            out.push(ev(
                k,
                kind,
                &format!("event number {i} with some text"),
                T0 + i as u64,
                tags,
            ));
        }
        out
    };
    println!("signed {N} events in {:.1?}", t.elapsed());
    use std::io::Write;
    std::io::stdout().flush().ok();

    // ingest: 8 concurrent clients, each with ORLY_PERF_INFLIGHT saves outstanding (default 1:
    // waiting for each outcome before sending the next)
    let inflight: usize = std::env::var("ORLY_PERF_INFLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let t = std::time::Instant::now();
    let chunks: Vec<Vec<Event>> = events.chunks(N.div_ceil(8)).map(|c| c.to_vec()).collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let st = store.clone();
        tasks.push(tokio::spawn(async move {
            use futures::StreamExt;
            futures::stream::iter(chunk)
                .for_each_concurrent(inflight, |e| {
                    let st = st.clone();
                    async move {
                        st.save_event(&e).await.unwrap();
                    }
                })
                .await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let el = t.elapsed();
    println!(
        "ingest: {N} events, 8 clients x {inflight} in flight, {:.2?} = {:.0} events/s",
        el,
        N as f64 / el.as_secs_f64()
    );

    let by_author = |i: usize| Filter::new().author(pubs[(i * 7) % AUTHORS]).limit(100);
    let by_kind = |i: usize| {
        Filter::new()
            .kind(Kind::from(1))
            .since(Timestamp::from(T0 + (N as u64) - 5_000 - (i as u64 % 1000)))
            .limit(100)
    };
    let p = SingleLetterTag::lowercase(nostr::Alphabet::P);
    let by_p = |i: usize| {
        Filter::new()
            .custom_tag(p, pubs[(i * 13) % AUTHORS].to_hex())
            .limit(100)
    };
    let by_ids = |i: usize| {
        Filter::new()
            .ids((0..20).map(|j| events[(i * 101 + j * 997) % N].id))
            .limit(100)
    };
    if let Some(sq) = explain {
        for (name, f) in [
            ("by author", by_author(0)),
            ("by kind+since", by_kind(0)),
            ("by #p", by_p(0)),
            ("by ids", by_ids(0)),
        ] {
            println!("plan {name}: {:?}", sq.explain(&f).await.unwrap());
        }
    }
    time_queries(&store, "by author", by_author).await;
    time_queries(&store, "by kind+since", by_kind).await;
    time_queries(&store, "by #p", by_p).await;
    time_queries(&store, "by ids", by_ids).await;
    let t = std::time::Instant::now();
    let c = store
        .count(&[Filter::new().kind(Kind::from(1))])
        .await
        .unwrap();
    println!("count kind 1: {c} in {:.2?}", t.elapsed());
    let t = std::time::Instant::now();
    let items = store.negentropy_items(&[Filter::new()]).await.unwrap();
    println!("negentropy items: {} in {:.2?}", items.len(), t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn perf_sqlite_100k() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("orly.db"))
            .await
            .unwrap(),
    );
    let dyn_store: Arc<dyn EventStore> = store.clone();
    perf_run(dyn_store, Some(&store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn perf_postgres_100k() {
    let Some(fx) = Fx::postgres().await else {
        return;
    };
    perf_run(fx.store.clone(), None).await;
    fx.finish().await;
}

/// Regression: under non-stop writes the WAL used to grow without bound, because a PASSIVE
/// checkpoint never caught up with the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_stays_bounded_under_continuous_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orly.db");
    let limit = 1 << 20;
    let store = Arc::new(
        SqliteStore::open_with_wal_limit(&path, limit)
            .await
            .unwrap(),
    );
    let wal = dir.path().join("orly.db-wal");
    let keys = Keys::generate();
    let mut largest = 0u64;
    // Eight writers keep the single SQLite writer busy the whole time.
    for round in 0..40u64 {
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let store = store.clone();
            let keys = keys.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..25u64 {
                    let e = EventBuilder::text_note(format!("{round}-{w}-{i} {}", "x".repeat(400)))
                        .tags([Tag::parse(["t", &format!("tag{i}")]).unwrap()])
                        .sign_with_keys(&keys)
                        .unwrap();
                    store.save_event(&e).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    assert_eq!(store.count(&[Filter::new()]).await.unwrap(), 8000);
    // A little over the limit is fine (writes continue while the check runs); unbounded is not.
    assert!(
        largest < 8 * limit,
        "WAL grew to {largest} bytes (limit {limit})"
    );
}

/// Every filter shape a relay sees, with the index its walk must use (SQLite, PostgreSQL).
fn plan_shapes(
    author: nostr::PublicKey,
    other: nostr::PublicKey,
) -> Vec<(&'static str, Filter, &'static str, &'static str)> {
    vec![
        (
            "ids",
            Filter::new().id(EventId::all_zeros()),
            "sqlite_autoindex_events_1",
            "events_id_key",
        ),
        (
            "author",
            Filter::new().author(author).limit(100),
            "events_author_created",
            "events_pubkey",
        ),
        (
            "authors",
            Filter::new().authors([author, other]).limit(100),
            "events_author_created",
            "events_pubkey",
        ),
        (
            "authors+kinds",
            Filter::new()
                .authors([author, other])
                .kinds([Kind::from(0), Kind::from(3)])
                .limit(100),
            "events_author_kind_created",
            "events_pubkey_kind_created",
        ),
        (
            "#p",
            Filter::new().pubkey(other).limit(100),
            "PRIMARY KEY (name=? AND value=?)",
            "tags_pkey",
        ),
        (
            "#p+kind",
            Filter::new().pubkey(other).kind(Kind::from(1)).limit(100),
            "PRIMARY KEY (name=? AND value=?)",
            "tags_pkey",
        ),
        (
            "#e two values",
            Filter::new()
                .events([EventId::all_zeros(), EventId::from_byte_array([1; 32])])
                .limit(50),
            "PRIMARY KEY (name=? AND value=?)",
            "tags_pkey",
        ),
        (
            "kind+since",
            Filter::new()
                .kind(Kind::from(1))
                .since(Timestamp::from(T0))
                .limit(100),
            "events_kind_created",
            "events_kind_created",
        ),
        (
            "since",
            Filter::new().since(Timestamp::from(T0)).limit(100),
            "events_created",
            "events_created",
        ),
    ]
}

/// A store with enough rows that the planner's choices are the ones a real store gets.
async fn plan_data(store: &dyn EventStore) -> (nostr::PublicKey, nostr::PublicKey) {
    let keys: Vec<Keys> = (0..50).map(|_| Keys::generate()).collect();
    let events: Vec<Event> = (0..3000usize)
        .map(|i| {
            let k = &keys[i % keys.len()];
            let tags = vec![Tag::public_key(keys[(i * 7) % keys.len()].public_key())];
            ev(k, if i % 10 == 0 { 7 } else { 1 }, "x", T0 + i as u64, tags)
        })
        .collect();
    futures::future::join_all(events.iter().map(|e| store.save_event(e))).await;
    (keys[0].public_key(), keys[1].public_key())
}

#[tokio::test]
async fn sqlite_query_plans_walk_one_index_per_shape_and_stop_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("orly.db"))
        .await
        .unwrap();
    let (a, b) = plan_data(&store).await;
    for (name, filter, index, _) in plan_shapes(a, b) {
        let plan = store.explain(&filter).await.unwrap();
        let text = plan.join("\n");
        assert!(text.contains(index), "{name}: expected {index}:\n{text}");
        for (i, line) in plan.iter().enumerate() {
            // No full scan of the events or the tags.
            assert!(
                !line.starts_with("SCAN e") && !line.starts_with("SCAN t"),
                "{name}: full scan:\n{text}"
            );
            // A walk never sorts all it matched: a temp B-tree may sort a walk's bounded
            // output (after `SCAN w<n>` of a merge) or break created_at ties, nothing else.
            if line == "USE TEMP B-TREE FOR ORDER BY" {
                assert!(
                    i > 0 && plan[i - 1].starts_with("SCAN w"),
                    "{name}: sorts before the limit:\n{text}"
                );
            }
        }
    }
}

#[tokio::test]
async fn postgres_query_plans_walk_one_index_per_shape_and_stop_at_the_limit() {
    let Some(fx) = Fx::postgres().await else {
        return;
    };
    let Backend::Postgres { url, .. } = &fx.backend else {
        unreachable!()
    };
    let store = PostgresStore::connect(url, 2).await.unwrap();
    let (a, b) = plan_data(&store).await;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("ANALYZE").execute(&mut conn).await.unwrap();
    for (name, filter, _, index) in plan_shapes(a, b) {
        // (3,000 rows: the small-table plans are switched off to see the large-store one)
        let plan = store.explain(&filter, true).await.unwrap();
        let text = plan.join("\n");
        assert!(text.contains(index), "{name}: expected {index}:\n{text}");
        assert!(
            !text.contains("Seq Scan on events") && !text.contains("Seq Scan on tags"),
            "{name}: full scan:\n{text}"
        );
        if index == "tags_pkey" {
            // Down the tag index in created_at order.
            assert!(text.contains("Backward using tags_pkey"), "{name}:\n{text}");
        }
    }
    drop(store);
    fx.finish().await;
}

/// An event under `pubkey` (a key nobody holds: the store does not check signatures).
fn forged(pubkey: nostr::PublicKey, kind: u16, created_at: u64, content: &str) -> Event {
    let sig = ev(&Keys::generate(), 1, "any", T0, vec![]).sig;
    let (created_at, kind, tags) = (
        Timestamp::from(created_at),
        Kind::from(kind),
        nostr::Tags::new(),
    );
    let id = EventId::new(&pubkey, &created_at, &kind, &tags, content);
    Event::new(id, pubkey, created_at, kind, tags, content, sig)
}

/// SQLite's author indexes hold the first 8 bytes of a pubkey: authors whose keys share
/// them must still get only their own events, by every path a filter on authors takes (one
/// walk per author, per author and kind, a long list inline and as JSON, COUNT).
async fn authors_sharing_a_key_prefix_stay_apart(fx: &Fx) {
    let s = fx.store.as_ref();
    let a = nostr::PublicKey::from_byte_array([7; 32]);
    let mut b = [7u8; 32];
    b[8..].fill(9);
    let b = nostr::PublicKey::from_byte_array(b);
    let mine = forged(a, 1, T0, "a's");
    let theirs = forged(b, 1, T0 + 1, "b's");
    let their_profile = forged(b, 0, T0 + 2, "{}");
    for e in [&mine, &theirs, &their_profile] {
        stored(s, e).await;
    }
    let others = |n: usize| -> Vec<nostr::PublicKey> {
        (0..n)
            .map(|_| Keys::generate().public_key())
            .chain([a])
            .collect()
    };
    for filter in [
        Filter::new().author(a).limit(10),
        Filter::new()
            .author(a)
            .kinds([Kind::from(0), Kind::from(1)])
            .limit(10),
        Filter::new().authors(others(100)).limit(10),
        Filter::new().authors(others(300)).limit(10),
        Filter::new().authors(others(300)).kind(Kind::from(1)),
    ] {
        assert_eq!(
            ids(s, vec![filter.clone()]).await,
            vec![mine.id],
            "{filter:?}"
        );
    }
    assert_eq!(s.count(&[Filter::new().author(a)]).await.unwrap(), 1);
    assert_eq!(s.count(&[Filter::new().author(b)]).await.unwrap(), 2);
    assert_eq!(
        ids(
            s,
            vec![Filter::new().author(b).kind(Kind::from(0)).limit(5)]
        )
        .await,
        vec![their_profile.id]
    );
}
