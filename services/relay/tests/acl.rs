//! Access control over real WebSockets and HTTP: every mode (none, follows, managed) with the
//! ACL in-process and in an orly-acl gRPC server, NIP-86 management with NIP-98 auth,
//! AUTH flags and privileged kinds; and the real orly-acl binary killed and restarted
//! (the relay fails closed with `error:` and recovers).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{free_port, grpc_store, note, now, orly_command, DbProcess, RawClient};
use nostr::{Event, EventBuilder, JsonUtil, Keys, Kind, PublicKey, Tag, Timestamp};
use orly::acl::Acl;
use orly::{Relay, RelayConfig, RunningRelay};
use orly_acl::{AclAdmin, AclConfig, AclEngine, GrpcAcl, Mode};
use orly_db::{SharedStore, StoreConfig, StoreKind};
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// The engine inside the relay process.
    Local,
    /// The engine behind an orly-acl gRPC server on a loopback socket, reached by GrpcAcl.
    Grpc,
}

macro_rules! both_transports {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Transport::Local).await })*
        }
        mod grpc {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Transport::Grpc).await })*
        }
    };
}

both_transports!(
    mode_none_is_an_open_relay,
    follows_mode_admins_and_their_follows_write,
    follows_mode_refreshes_on_a_timer,
    managed_mode_lists_decide_and_persist,
    nip86_refuses_bad_authorization_and_bad_calls,
    auth_flags_and_privileged_kinds,
);

