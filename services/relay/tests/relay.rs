//! The relay over real WebSockets, in local mode (in-process SQLite) and split mode (orly-db
//! process over gRPC): every scenario runs in both.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{note, now, Mode, RawClient, TestRelay};
use nostr::{EventBuilder, JsonUtil, Keys, Kind, Tag};
use nostr_sdk::{Client, Filter};
use orly::{Limits, RelayConfig};
use serde_json::{json, Value};

macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Mode::Local).await })*
        }
        mod split {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Mode::Split).await })*
        }
    };
}

both_modes!(
    nostr_sdk_publishes_queries_and_subscribes,
    nip11_lists_what_the_relay_does,
    filters_order_and_limits,
    count_counts,
    replaceable_events_and_deletions,
    bad_input_is_refused_and_changes_nothing,
    auth_and_protected_events,
    too_many_subscriptions_and_close,
    a_pipelining_publisher_gets_every_ok_before_its_next_req,
    publishers_share_the_relays_events_in_flight_budget,
);

async fn stored_count(client: &mut RawClient) -> u64 {
    client.send_json(json!(["COUNT", "n", {}])).await;
    let v = client.recv_type("COUNT").await;
    v[2]["count"].as_u64().unwrap()
}

async fn nostr_sdk_publishes_queries_and_subscribes(mode: Mode) {
    let relay = TestRelay::start(mode).await;
    let keys = Keys::generate();
    let client = Client::new(keys.clone());
    client.add_relay(relay.url()).await.unwrap();
    client.connect().await;

    let listener = Client::default();
    listener.add_relay(relay.url()).await.unwrap();
    listener.connect().await;
    let mut notifications = listener.notifications();
    listener
        .subscribe(
            Filter::new().author(keys.public_key()).kind(Kind::TextNote),
            None,
        )
        .await
        .unwrap();

    for i in 0..3 {
        let out = client
            .send_event_builder(EventBuilder::text_note(format!("hello {i}")))
            .await
            .unwrap();
        assert!(out.failed.is_empty(), "publish failed: {:?}", out.failed);
    }
    let events = client
        .fetch_events(
            Filter::new().author(keys.public_key()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(events.len(), 3);

    // The listener sees the three notes live.
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen < 3 {
        let n = tokio::time::timeout_at(deadline, notifications.recv())
            .await
            .expect("live events arrive")
            .unwrap();
        if let nostr_sdk::RelayPoolNotification::Event { event, .. } = n {
            assert_eq!(event.pubkey, keys.public_key());
            seen += 1;
        }
    }
    client.disconnect().await;
    listener.disconnect().await;
}

/// A plain HTTP GET over a socket, so the test depends on no HTTP client crate.
async fn http_get(addr: std::net::SocketAddr, path: &str, accept: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

async fn nip11_lists_what_the_relay_does(mode: Mode) {
    let relay = TestRelay::start(mode).await;
    let (status, head, body) = http_get(relay.running.addr, "/", "application/nostr+json").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/nostr+json"));
    assert!(head.contains("access-control-allow-origin: *"));
    let doc: Value = serde_json::from_str(&body).unwrap();
    let nips: Vec<u64> = doc["supported_nips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(nips, vec![1, 9, 11, 40, 42, 45, 70]);
    assert_eq!(doc["limitation"]["max_limit"], 5000);
    assert_eq!(doc["limitation"]["max_subscriptions"], 20);
    assert_eq!(doc["limitation"]["auth_required"], false);
    let pubkey = doc["pubkey"].as_str().expect("identity pubkey listed");
    assert_eq!(pubkey.len(), 64);
    // The identity is stable: asked again (and in a new process of the same store) it is the same.
    let (_, _, again) = http_get(relay.running.addr, "/", "application/nostr+json").await;
    let again: Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["pubkey"], doc["pubkey"]);

    let (status, _, body) = http_get(relay.running.addr, "/", "text/html").await;
    assert_eq!(status, 200);
    assert!(body.contains("Nostr relay"));
    let (status, _, _) = http_get(relay.running.addr, "/readyz", "*/*").await;
    assert_eq!(status, 200);
    let (status, _, body) = http_get(relay.running.addr, "/metrics", "*/*").await;
    assert_eq!(status, 200, "{body}");
}

async fn filters_order_and_limits(mode: Mode) {
    let relay = TestRelay::start(mode).await;
    let mut c = RawClient::connect(&relay.url()).await;
    let alice = Keys::generate();
    let bob = Keys::generate();
    let base = now() - 1000;
    let mut ids = Vec::new();
    for i in 0..10u64 {
        let e = note(&alice, &format!("a{i}"), base + i);
        assert_eq!(c.publish(&e).await[2], true);
        ids.push(e.id.to_hex());
    }
    let tagged = EventBuilder::text_note("tagged")
        .tags([
            Tag::parse(["t", "orly"]).unwrap(),
            Tag::public_key(alice.public_key()),
        ])
        .custom_created_at(nostr::Timestamp::from(base + 100))
        .sign_with_keys(&bob)
        .unwrap();
    assert_eq!(c.publish(&tagged).await[2], true);

    // limit keeps the newest, ordered by created_at descending.
    let got = c
        .req(
            "a",
            &[json!({"authors": [alice.public_key().to_hex()], "limit": 3})],
        )
        .await
        .unwrap();
    let contents: Vec<&str> = got.iter().map(|e| e["content"].as_str().unwrap()).collect();
    assert_eq!(contents, vec!["a9", "a8", "a7"]);

    // since/until are inclusive.
    let got = c
        .req(
            "b",
            &[json!({"kinds": [1], "since": base + 2, "until": base + 4})],
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 3);

    // Tag queries.
    let got = c.req("c", &[json!({"#t": ["orly"]})]).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], tagged.id.to_hex());
    let got = c
        .req("d", &[json!({"#p": [alice.public_key().to_hex()]})])
        .await
        .unwrap();
    assert_eq!(got.len(), 1);

    // ids; several filters are OR'd, each with its own limit.
    let got = c
        .req("e", &[json!({"ids": [ids[0], ids[1]]})])
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    let got = c
        .req(
            "f",
            &[
                json!({"authors": [alice.public_key().to_hex()], "limit": 2}),
                json!({"authors": [bob.public_key().to_hex()]}),
            ],
        )
        .await
        .unwrap();
    let contents: Vec<&str> = got.iter().map(|e| e["content"].as_str().unwrap()).collect();
    assert_eq!(contents, vec!["tagged", "a9", "a8"]);

    // A huge limit is clamped to max_limit (NIP-11), a nonsensical one refused.
    let got = c
        .req("g", &[json!({"limit": 1_000_000_000_000u64})])
        .await
        .unwrap();
    assert_eq!(got.len(), 11);
    let closed = c.req("h", &[json!({"limit": -5})]).await.unwrap_err();
    assert!(
        closed[2].as_str().unwrap().starts_with("invalid:"),
        "{closed}"
    );

    // Live: a new matching event arrives after EOSE, a non-matching one does not.
    let live = c
        .req(
            "live",
            &[json!({"authors": [bob.public_key().to_hex()], "limit": 0})],
        )
        .await
        .unwrap();
    assert!(live.is_empty());
    let mut other = RawClient::connect(&relay.url()).await;
    let e = note(&alice, "not for live", now());
    assert_eq!(other.publish(&e).await[2], true);
    let e = note(&bob, "for live", now());
    assert_eq!(other.publish(&e).await[2], true);
    // Earlier subscriptions are still open too; only "live" matters here, and it must see
    // bob's note and not alice's.
    let v = loop {
        let v = c.recv_type("EVENT").await;
        if v[1] == "live" {
            break v;
        }
    };
    assert_eq!(v[2]["content"], "for live");
}

async fn count_counts(mode: Mode) {
    let relay = TestRelay::start(mode).await;
    let mut c = RawClient::connect(&relay.url()).await;
    let keys = Keys::generate();
    for i in 0..5 {
        c.publish(&note(&keys, &format!("{i}"), now() - i)).await;
    }
    c.send_json(json!(["COUNT", "c1", {"authors": [keys.public_key().to_hex()]}]))
        .await;
    let v = c.recv_type("COUNT").await;
    assert_eq!(v, json!(["COUNT", "c1", {"count": 5}]));
    c.send_json(json!(["COUNT", "c2", {"kinds": [7]}])).await;
    assert_eq!(c.recv_type("COUNT").await[2]["count"], 0);
}

async fn replaceable_events_and_deletions(mode: Mode) {
    let relay = TestRelay::start(mode).await;
    let mut c = RawClient::connect(&relay.url()).await;
    let keys = Keys::generate();
    let other = Keys::generate();
    let t = now() - 100;

    // Replaceable: the newer kind 0 replaces the older; an older one is refused.
    let m1 = EventBuilder::new(Kind::Metadata, r#"{"name":"one"}"#)
        .custom_created_at(nostr::Timestamp::from(t))
        .sign_with_keys(&keys)
        .unwrap();
    let m2 = EventBuilder::new(Kind::Metadata, r#"{"name":"two"}"#)
        .custom_created_at(nostr::Timestamp::from(t + 1))
        .sign_with_keys(&keys)
        .unwrap();
    assert_eq!(c.publish(&m1).await[2], true);
    assert_eq!(c.publish(&m2).await[2], true);
    let ok = c.publish(&m1).await;
    assert_eq!(ok[2], false, "{ok}");
    let got = c
        .req(
            "m",
            &[json!({"kinds": [0], "authors": [keys.public_key().to_hex()]})],
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], m2.id.to_hex());

    // Addressable: keyed by the d tag.
    let a = |d: &str, content: &str, at: u64| {
        EventBuilder::new(Kind::from(30023), content)
            .tags([Tag::identifier(d)])
            .custom_created_at(nostr::Timestamp::from(at))
            .sign_with_keys(&keys)
            .unwrap()
    };
    c.publish(&a("x", "x1", t)).await;
    c.publish(&a("x", "x2", t + 5)).await;
    c.publish(&a("y", "y1", t)).await;
    let got = c.req("a", &[json!({"kinds": [30023]})]).await.unwrap();
    let mut contents: Vec<&str> = got.iter().map(|e| e["content"].as_str().unwrap()).collect();
    contents.sort();
    assert_eq!(contents, vec!["x2", "y1"]);

    // Deletion by the author removes the event.
    let victim = note(&keys, "delete me", t);
    c.publish(&victim).await;
    let del = EventBuilder::new(Kind::EventDeletion, "")
        .tags([Tag::event(victim.id)])
        .sign_with_keys(&keys)
        .unwrap();
    assert_eq!(c.publish(&del).await[2], true);
    let got = c
        .req("d", &[json!({"ids": [victim.id.to_hex()]})])
        .await
        .unwrap();
    assert!(got.is_empty());
    // Sent again, the deleted event is refused.
    let ok = c.publish(&victim).await;
    assert_eq!(ok[2], false);
    assert!(ok[3].as_str().unwrap().starts_with("blocked:"), "{ok}");

    // NIP-09 as written: a deletion's targets by other authors are ignored (the deletion
    // itself is kept, as any event), so someone else's deletion deletes nothing.
    let keep = note(&keys, "keep me", t);
    c.publish(&keep).await;
    let forged = EventBuilder::new(Kind::EventDeletion, "")
        .tags([Tag::event(keep.id)])
        .sign_with_keys(&other)
        .unwrap();
    let before = stored_count(&mut c).await;
    let ok = c.publish(&forged).await;
    assert_eq!(ok[2], true, "{ok}");
    assert_eq!(stored_count(&mut c).await, before + 1);
    let got = c
        .req("k", &[json!({"ids": [keep.id.to_hex()]})])
        .await
        .unwrap();
    assert_eq!(got.len(), 1);

    // Expired events are refused; ephemeral ones are relayed, never stored.
    let expired = EventBuilder::text_note("old news")
        .tags([Tag::expiration(nostr::Timestamp::from(now() - 10))])
        .sign_with_keys(&keys)
        .unwrap();
    let ok = c.publish(&expired).await;
    assert_eq!(ok[2], false, "{ok}");
    let eph = EventBuilder::new(Kind::from(20001), "fleeting")
        .sign_with_keys(&keys)
        .unwrap();
    assert_eq!(c.publish(&eph).await[2], true);
    let got = c.req("e", &[json!({"kinds": [20001]})]).await.unwrap();
    assert!(got.is_empty());
}

async fn bad_input_is_refused_and_changes_nothing(mode: Mode) {
    let relay = TestRelay::start(mode).await;
    let mut c = RawClient::connect(&relay.url()).await;
    let keys = Keys::generate();
    c.publish(&note(&keys, "baseline", now())).await;
    let before = stored_count(&mut c).await;

    let notice = |v: &Value| {
        assert_eq!(v[0], "NOTICE", "{v}");
        assert!(v[1].as_str().unwrap().starts_with("invalid:"), "{v}");
    };
    for bad in [
        "this is not json",
        "{\"a\":1}",
        "[]",
        "[42]",
        r#"["HELLO","x"]"#,
        r#"["EVENT"]"#,
        r#"["EVENT",{"id":"zz"}]"#,
        r#"["CLOSE"]"#,
    ] {
        c.send(bad).await;
        notice(&c.recv().await);
    }
    // REQ without filters, with a non-object filter, with a bad subscription id.
    c.send(r#"["REQ","s1"]"#).await;
    let v = c.recv().await;
    assert_eq!(v[0], "CLOSED", "{v}");
    assert!(v[2].as_str().unwrap().starts_with("invalid:"));
    c.send(r#"["REQ","s2",[1,2]]"#).await;
    let v = c.recv().await;
    assert_eq!(v[0], "CLOSED", "{v}");
    assert!(v[2].as_str().unwrap().starts_with("invalid:"));
    c.send(format!(r#"["REQ","{}",{{}}]"#, "x".repeat(65)))
        .await;
    notice(&c.recv().await);
    // Too many filters.
    let many: Vec<Value> = (0..11).map(|_| json!({})).collect();
    let closed = c.req("many", &many).await.unwrap_err();
    assert!(
        closed[2].as_str().unwrap().starts_with("invalid:"),
        "{closed}"
    );

    // Bad id and bad signature.
    let good = note(&keys, "original", now());
    let mut v: Value = serde_json::from_str(&good.as_json()).unwrap();
    v["content"] = json!("tampered");
    c.send(format!(r#"["EVENT",{v}]"#)).await;
    let ok = c.recv_type("OK").await;
    assert_eq!(ok[2], false);
    assert!(ok[3].as_str().unwrap().starts_with("invalid:"), "{ok}");
    let mut v: Value = serde_json::from_str(&good.as_json()).unwrap();
    let sig = v["sig"].as_str().unwrap();
    let flipped = format!(
        "{}{}",
        if sig.starts_with('0') { "1" } else { "0" },
        &sig[1..]
    );
    v["sig"] = json!(flipped);
    c.send(format!(r#"["EVENT",{v}]"#)).await;
    let ok = c.recv_type("OK").await;
    assert_eq!(ok[2], false);
    assert_eq!(ok[3], "invalid: bad signature");

    // Oversized message: refused with the event's id.
    let big = note(&keys, &"x".repeat(200_000), now());
    let ok = c.publish(&big).await;
    assert_eq!(ok[1], big.id.to_hex());
    assert_eq!(ok[2], false);
    assert!(ok[3].as_str().unwrap().starts_with("invalid:"), "{ok}");

    // Too far in the future.
    let future = note(&keys, "from the future", now() + 3600);
    let ok = c.publish(&future).await;
    assert_eq!(ok[2], false);
    assert!(ok[3].as_str().unwrap().starts_with("invalid:"), "{ok}");

    // Binary frames.
    use futures::SinkExt;
    c.ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        vec![1, 2, 3].into(),
    ))
    .await
    .unwrap();
    notice(&c.recv().await);

    // Nothing above was stored, and the connection still works.
    assert_eq!(stored_count(&mut c).await, before);
    assert_eq!(c.publish(&note(&keys, "still here", now())).await[2], true);
}

async fn auth_and_protected_events(mode: Mode) {
    let relay = TestRelay::start(mode).await;
    let mut c = RawClient::connect(&relay.url()).await;
    let keys = Keys::generate();
    let protected = EventBuilder::text_note("only from me")
        .tags([Tag::protected()])
        .sign_with_keys(&keys)
        .unwrap();
    let ok = c.publish(&protected).await;
    assert_eq!(ok[2], false);
    assert!(
        ok[3].as_str().unwrap().starts_with("auth-required:"),
        "{ok}"
    );
    assert!(c
        .req("p", &[json!({"ids": [protected.id.to_hex()]})])
        .await
        .unwrap()
        .is_empty());

    // A wrong challenge is refused.
    let challenge = c.challenge.clone().unwrap();
    let auth = |challenge: &str, k: &Keys| {
        EventBuilder::new(Kind::Authentication, "")
            .tags([
                Tag::parse(["relay", &relay.url()]).unwrap(),
                Tag::parse(["challenge", challenge]).unwrap(),
            ])
            .sign_with_keys(k)
            .unwrap()
    };
    c.send(format!(r#"["AUTH",{}]"#, auth("wrong", &keys).as_json()))
        .await;
    let ok = c.recv_type("OK").await;
    assert_eq!(ok[2], false);
    assert!(ok[3].as_str().unwrap().starts_with("invalid:"));

    // Authenticated as someone else: still refused.
    let other = Keys::generate();
    c.send(format!(
        r#"["AUTH",{}]"#,
        auth(&challenge, &other).as_json()
    ))
    .await;
    assert_eq!(c.recv_type("OK").await[2], true);
    let ok = c.publish(&protected).await;
    assert_eq!(ok[2], false, "{ok}");

    // Authenticated as the author: accepted.
    c.send(format!(r#"["AUTH",{}]"#, auth(&challenge, &keys).as_json()))
        .await;
    assert_eq!(c.recv_type("OK").await[2], true);
    assert_eq!(c.publish(&protected).await[2], true);

    // nostr-sdk authenticates by itself when the relay asks, and reads the protected event.
    let client = Client::new(keys.clone());
    client.add_relay(relay.url()).await.unwrap();
    client.connect().await;
    let mine = EventBuilder::text_note("protected via sdk")
        .tags([Tag::protected()])
        .sign_with_keys(&keys)
        .unwrap();
    let out = client.send_event(&mine).await.unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    let got = client
        .fetch_events(Filter::new().id(mine.id), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    client.disconnect().await;
}

async fn too_many_subscriptions_and_close(mode: Mode) {
    let relay = TestRelay::start(mode).await;
    let mut c = RawClient::connect(&relay.url()).await;
    for i in 0..20 {
        c.req(&format!("s{i}"), &[json!({"kinds": [1], "limit": 0})])
            .await
            .unwrap();
    }
    // Re-using an open id replaces it and is allowed.
    c.req("s0", &[json!({"kinds": [2], "limit": 0})])
        .await
        .unwrap();
    let closed = c.req("s20", &[json!({"kinds": [1]})]).await.unwrap_err();
    assert!(
        closed[2].as_str().unwrap().starts_with("blocked:"),
        "{closed}"
    );
    // Closing one frees a slot.
    c.send_json(json!(["CLOSE", "s1"])).await;
    c.req("s20", &[json!({"kinds": [1], "limit": 0})])
        .await
        .unwrap();
}

/// A publisher that sends 1,500 EVENTs without waiting (more than the relay takes in flight
/// per connection: the rest waits in the socket) gets an OK for each, and a REQ it sends after
/// them sees all of them: the REQ waits until they are answered.
async fn a_pipelining_publisher_gets_every_ok_before_its_next_req(mode: Mode) {
    let relay = TestRelay::start(mode).await;
    let keys = Keys::generate();
    let base = now() - 10_000;
    let events: Vec<nostr::Event> = (0..1500u64)
        .map(|i| note(&keys, &format!("pipelined {i}"), base + i))
        .collect();
    let mut c = common::RawClient::connect(&relay.url()).await;
    for e in &events {
        c.send(format!(r#"["EVENT",{}]"#, e.as_json())).await;
    }
    c.send_json(json!(["REQ", "all", {"authors": [keys.public_key().to_hex()], "limit": 5000}]))
        .await;
    let mut oks = std::collections::HashSet::new();
    let mut got = 0;
    loop {
        let v = c.recv().await;
        match v[0].as_str() {
            Some("OK") => {
                assert_eq!(v[2], true, "refused: {v}");
                assert_eq!(got, 0, "an OK after the REQ's first event: {v}");
                assert!(
                    oks.insert(v[1].as_str().unwrap().to_string()),
                    "two OKs: {v}"
                );
            }
            Some("EVENT") => got += 1,
            Some("EOSE") => break,
            Some("AUTH") => {}
            _ => panic!("unexpected {v}"),
        }
    }
    assert_eq!(oks.len(), events.len());
    assert!(events.iter().all(|e| oks.contains(&e.id.to_hex())));
    assert_eq!(got, events.len(), "the REQ sees every event sent before it");
}

/// Four publishers pipelining EVENTs through a relay whose total EVENT budget is one
/// connection's: each EVENT takes its bytes from the shared budget while in flight (seen
/// taken while they publish), every EVENT still gets its OK (connections wait their turn,
/// none is starved or stuck), and the budget is whole again afterwards.
async fn publishers_share_the_relays_events_in_flight_budget(mode: Mode) {
    let limits = Limits {
        max_message_size: 4096,
        max_event_bytes_in_flight: 1,
        max_event_bytes_in_flight_total: 1,
        ..Limits::default()
    };
    let total = limits.event_budget_total();
    assert_eq!(
        total,
        4096 + orly::config::EVENT_OVERHEAD,
        "clamped up to one message"
    );
    let relay = TestRelay::start_with(
        mode,
        RelayConfig {
            limits,
            ..RelayConfig::default()
        },
    )
    .await;
    let budget = relay.running.relay.events_in_flight.clone();
    assert_eq!(budget.available_permits(), total);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (budget, done) = (budget.clone(), done.clone());
        tokio::spawn(async move {
            let mut least = usize::MAX;
            while !done.load(Ordering::Relaxed) {
                least = least.min(budget.available_permits());
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            least
        })
    };
    let base = now() - 10_000;
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let url = relay.url();
            tokio::spawn(async move {
                let keys = Keys::generate();
                let mut c = RawClient::connect(&url).await;
                let events: Vec<nostr::Event> = (0..300u64)
                    .map(|i| note(&keys, &format!("shared budget {p} {i}"), base + i))
                    .collect();
                for e in &events {
                    c.send(format!(r#"["EVENT",{}]"#, e.as_json())).await;
                }
                let mut oks = std::collections::HashSet::new();
                while oks.len() < events.len() {
                    let v = c.recv().await;
                    if v[0] == "OK" {
                        assert_eq!(v[2], true, "refused: {v}");
                        oks.insert(v[1].as_str().unwrap().to_string());
                    }
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let least = sampler.await.unwrap();
    assert!(
        least < total,
        "EVENTs in flight took from the shared budget"
    );
    let mut c = RawClient::connect(&relay.url()).await;
    assert_eq!(stored_count(&mut c).await, 1200);
    // Permits go back as each OK is sent; the last may still be on their way.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while budget.available_permits() != total && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        budget.available_permits(),
        total,
        "every permit is returned"
    );
}
