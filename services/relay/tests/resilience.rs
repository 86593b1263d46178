//! The relay under stress of its surroundings: orly-db going away and coming back, slow
//! readers, silent clients.

mod common;

use std::time::Duration;

use common::{note, now, DbProcess, Mode, RawClient, TestRelay};
use futures::StreamExt;
use nostr::Keys;
use orly::{Limits, RelayConfig};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_relay_answers_error_while_db_is_down_and_recovers() {
    let mut relay = TestRelay::start(Mode::Split).await;
    let mut c = RawClient::connect(&relay.url()).await;
    let keys = Keys::generate();
    let first = note(&keys, "before the outage", now());
    assert_eq!(c.publish(&first).await[2], true);

    let mut db = relay.db.take().unwrap();
    let (port, dir) = (db.addr.port(), db.data_dir.clone());
    db.kill();

    let during = note(&keys, "during the outage", now());
    let ok = c.publish(&during).await;
    assert_eq!(ok[2], false, "{ok}");
    assert!(ok[3].as_str().unwrap().starts_with("error:"), "{ok}");
    let closed = c.req("q", &[json!({"kinds": [1]})]).await.unwrap_err();
    assert!(
        closed[2].as_str().unwrap().starts_with("error:"),
        "{closed}"
    );

    // The relay itself keeps serving: /readyz says not ready, the socket stays open.
    relay.db = Some(DbProcess::start(&dir, port).await);
    // The client's channel reconnects by itself; retry briefly while it does.
    let mut accepted = false;
    for _ in 0..50 {
        let ok = c.publish(&during).await;
        if ok[2] == true {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "relay did not recover after orly-db came back");
    let got = c
        .req("after", &[json!({"authors": [keys.public_key().to_hex()]})])
        .await
        .unwrap();
    assert_eq!(
        got.len(),
        2,
        "the event from before the outage survived too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_disconnected_not_buffered() {
    let config = RelayConfig {
        limits: Limits {
            max_outbound_bytes: 1 << 20,
            max_message_size: 1 << 20,
            ..Limits::default()
        },
        ..RelayConfig::default()
    };
    let relay = TestRelay::start_with(Mode::Local, config).await;
    let mut slow = RawClient::connect(&relay.url()).await;
    slow.req("all", &[json!({"kinds": [1], "limit": 0})])
        .await
        .unwrap();
    assert_eq!(relay.running.relay.connections(), 1);

    // The slow client now stops reading while a publisher floods its subscription.
    let mut publisher = RawClient::connect(&relay.url()).await;
    let keys = Keys::generate();
    let filler = "x".repeat(60_000);
    let mut dropped = false;
    for i in 0..2000 {
        publisher
            .publish(&note(&keys, &format!("{i}{filler}"), now()))
            .await;
        if relay.running.relay.connections() == 1 {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the slow reader was never disconnected");
    // The publisher was never affected.
    assert_eq!(
        publisher.publish(&note(&keys, "still fine", now())).await[2],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_live_ones_kept() {
    let config = RelayConfig {
        limits: Limits {
            ping_interval: Duration::from_secs(1),
            ..Limits::default()
        },
        ..RelayConfig::default()
    };
    let relay = TestRelay::start_with(Mode::Local, config).await;
    // A client that reads (and so answers pings) stays connected.
    let mut live = RawClient::connect(&relay.url()).await;
    // A TCP peer that completes the handshake and then never reads nor answers.
    let (silent, _) = tokio_tungstenite::connect_async(relay.url()).await.unwrap();
    // The relay counts a connection once its task runs, a moment after the client's
    // handshake returns.
    let counted = tokio::time::Instant::now() + Duration::from_secs(5);
    while relay.running.relay.connections() < 2 && tokio::time::Instant::now() < counted {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(relay.running.relay.connections(), 2);

    let reader = tokio::spawn(async move {
        // Reading drives the automatic pong replies.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        while tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(200), live.ws.next()).await;
        }
        live
    });
    let mut closed = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if relay.running.relay.connections() == 1 {
            closed = true;
            break;
        }
    }
    assert!(closed, "the silent connection was not closed");
    let mut live = reader.await.unwrap();
    assert_eq!(relay.running.relay.connections(), 1);
    let keys = Keys::generate();
    assert_eq!(live.publish(&note(&keys, "alive", now())).await[2], true);
    drop(silent);
}