/// A relay with an ACL engine, in-process or behind gRPC; everything stops on drop.
struct AclRelay {
    running: RunningRelay,
    store: SharedStore,
    engine: Arc<AclEngine>,
    grpc: Option<Arc<GrpcAcl>>,
    _server: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl AclRelay {
    async fn start(t: Transport, cfg: AclConfig, relay_cfg: RelayConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = orly_db::open_store(&StoreConfig {
            kind: StoreKind::Sqlite,
            data_dir: dir.path().to_path_buf(),
            ..StoreConfig::default()
        })
        .await
        .unwrap();
        let mode = cfg.mode;
        let engine = AclEngine::open(cfg, store.clone()).await.unwrap();
        let (acl, admin, grpc, server): (Arc<dyn Acl>, Arc<dyn AclAdmin>, _, _) = match t {
            Transport::Local => (engine.clone(), engine.clone(), None, None),
            Transport::Grpc => {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                tokio::spawn(orly_acl::grpc_server::serve(
                    listener,
                    engine.clone(),
                    async move {
                        let _ = stopped.await;
                    },
                ));
                let client =
                    GrpcAcl::connect_lazy(&addr.to_string(), Duration::from_secs(3), mode).unwrap();
                (client.clone(), client.clone(), Some(client), Some(stop))
            }
        };
        let relay = Relay::with_admin(relay_cfg, store.clone(), acl, Some(admin));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = orly::spawn(listener, relay).unwrap();
        Self {
            running,
            store,
            engine,
            grpc,
            _server: server,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        self.running.url()
    }

    fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    async fn stored(&self, e: &Event) -> bool {
        !self.store.fetch_by_ids(&[e.id]).await.unwrap().is_empty()
    }
}

fn config(mode: Mode, owners: &[&Keys], admins: &[&Keys]) -> AclConfig {
    AclConfig {
        mode,
        owners: owners.iter().map(|k| k.public_key()).collect(),
        admins: admins.iter().map(|k| k.public_key()).collect(),
        ..AclConfig::default()
    }
}

fn follow_list(admin: &Keys, who: &[PublicKey], created_at: u64) -> Event {
    EventBuilder::new(Kind::ContactList, "")
        .tags(who.iter().map(|p| Tag::public_key(*p)))
        .custom_created_at(Timestamp::from(created_at))
        .sign_with_keys(admin)
        .unwrap()
}

fn reason(v: &Value) -> &str {
    v[3].as_str().or_else(|| v[2].as_str()).unwrap_or("")
}

/// Publishes and asserts acceptance.
async fn accepted(c: &mut RawClient, e: &Event) {
    let ok = c.publish(e).await;
    assert_eq!(ok[2], true, "expected {} accepted: {ok}", e.id);
}

/// Publishes and asserts a refusal with `prefix`.
async fn refused(c: &mut RawClient, e: &Event, prefix: &str) {
    let ok = c.publish(e).await;
    assert_eq!(ok[2], false, "expected a refusal: {ok}");
    assert!(
        reason(&ok).starts_with(prefix),
        "expected {prefix:?}, got {ok}"
    );
}

/// NIP-42 AUTH on a raw connection.
async fn auth(c: &mut RawClient, keys: &Keys, relay_url: &str) {
    let challenge = c.challenge.clone().unwrap();
    let e = EventBuilder::new(Kind::Authentication, "")
        .tags([
            Tag::parse(["relay", relay_url]).unwrap(),
            Tag::parse(["challenge", &challenge]).unwrap(),
        ])
        .sign_with_keys(keys)
        .unwrap();
    c.send(format!(r#"["AUTH",{}]"#, e.as_json())).await;
    assert_eq!(c.recv_type("OK").await[2], true);
}

/// A raw HTTP/1.1 request; returns status and body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// A NIP-86 call signed by `keys` (NIP-98 bound to the URL, POST and the body).
async fn nip86(addr: SocketAddr, keys: &Keys, method: &str, params: Value) -> (u16, Value) {
    let body = json!({"method": method, "params": params}).to_string();
    let url = format!("http://{addr}/api/nip86");
    let header =
        orly_acl::nip98::authorization_header(keys, &url, "POST", Some(body.as_bytes()), now());
    nip86_raw(addr, Some(header), &body).await
}

async fn nip86_raw(addr: SocketAddr, authorization: Option<String>, body: &str) -> (u16, Value) {
    let mut headers = vec![("Content-Type", "application/nostr+json+rpc".to_string())];
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    let (status, body) = http(addr, "POST", "/api/nip86", &headers, body).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Calls and expects `{"result": ...}`.
async fn manage(addr: SocketAddr, keys: &Keys, method: &str, params: Value) -> Value {
    let (status, body) = nip86(addr, keys, method, params).await;
    assert_eq!(status, 200, "{method}: {body}");
    assert!(body["error"].is_null(), "{method}: {body}");
    body["result"].clone()
}

async fn nip11(addr: SocketAddr) -> Value {
    let (status, body) = http(
        addr,
        "GET",
        "/",
        &[("Accept", "application/nostr+json".into())],
        "",
    )
    .await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

// ---------------------------------------------------------------------------------------

async fn mode_none_is_an_open_relay(t: Transport) {
    let owner = Keys::generate();
    let relay = AclRelay::start(
        t,
        config(Mode::None, &[&owner], &[]),
        RelayConfig::default(),
    )
    .await;
    let mut c = RawClient::connect(&relay.url()).await;
    let anyone = Keys::generate();
    let e = note(&anyone, "open", now());
    accepted(&mut c, &e).await;
    assert!(relay.stored(&e).await);
    let got = c
        .req("r", &[json!({"authors": [anyone.public_key().to_hex()]})])
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    let doc = nip11(relay.addr()).await;
    assert_eq!(doc["limitation"]["restricted_writes"], false);
    assert!(!doc["supported_nips"]
        .as_array()
        .unwrap()
        .contains(&json!(86)));
    // NIP-86 needs mode managed: refused with 400 and a JSON error, even for an owner.
    let (status, body) = nip86(relay.addr(), &owner, "supportedmethods", json!([])).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("managed"),
        "{body}"
    );
}

async fn follows_mode_admins_and_their_follows_write(t: Transport) {
    let (admin, friend, stranger) = (Keys::generate(), Keys::generate(), Keys::generate());
    let relay = AclRelay::start(
        t,
        config(Mode::Follows, &[], &[&admin]),
        RelayConfig::default(),
    )
    .await;
    let mut c = RawClient::connect(&relay.url()).await;

    // Before any follow list, only the admin writes.
    let early = note(&friend, "too early", now());
    refused(&mut c, &early, "restricted:").await;
    assert!(!relay.stored(&early).await);
    accepted(
        &mut c,
        &follow_list(&admin, &[friend.public_key()], now() - 10),
    )
    .await;

    // The list applies as soon as it is acknowledged.
    accepted(&mut c, &note(&friend, "followed", now())).await;
    let no = note(&stranger, "not followed", now());
    refused(&mut c, &no, "restricted:").await;
    assert!(!relay.stored(&no).await);
    // Everyone may read, including the stranger's own (absent) events.
    let got = c.req("all", &[json!({"kinds": [1]})]).await.unwrap();
    assert_eq!(got.len(), 1);
    c.send_json(json!(["CLOSE", "all"])).await;

    // A new list of the admin: the stranger in, the friend out.
    accepted(
        &mut c,
        &follow_list(&admin, &[stranger.public_key()], now()),
    )
    .await;
    accepted(&mut c, &note(&stranger, "now followed", now())).await;
    let dropped = note(&friend, "unfollowed", now());
    refused(&mut c, &dropped, "restricted:").await;
    assert!(!relay.stored(&dropped).await);

    // A follow list of someone who is not an admin changes nothing.
    let doc = nip11(relay.addr()).await;
    assert_eq!(doc["limitation"]["restricted_writes"], true);
    accepted(
        &mut c,
        &follow_list(&stranger, &[friend.public_key()], now()),
    )
    .await;
    refused(&mut c, &note(&friend, "still out", now()), "restricted:").await;
}

async fn follows_mode_refreshes_on_a_timer(t: Transport) {
    let (admin, a, b) = (Keys::generate(), Keys::generate(), Keys::generate());
    let mut cfg = config(Mode::Follows, &[], &[&admin]);
    cfg.refresh_interval = Duration::from_secs(1);
    let relay = AclRelay::start(t, cfg, RelayConfig::default()).await;
    let _refresher = relay.engine.spawn_refresher();
    let mut c = RawClient::connect(&relay.url()).await;
    accepted(&mut c, &follow_list(&admin, &[a.public_key()], now() - 10)).await;
    accepted(&mut c, &note(&a, "in", now())).await;

    // A newer list reaches storage without passing the relay (another replica, sync):
    // the next refresh picks it up and drops the unfollowed key. Decisions cached by the
    // gRPC client may live one more TTL.
    relay
        .store
        .save_event(&follow_list(&admin, &[b.public_key()], now()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    loop {
        let ok_b = c.publish(&note(&b, "b", now())).await[2] == true;
        let ok_a = c.publish(&note(&a, "a", now())).await[2] == true;
        if ok_b && !ok_a {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "follow list not refreshed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn managed_mode_lists_decide_and_persist(t: Transport) {
    let (owner, admin, alice, bob) = (
        Keys::generate(),
        Keys::generate(),
        Keys::generate(),
        Keys::generate(),
    );
    let relay = AclRelay::start(
        t,
        config(Mode::Managed, &[&owner], &[&admin]),
        RelayConfig::default(),
    )
    .await;
    let addr = relay.addr();
    let mut c = RawClient::connect(&relay.url()).await;
    let doc = nip11(addr).await;
    assert!(doc["supported_nips"]
        .as_array()
        .unwrap()
        .contains(&json!(86)));
    assert_eq!(doc["limitation"]["restricted_writes"], true);

    // Nobody but owners/admins writes until allowed.
    let e = note(&alice, "hello", now());
    refused(&mut c, &e, "restricted:").await;
    assert!(!relay.stored(&e).await);
    accepted(&mut c, &note(&admin, "admin writes", now())).await;

    let a_hex = alice.public_key().to_hex();
    assert_eq!(
        manage(addr, &owner, "allowpubkey", json!([a_hex, "friend"])).await,
        true
    );
    accepted(&mut c, &e).await;
    refused(&mut c, &note(&bob, "bob", now()), "restricted:").await;
    assert_eq!(
        manage(addr, &owner, "listallowedpubkeys", json!([])).await,
        json!([{"pubkey": a_hex, "reason": "friend"}])
    );

    // Admins manage too. A ban moves alice from the allow list; she is refused `blocked:`.
    manage(addr, &admin, "banpubkey", json!([a_hex, "spam"])).await;
    let banned = note(&alice, "after the ban", now());
    refused(&mut c, &banned, "blocked:").await;
    assert!(!relay.stored(&banned).await);
    assert_eq!(
        manage(addr, &owner, "listbannedpubkeys", json!([])).await,
        json!([{"pubkey": a_hex, "reason": "spam"}])
    );
    assert_eq!(
        manage(addr, &owner, "listallowedpubkeys", json!([])).await,
        json!([])
    );
    // Authenticated as a banned key, reading is refused too.
    let mut banned_conn = RawClient::connect(&relay.url()).await;
    auth(&mut banned_conn, &alice, &relay.url()).await;
    let closed = banned_conn.req("x", &[json!({})]).await.unwrap_err();
    assert!(reason(&closed).starts_with("blocked:"), "{closed}");
    manage(addr, &owner, "unbanpubkey", json!([a_hex])).await;
    refused(
        &mut c,
        &note(&alice, "unbanned, not allowed", now()),
        "restricted:",
    )
    .await;

    // Kinds: once a list exists, only its kinds are accepted.
    let b_hex = bob.public_key().to_hex();
    manage(addr, &owner, "allowpubkey", json!([b_hex])).await;
    manage(addr, &owner, "allowkind", json!([1])).await;
    accepted(&mut c, &note(&bob, "a note", now())).await;
    let reaction = EventBuilder::new(Kind::Reaction, "+")
        .sign_with_keys(&bob)
        .unwrap();
    refused(&mut c, &reaction, "restricted:").await;
    assert_eq!(
        manage(addr, &owner, "listallowedkinds", json!([])).await,
        json!([1])
    );
    manage(addr, &owner, "disallowkind", json!([1])).await;
    accepted(&mut c, &reaction).await;

    // Events: a banned event is removed and refused; allowevent lets one event through.
    let stored = note(&bob, "to be banned", now());
    accepted(&mut c, &stored).await;
    manage(addr, &owner, "banevent", json!([stored.id.to_hex(), "bad"])).await;
    assert!(!relay.stored(&stored).await);
    refused(&mut c, &stored, "blocked:").await;
    assert_eq!(
        manage(addr, &owner, "listbannedevents", json!([])).await,
        json!([{"id": stored.id.to_hex(), "reason": "bad"}])
    );
    let one = note(&Keys::generate(), "let this one in", now());
    manage(addr, &owner, "allowevent", json!([one.id.to_hex()])).await;
    accepted(&mut c, &one).await;

    // Addresses: a blocked IP can neither read nor write.
    manage(addr, &owner, "blockip", json!(["127.0.0.1", "abuse"])).await;
    let mut blocked = RawClient::connect(&relay.url()).await;
    let closed = blocked.req("b", &[json!({})]).await.unwrap_err();
    assert!(reason(&closed).starts_with("blocked:"), "{closed}");
    let b_note = note(&bob, "from a blocked address", now());
    refused(&mut blocked, &b_note, "blocked:").await;
    assert!(!relay.stored(&b_note).await);
    assert_eq!(
        manage(addr, &owner, "listblockedips", json!([])).await,
        json!([{"ip": "127.0.0.1", "reason": "abuse"}])
    );
    manage(addr, &owner, "unblockip", json!(["127.0.0.1"])).await;
    assert!(blocked.req("b", &[json!({"limit": 1})]).await.is_ok());

    // The lists live in storage: a fresh engine over the same store reads them back.
    let again = AclEngine::open(
        config(Mode::Managed, &[&owner], &[]),
        relay.engine.store().clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        again.list_entries(orly_acl::ListKind::AllowedPubkeys).len(),
        1
    );
    assert_eq!(
        again.list_entries(orly_acl::ListKind::BannedEvents).len(),
        1
    );
}

async fn nip86_refuses_bad_authorization_and_bad_calls(t: Transport) {
    let (owner, stranger, target) = (Keys::generate(), Keys::generate(), Keys::generate());
    let relay = AclRelay::start(
        t,
        config(Mode::Managed, &[&owner], &[]),
        RelayConfig::default(),
    )
    .await;
    let addr = relay.addr();
    let url = format!("http://{addr}/api/nip86");
    let body = json!({"method": "banpubkey", "params": [target.public_key().to_hex()]}).to_string();
    let sign = |keys: &Keys, url: &str, method: &str, at: u64| {
        orly_acl::nip98::authorization_header(keys, url, method, Some(body.as_bytes()), at)
    };

    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("no header", None, 401),
        ("not nostr", Some("Bearer xyz".into()), 401),
        (
            "wrong url",
            Some(sign(
                &owner,
                "http://elsewhere.example/api/nip86",
                "POST",
                now(),
            )),
            401,
        ),
        ("wrong method", Some(sign(&owner, &url, "GET", now())), 401),
        (
            "expired",
            Some(sign(&owner, &url, "POST", now() - 120)),
            401,
        ),
        (
            "other body",
            Some(orly_acl::nip98::authorization_header(
                &owner,
                &url,
                "POST",
                Some(b"{}"),
                now(),
            )),
            401,
        ),
        (
            "not an owner",
            Some(sign(&stranger, &url, "POST", now())),
            403,
        ),
    ];
    for (what, header, want) in cases {
        let (status, resp) = nip86_raw(addr, header, &body).await;
        assert_eq!(status, want, "{what}: {resp}");
        assert!(resp["error"].is_string(), "{what}: {resp}");
    }
    // A wrong content type.
    let (status, _) = http(
        addr,
        "POST",
        "/api/nip86",
        &[
            ("Content-Type", "text/plain".into()),
            ("Authorization", sign(&owner, &url, "POST", now())),
        ],
        &body,
    )
    .await;
    assert_eq!(status, 400);
    // Nothing changed.
    assert_eq!(
        manage(addr, &owner, "listbannedpubkeys", json!([])).await,
        json!([])
    );

    // supportedmethods lists exactly what is implemented, and each one answers.
    let methods = manage(addr, &owner, "supportedmethods", json!([])).await;
    assert_eq!(methods, json!(orly_acl::nip86::SUPPORTED_METHODS));
    for m in methods.as_array().unwrap() {
        let m = m.as_str().unwrap();
        if m.starts_with("list") || m == "supportedmethods" {
            manage(addr, &owner, m, json!([])).await;
        }
    }

    // Bad calls get JSON-RPC errors and change nothing.
    let signed = |body: &str| {
        orly_acl::nip98::authorization_header(&owner, &url, "POST", Some(body.as_bytes()), now())
    };
    for bad in [
        "{not json",
        "[]",
        r#"{"params":[]}"#,
        r#"{"method":"x","params":{}}"#,
    ] {
        let (status, resp) = nip86_raw(addr, Some(signed(bad)), bad).await;
        assert_eq!(status, 400, "{bad}: {resp}");
        assert!(resp["error"].is_string(), "{bad}: {resp}");
    }
    for (method, params) in [
        ("nosuchmethod", json!([])),
        ("banpubkey", json!(["not-a-pubkey"])),
        ("banpubkey", json!([])),
        ("allowpubkey", json!([42])),
        ("banevent", json!(["abcd"])),
        ("allowkind", json!(["one"])),
        ("allowkind", json!([70000])),
        ("blockip", json!(["300.1.1.1"])),
        ("banpubkey", json!([target.public_key().to_hex(), 5])),
    ] {
        let (status, resp) = nip86(addr, &owner, method, params.clone()).await;
        assert_eq!(status, 200, "{method} {params}: {resp}");
        assert!(resp["error"].is_string(), "{method} {params}: {resp}");
        assert!(resp["result"].is_null(), "{method} {params}: {resp}");
    }
    for list in [
        "listbannedpubkeys",
        "listallowedpubkeys",
        "listbannedevents",
        "listallowedkinds",
        "listblockedips",
    ] {
        assert_eq!(
            manage(addr, &owner, list, json!([])).await,
            json!([]),
            "{list}"
        );
    }

    // And the owner's valid call does change the list (npub accepted, stored as hex).
    let npub = nostr::ToBech32::to_bech32(&target.public_key()).unwrap();
    manage(addr, &owner, "banpubkey", json!([npub])).await;
    assert_eq!(
        manage(addr, &owner, "listbannedpubkeys", json!([])).await,
        json!([{"pubkey": target.public_key().to_hex(), "reason": ""}])
    );
}

async fn auth_flags_and_privileged_kinds(t: Transport) {
    let (alice, bob, eve, admin) = (
        Keys::generate(),
        Keys::generate(),
        Keys::generate(),
        Keys::generate(),
    );
    let relay_cfg = RelayConfig {
        auth_to_write: true,
        privileged_readers: vec![admin.public_key()],
        ..RelayConfig::default()
    };
    let relay = AclRelay::start(t, config(Mode::None, &[], &[]), relay_cfg).await;
    let url = relay.url();

    // ORLY_AUTH_TO_WRITE: reading needs no AUTH, writing does.
    let mut anon = RawClient::connect(&url).await;
    assert!(anon.req("r", &[json!({"kinds": [1]})]).await.is_ok());
    let e = note(&alice, "needs auth", now());
    refused(&mut anon, &e, "auth-required:").await;
    assert!(!relay.stored(&e).await);

    // A DM from alice to bob.
    let mut a = RawClient::connect(&url).await;
    auth(&mut a, &alice, &url).await;
    let dm = EventBuilder::new(Kind::EncryptedDirectMessage, "ciphertext")
        .tags([Tag::public_key(bob.public_key())])
        .sign_with_keys(&alice)
        .unwrap();
    // Bob and eve subscribe live before it is sent.
    let mut b = RawClient::connect(&url).await;
    auth(&mut b, &bob, &url).await;
    assert!(b
        .req("live", &[json!({"kinds": [4], "limit": 0})])
        .await
        .unwrap()
        .is_empty());
    let mut ev = RawClient::connect(&url).await;
    auth(&mut ev, &eve, &url).await;
    assert!(ev
        .req("live", &[json!({"limit": 0})])
        .await
        .unwrap()
        .is_empty());
    accepted(&mut a, &dm).await;
    accepted(&mut a, &note(&alice, "public", now())).await;

    // Bob gets the DM live; eve gets only the public note.
    let got = b.recv_type("EVENT").await;
    assert_eq!(got[2]["id"], dm.id.to_hex());
    let got = ev.recv_type("EVENT").await;
    assert_eq!(got[2]["content"], "public");

    // Stored: parties and admins see it, others do not; without AUTH asking for kind 4 is
    // answered with an AUTH challenge and `auth-required:`.
    for (who, conn) in [("bob", &mut b), ("alice", &mut a)] {
        let got = conn.req("dm", &[json!({"kinds": [4]})]).await.unwrap();
        assert_eq!(got.len(), 1, "{who}");
    }
    assert!(ev
        .req("dm", &[json!({"kinds": [4]})])
        .await
        .unwrap()
        .is_empty());
    let all = ev.req("all", &[json!({})]).await.unwrap();
    assert_eq!(all.len(), 1, "only the public note: {all:?}");
    let mut adm = RawClient::connect(&url).await;
    auth(&mut adm, &admin, &url).await;
    assert_eq!(
        adm.req("dm", &[json!({"kinds": [4]})]).await.unwrap().len(),
        1
    );
    let closed = anon.req("dm", &[json!({"kinds": [4]})]).await.unwrap_err();
    assert!(reason(&closed).starts_with("auth-required:"), "{closed}");
    let all = anon.req("all", &[json!({})]).await.unwrap();
    assert_eq!(all.len(), 1);

    // ORLY_AUTH_REQUIRED: reads need AUTH too.
    drop(relay);
    let relay = AclRelay::start(
        t,
        config(Mode::None, &[], &[]),
        RelayConfig {
            auth_required: true,
            ..RelayConfig::default()
        },
    )
    .await;
    let mut anon = RawClient::connect(&relay.url()).await;
    let closed = anon.req("r", &[json!({})]).await.unwrap_err();
    assert!(reason(&closed).starts_with("auth-required:"), "{closed}");
    refused(&mut anon, &note(&eve, "x", now()), "auth-required:").await;
    auth(&mut anon, &eve, &relay.url()).await;
    assert!(anon.req("r", &[json!({})]).await.is_ok());
    accepted(&mut anon, &note(&eve, "y", now())).await;
    assert!(relay.grpc.is_some() == (t == Transport::Grpc));
}

// ---------------------------------------------------------------------------------------
// The real orly-acl service (`orly acl`), over orly-db, killed and restarted.

struct AclProcess {
    child: std::process::Child,
}

impl AclProcess {
    fn start(port: u16, db: SocketAddr, owner: &Keys) -> Self {
        let child = orly_command("acl")
            .env("ORLY_ACL_LISTEN", format!("127.0.0.1:{port}"))
            .env("ORLY_ACL_MODE", "managed")
            .env("ORLY_ACL_DB_TYPE", "grpc")
            .env("ORLY_ACL_DB_SERVER", db.to_string())
            .env("ORLY_OWNERS", owner.public_key().to_hex())
            .env("ORLY_LOG_LEVEL", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn orly-acl");
        Self { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AclProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orly_acl_process_down_fails_closed_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let db = DbProcess::start(dir.path(), free_port()).await;
    let (owner, alice) = (Keys::generate(), Keys::generate());
    let port = free_port();
    let mut acl_proc = AclProcess::start(port, db.addr, &owner);
    let client = GrpcAcl::connect_lazy(
        &format!("127.0.0.1:{port}"),
        Duration::from_secs(2),
        Mode::Managed,
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while client.current_mode().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "orly-acl did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let store = grpc_store(db.addr);
    let relay = Relay::with_admin(
        RelayConfig::default(),
        store.clone(),
        client.clone(),
        Some(client.clone()),
    );
    let running = orly::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), relay).unwrap();
    let addr = running.addr;
    let url = running.url();

    // Through the service: the owner allows alice; she writes.
    let a_hex = alice.public_key().to_hex();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        // Readiness: the service loads its lists from orly-db first.
        let (status, body) = nip86(addr, &owner, "allowpubkey", json!([a_hex])).await;
        if status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut c = RawClient::connect(&url).await;
    accepted(&mut c, &note(&alice, "before", now())).await;

    // The service dies: the relay still answers, but refuses with `error:` (fail closed)
    // once no cached decision covers the request.
    acl_proc.kill();
    client.clear_cache();
    let during = note(&alice, "during the outage", now());
    refused(&mut c, &during, "error:").await;
    assert!(store.fetch_by_ids(&[during.id]).await.unwrap().is_empty());
    let closed = c.req("r", &[json!({})]).await.unwrap_err();
    assert!(reason(&closed).starts_with("error:"), "{closed}");
    let doc = nip11(addr).await;
    assert_eq!(doc["limitation"]["restricted_writes"], true);
    let (status, _) = nip86(addr, &owner, "listallowedpubkeys", json!([])).await;
    assert_eq!(status, 503);

    // It comes back on the same port: the lists were in orly-db, and the relay recovers.
    let _acl_proc = AclProcess::start(port, db.addr, &owner);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ok = c.publish(&note(&alice, "after", now())).await;
        if ok[2] == true {
            break;
        }
        assert!(reason(&ok).starts_with("error:"), "{ok}");
        assert!(tokio::time::Instant::now() < deadline, "no recovery: {ok}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.req("r", &[json!({"limit": 1})]).await.is_ok());
    refused(
        &mut c,
        &note(&Keys::generate(), "stranger", now()),
        "restricted:",
    )
    .await;
}
