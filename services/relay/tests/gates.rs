//! Gates on the read side for a relay exposed to anyone: privileged kinds through COUNT and
//! NEG-OPEN, NIP-77 sessions against the subscription limit, the total outbound budget, and
//! the drain a pod runs before it stops.

mod common;

use std::time::Duration;

use common::{Mode, RawClient, TestRelay};
use futures::StreamExt;
use nostr::{EventBuilder, Keys, Kind, Tag};
use orly::{Limits, RelayConfig};
use orly_sync_negentropy::{EngineSettings, NegentropyEngine};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn relay_with_negentropy(config: RelayConfig) -> TestRelay {
    TestRelay::start_built(Mode::Local, config, |b, store| {
        b.negentropy(NegentropyEngine::new(store.clone(), EngineSettings::default()).unwrap())
    })
    .await
}

async fn authed(relay: &TestRelay, keys: &Keys) -> RawClient {
    let mut c = RawClient::connect(&relay.url()).await;
    let challenge = c.challenge.clone().unwrap();
    let auth = EventBuilder::new(Kind::Authentication, "")
        .tags([
            Tag::custom(nostr::TagKind::custom("challenge"), [challenge]),
            Tag::custom(nostr::TagKind::custom("relay"), [relay.url()]),
        ])
        .sign_with_keys(keys)
        .unwrap();
    c.send_json(json!(["AUTH", auth])).await;
    let ok = c.recv_type("OK").await;
    assert_eq!(ok[2], true, "{ok}");
    c
}

async fn count(c: &mut RawClient, filter: serde_json::Value) -> serde_json::Value {
    c.send_json(json!(["COUNT", "c", filter])).await;
    loop {
        let v = c.recv().await;
        if v[0] == "COUNT" || v[0] == "CLOSED" {
            return v;
        }
    }
}

/// An authenticated stranger can neither count nor reconcile DMs to someone else; the
/// parties can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_and_neg_open_keep_privileged_kinds_to_their_parties() {
    let relay = relay_with_negentropy(RelayConfig::default()).await;
    let (alice, bob, eve) = (Keys::generate(), Keys::generate(), Keys::generate());
    let mut a = authed(&relay, &alice).await;
    let dm = EventBuilder::new(Kind::EncryptedDirectMessage, "ciphertext")
        .tags([Tag::public_key(bob.public_key())])
        .sign_with_keys(&alice)
        .unwrap();
    assert_eq!(a.publish(&dm).await[2], true);
    let hello = EventBuilder::text_note("hi bob")
        .tags([Tag::public_key(bob.public_key())])
        .sign_with_keys(&alice)
        .unwrap();
    assert_eq!(a.publish(&hello).await[2], true);
    let bob_hex = bob.public_key().to_hex();

    let mut e = authed(&relay, &eve).await;
    let v = count(&mut e, json!({"kinds": [4], "#p": [bob_hex]})).await;
    assert_eq!(v[2]["count"], 0, "{v}");
    // Without kinds the DM is not counted either; the note is.
    let v = count(&mut e, json!({"#p": [bob_hex]})).await;
    assert_eq!(v[2]["count"], 1, "{v}");
    e.send_json(json!(["NEG-OPEN", "n", {"kinds": [4]}, "6100"]))
        .await;
    let v = e.recv_type("NEG-ERR").await;
    assert!(v[2].as_str().unwrap().starts_with("restricted:"), "{v}");

    // Bob, the recipient, counts his DM; alice, the author, too.
    let mut b = authed(&relay, &bob).await;
    let v = count(&mut b, json!({"kinds": [4], "#p": [bob_hex]})).await;
    assert_eq!(v[2]["count"], 1, "{v}");
    let v = count(
        &mut a,
        json!({"kinds": [4], "authors": [alice.public_key().to_hex()]}),
    )
    .await;
    assert_eq!(v[2]["count"], 1, "{v}");
    b.send_json(json!(["NEG-OPEN", "n", {"kinds": [4], "#p": [bob_hex]}, "6100"]))
        .await;
    let v = b.recv().await;
    assert_eq!(v[0], "NEG-MSG", "{v}");
}

/// NIP-77 sessions count against the subscription limit: past it NEG-OPEN gets `blocked:`;
/// closing a subscription makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negentropy_sessions_count_against_the_subscription_limit() {
    let config = RelayConfig {
        limits: Limits {
            max_subscriptions: 2,
            ..Limits::default()
        },
        ..RelayConfig::default()
    };
    let relay = relay_with_negentropy(config).await;
    let mut c = RawClient::connect(&relay.url()).await;
    c.req("a", &[json!({"kinds": [1], "limit": 0})])
        .await
        .unwrap();
    c.send_json(json!(["NEG-OPEN", "n1", {"kinds": [1]}, "6100"]))
        .await;
    assert_eq!(c.recv().await[0], "NEG-MSG");
    c.send_json(json!(["NEG-OPEN", "n2", {"kinds": [1]}, "6100"]))
        .await;
    let v = c.recv_type("NEG-ERR").await;
    assert!(v[2].as_str().unwrap().starts_with("blocked:"), "{v}");
    // A REQ is refused as well while the session is open.
    let closed = c.req("b", &[json!({"kinds": [1]})]).await.unwrap_err();
    assert!(
        closed[2].as_str().unwrap().starts_with("blocked:"),
        "{closed}"
    );
    c.send_json(json!(["NEG-CLOSE", "n1"])).await;
    c.send_json(json!(["NEG-OPEN", "n2", {"kinds": [1]}, "6100"]))
        .await;
    assert_eq!(c.recv().await[0], "NEG-MSG");
}

