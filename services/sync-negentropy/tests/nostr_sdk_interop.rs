//! Interoperability with a third-party NIP-77 client: `nostr-sdk`'s negentropy sync against
//! the engine, served by the tiny WebSocket relay of `common` (the real relay wiring comes with
//! the relay's NEG-* routing). The exact have/need sets nostr-sdk reports are asserted, and the
//! events it transfers land where they should.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use nostr::{Event, EventId, Filter, Keys, Kind};
use nostr_sdk::prelude::{
    Client, MemoryDatabase, MemoryDatabaseOptions, NostrDatabase, SyncDirection, SyncOptions,
};

async fn client_with(events: &[&[Event]]) -> Client {
    let db = MemoryDatabase::with_opts(MemoryDatabaseOptions {
        events: true,
        max_events: None,
    });
    for es in events {
        for e in *es {
            db.save_event(e).await.unwrap();
        }
    }
    Client::builder().database(db).build()
}

fn set(ids: &std::collections::HashSet<EventId>) -> BTreeSet<EventId> {
    ids.iter().copied().collect()
}

struct Scenario {
    shared: Vec<Event>,
    client_only: Vec<Event>,
    relay_only: Vec<Event>,
}

fn scenario(shared: usize, client_only: usize, relay_only: usize) -> Scenario {
    let keys = Keys::generate();
    Scenario {
        shared: events(&keys, 1, shared, 1_700_000_000),
        client_only: events(&keys, 1, client_only, 1_700_000_033),
        relay_only: events(&keys, 1, relay_only, 1_700_000_077),
    }
}

async fn run(
    s: &Scenario,
    direction: SyncDirection,
) -> (
    nostr_sdk::prelude::Reconciliation,
    BTreeSet<EventId>,
    BTreeSet<EventId>,
) {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir, "relay.db").await;
    save(&store, &s.shared).await;
    save(&store, &s.relay_only).await;
    let peer = spawn_peer(store.clone(), PeerMode::Honest).await;

    let client = client_with(&[&s.shared, &s.client_only]).await;
    client.add_relay(&peer.url).await.unwrap();
    client.connect().await;
    let opts = SyncOptions::new()
        .direction(direction)
        .initial_timeout(Duration::from_secs(5));
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        client.sync(Filter::new().kind(Kind::TextNote), &opts),
    )
    .await
    .expect("nostr-sdk sync finishes")
    .unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    let client_ids: BTreeSet<EventId> = client
        .database()
        .query(Filter::new())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let relay_ids = stored_ids(&store).await;
    client.shutdown().await;
    (out.val.clone(), client_ids, relay_ids)
}

#[tokio::test]
async fn nostr_sdk_client_with_extra_events_uploads_them() {
    let s = scenario(600, 40, 0);
    let (rec, client_ids, relay_ids) = run(&s, SyncDirection::Up).await;
    assert_eq!(set(&rec.local), ids(&[&s.client_only]));
    assert!(rec.remote.is_empty());
    assert_eq!(set(&rec.sent), ids(&[&s.client_only]));
    assert_eq!(relay_ids, ids(&[&s.shared, &s.client_only]));
    assert_eq!(client_ids, relay_ids);
}

#[tokio::test]
async fn nostr_sdk_client_downloads_what_the_relay_has_extra() {
    let s = scenario(600, 0, 55);
    let (rec, client_ids, relay_ids) = run(&s, SyncDirection::Down).await;
    assert!(rec.local.is_empty());
    assert_eq!(set(&rec.remote), ids(&[&s.relay_only]));
    assert_eq!(set(&rec.received), ids(&[&s.relay_only]));
    assert_eq!(client_ids, ids(&[&s.shared, &s.relay_only]));
    assert_eq!(relay_ids, client_ids);
}

#[tokio::test]
async fn nostr_sdk_both_directions_converge() {
    let s = scenario(2000, 45, 65);
    let (rec, client_ids, relay_ids) = run(&s, SyncDirection::Both).await;
    assert_eq!(set(&rec.local), ids(&[&s.client_only]));
    assert_eq!(set(&rec.remote), ids(&[&s.relay_only]));
    assert_eq!(set(&rec.sent), ids(&[&s.client_only]));
    assert_eq!(set(&rec.received), ids(&[&s.relay_only]));
    let all = ids(&[&s.shared, &s.client_only, &s.relay_only]);
    assert_eq!(client_ids, all);
    assert_eq!(relay_ids, all);
}