/// Past the total outbound budget new REQs are refused with `rate-limited:`; open ones go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_total_budget_new_reqs_are_rate_limited() {
    let config = RelayConfig {
        limits: Limits {
            max_outbound_bytes_total: 1 << 20,
            ..Limits::default()
        },
        ..RelayConfig::default()
    };
    let relay = TestRelay::start_with(Mode::Local, config).await;
    let keys = Keys::generate();
    let mut open = RawClient::connect(&relay.url()).await;
    open.req(
        "live",
        &[json!({"authors": [keys.public_key().to_hex()], "limit": 0})],
    )
    .await
    .unwrap();
    // As if slow readers held 2 MiB.
    relay.running.relay.outbound.add(2 << 20);
    let mut late = RawClient::connect(&relay.url()).await;
    let closed = late.req("r", &[json!({"kinds": [1]})]).await.unwrap_err();
    assert!(
        closed[2].as_str().unwrap().starts_with("rate-limited:"),
        "{closed}"
    );
    let e = common::note(&keys, "still delivered", common::now());
    assert_eq!(late.publish(&e).await[2], true);
    let v = open.recv_type("EVENT").await;
    assert_eq!(v[2]["id"], e.id.to_hex());
    relay.running.relay.outbound.sub(2 << 20);
    assert!(late.req("r", &[json!({"kinds": [1]})]).await.is_ok());
}

/// `orly drain` (what the operator's preStop runs): WebSockets are closed with 1001, new ones
/// and readiness are refused, and it returns once the connections are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_websockets_and_refuses_new_ones() {
    let relay = TestRelay::start(Mode::Local).await;
    let port = relay.running.addr.port();
    let mut c = RawClient::connect(&relay.url()).await;
    c.req("s", &[json!({"kinds": [1], "limit": 0})])
        .await
        .unwrap();
    let answer = orly::cli::drain(port, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(answer.starts_with("200"), "{answer}");
    let frame = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = c.ws.next().await {
            if let Ok(Message::Close(f)) = m {
                return f;
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(u16::from(frame.expect("a close frame").code), 1001);
    assert_eq!(relay.running.relay.connections(), 0);
    let refused = tokio_tungstenite::connect_async(relay.url()).await;
    assert!(refused.is_err(), "a WebSocket was accepted while draining");
    let ready = reqwest_status(port, "/readyz").await;
    assert_eq!(ready, 503);
}

/// The status code of a plain GET on loopback.
async fn reqwest_status(port: u16, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

/// An ACL that refuses writes from one address: IP-based decisions behind a proxy.
struct BlockIp(std::net::IpAddr);

#[async_trait::async_trait]
impl orly::acl::Acl for BlockIp {
    fn mode(&self) -> &str {
        "test"
    }

    async fn check_write(
        &self,
        ctx: &orly::acl::AccessContext<'_>,
        _event: &nostr::Event,
    ) -> orly::acl::Decision {
        if ctx.ip == self.0 {
            orly::acl::Decision::Deny(format!("blocked: {} is banned", ctx.ip))
        } else {
            orly::acl::Decision::Allow
        }
    }

    async fn check_read(
        &self,
        _ctx: &orly::acl::AccessContext<'_>,
        _filters: &[nostr::Filter],
    ) -> orly::acl::Decision {
        orly::acl::Decision::Allow
    }
}

async fn connect_forwarded(url: &str, forwarded_for: &str) -> RawClient {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", forwarded_for.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    RawClient::from_ws(ws).await
}

/// `X-Forwarded-For` is read only from a trusted proxy, right-most untrusted hop first: a
/// client cannot choose its address by sending the header itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_count_only_from_trusted_proxies() {
    let banned: std::net::IpAddr = "203.0.113.7".parse().unwrap();
    let serve = |trusted: &str| {
        let config = RelayConfig {
            trusted_proxies: trusted.parse().unwrap(),
            ..RelayConfig::default()
        };
        async move {
            let dir = tempfile::tempdir().unwrap();
            let store = orly_db::open_store(&orly_db::StoreConfig {
                data_dir: dir.path().to_path_buf(),
                ..orly_db::StoreConfig::default()
            })
            .await
            .unwrap();
            let relay = orly::Relay::new(config, store, std::sync::Arc::new(BlockIp(banned)));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            (orly::spawn(listener, relay).unwrap(), dir)
        }
    };
    let keys = Keys::generate();
    // Behind a trusted proxy (loopback here): the banned client, and a spoofed left entry.
    let (relay, _dir) = serve("127.0.0.1/32").await;
    let mut c = connect_forwarded(&relay.url(), "198.51.100.1, 203.0.113.7").await;
    let ok = c.publish(&common::note(&keys, "a", common::now())).await;
    assert_eq!(ok[2], false, "{ok}");
    assert!(ok[3].as_str().unwrap().contains("203.0.113.7"), "{ok}");
    let mut c = connect_forwarded(&relay.url(), "203.0.113.7, 198.51.100.1").await;
    let ok = c.publish(&common::note(&keys, "b", common::now())).await;
    assert_eq!(
        ok[2], true,
        "the spoofed left-most entry was believed: {ok}"
    );
    // No trusted proxy: the header is ignored, the TCP peer is the client.
    let (relay, _dir2) = serve("").await;
    let mut c = connect_forwarded(&relay.url(), "203.0.113.7").await;
    let ok = c.publish(&common::note(&keys, "c", common::now())).await;
    assert_eq!(ok[2], true, "{ok}");
}
