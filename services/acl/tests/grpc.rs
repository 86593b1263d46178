//! orlyacl.v1.ACLService over a loopback socket: every RPC group against the engine, the
//! named health status, and GrpcAcl's cache and fail-closed behaviour.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use nostr::{Event, EventBuilder, Keys, Kind, PublicKey, Tag, Timestamp};
use orly_acl::{grpc_server, AclAdmin, AclConfig, AclEngine, GrpcAcl, ListKind, Mode};
use orly_common::acl::{AccessContext, Acl, Decision};
use orly_db::{open_store, SharedStore, StoreConfig, StoreKind};
use orly_proto::orlyacl::v1 as pb;
use pb::acl_service_client::AclServiceClient;
use tokio::net::TcpListener;
use tonic::transport::Channel;

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

async fn store(dir: &tempfile::TempDir) -> SharedStore {
    open_store(&StoreConfig {
        kind: StoreKind::Sqlite,
        data_dir: dir.path().to_path_buf(),
        ..StoreConfig::default()
    })
    .await
    .unwrap()
}

/// Serves `engine` on `addr` (or a fresh port); the sender stops it.
async fn serve(
    engine: Arc<AclEngine>,
    addr: Option<SocketAddr>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind(addr.unwrap_or("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(grpc_server::serve(listener, engine, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

async fn client(addr: SocketAddr) -> AclServiceClient<Channel> {
    AclServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn note(k: &Keys) -> Event {
    EventBuilder::text_note("hi").sign_with_keys(k).unwrap()
}

fn pk_bytes(k: &Keys) -> Vec<u8> {
    k.public_key().to_bytes().to_vec()
}

#[tokio::test]
async fn managed_rpcs_health_and_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let (owner, admin, alice, peer) = (
        Keys::generate(),
        Keys::generate(),
        Keys::generate(),
        Keys::generate(),
    );
    let engine = AclEngine::open(
        AclConfig {
            mode: Mode::Managed,
            owners: vec![owner.public_key()],
            admins: vec![admin.public_key()],
            ..AclConfig::default()
        },
        store(&dir).await,
    )
    .await
    .unwrap();
    let (addr, _stop) = serve(engine, None).await;
    let mut c = client(addr).await;
    let empty = || pb::Empty {};

    // Health on the named service, and Ready.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: orly_proto::service_names::ACL.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.ready(empty()).await.unwrap().into_inner().ready);
    assert_eq!(
        c.get_mode(empty()).await.unwrap().into_inner().mode,
        "managed"
    );
    assert_eq!(
        c.get_acl_info(empty()).await.unwrap().into_inner().name,
        "managed"
    );

    let level = |pubkey: Vec<u8>, address: &str| pb::AccessLevelRequest {
        pubkey,
        address: address.into(),
    };
    let lvl = |r: tonic::Response<pb::AccessLevelResponse>| r.into_inner().level;
    assert_eq!(
        lvl(c
            .get_access_level(level(pk_bytes(&owner), ""))
            .await
            .unwrap()),
        "owner"
    );
    assert_eq!(
        lvl(c
            .get_access_level(level(pk_bytes(&admin), ""))
            .await
            .unwrap()),
        "admin"
    );
    assert_eq!(
        lvl(c
            .get_access_level(level(pk_bytes(&alice), ""))
            .await
            .unwrap()),
        "read"
    );
    assert_eq!(
        c.get_access_level(level(vec![1, 2, 3], ""))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );

    // Pubkey lists.
    let a_hex = alice.public_key().to_hex();
    c.allow_pubkey(pb::BanPubkeyRequest {
        pubkey: a_hex.clone(),
        reason: "ok".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        lvl(c
            .get_access_level(level(pk_bytes(&alice), ""))
            .await
            .unwrap()),
        "write"
    );
    let allowed = c
        .list_allowed_pubkeys(empty())
        .await
        .unwrap()
        .into_inner()
        .pubkeys;
    assert_eq!(allowed.len(), 1);
    assert_eq!(
        (allowed[0].pubkey.as_str(), allowed[0].reason.as_str()),
        (a_hex.as_str(), "ok")
    );
    assert!(allowed[0].added > 0);
    c.ban_pubkey(pb::BanPubkeyRequest {
        pubkey: a_hex.clone(),
        reason: "spam".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        lvl(c
            .get_access_level(level(pk_bytes(&alice), ""))
            .await
            .unwrap()),
        "banned"
    );
    assert_eq!(
        c.list_banned_pubkeys(empty())
            .await
            .unwrap()
            .into_inner()
            .pubkeys
            .len(),
        1
    );
    assert!(c
        .list_allowed_pubkeys(empty())
        .await
        .unwrap()
        .into_inner()
        .pubkeys
        .is_empty());
    c.unban_pubkey(pb::PubkeyRequest {
        pubkey: a_hex.clone(),
    })
    .await
    .unwrap();
    c.disallow_pubkey(pb::PubkeyRequest {
        pubkey: a_hex.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        c.ban_pubkey(pb::BanPubkeyRequest {
            pubkey: "zz".into(),
            reason: String::new()
        })
        .await
        .unwrap_err()
        .code(),
        tonic::Code::InvalidArgument
    );

    // CheckWrite: restricted, then allowed and cacheable while no event lists exist.
    let e = note(&alice);
    let write = |event: &Event, authed: Vec<Vec<u8>>| pb::WriteCheckRequest {
        event: Some(event.into()),
        authed_pubkeys: authed,
        address: "127.0.0.1".into(),
    };
    let d = c.check_write(write(&e, vec![])).await.unwrap().into_inner();
    assert!(!d.allowed && d.reason.starts_with("restricted:"), "{d:?}");
    let d = c
        .check_write(write(&e, vec![pk_bytes(&owner)]))
        .await
        .unwrap()
        .into_inner();
    assert!(d.allowed && d.cache_ms == 5000, "{d:?}");
    c.allow_pubkey(pb::BanPubkeyRequest {
        pubkey: a_hex.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let d = c.check_write(write(&e, vec![])).await.unwrap().into_inner();
    assert!(d.allowed && d.cache_ms > 0, "{d:?}");

    // Event lists: decisions stop being cacheable; CheckPolicy agrees.
    let ev_id = e.id.to_hex();
    c.ban_event(pb::BanEventRequest {
        event_id: ev_id.clone(),
        reason: "bad".into(),
    })
    .await
    .unwrap();
    let d = c.check_write(write(&e, vec![])).await.unwrap().into_inner();
    assert!(
        !d.allowed && d.reason.starts_with("blocked:") && d.cache_ms == 0,
        "{d:?}"
    );
    let p = c
        .check_policy(pb::PolicyCheckRequest {
            event: Some((&e).into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!p.allowed && p.error.starts_with("blocked:"));
    assert_eq!(
        c.list_banned_events(empty())
            .await
            .unwrap()
            .into_inner()
            .events
            .len(),
        1
    );
    c.allow_event(pb::BanEventRequest {
        event_id: ev_id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    assert!(c
        .list_banned_events(empty())
        .await
        .unwrap()
        .into_inner()
        .events
        .is_empty());
    assert_eq!(
        c.list_allowed_events(empty())
            .await
            .unwrap()
            .into_inner()
            .events
            .len(),
        1
    );
    c.disallow_event(pb::EventIdRequest {
        event_id: ev_id.clone(),
    })
    .await
    .unwrap();
    c.unban_event(pb::EventIdRequest { event_id: ev_id })
        .await
        .unwrap();

    // Kinds and IPs.
    c.allow_kind(pb::AllowKindRequest { kind: 7 })
        .await
        .unwrap();
    assert_eq!(
        c.list_allowed_kinds(empty())
            .await
            .unwrap()
            .into_inner()
            .kinds,
        vec![7]
    );
    let d = c.check_write(write(&e, vec![])).await.unwrap().into_inner();
    assert!(!d.allowed && d.reason.starts_with("restricted:"), "{d:?}");
    c.disallow_kind(pb::AllowKindRequest { kind: 7 })
        .await
        .unwrap();
    assert!(c
        .allow_kind(pb::AllowKindRequest { kind: -1 })
        .await
        .is_err());
    c.block_ip(pb::BlockIpRequest {
        ip: "127.0.0.1".into(),
        reason: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        lvl(c
            .get_access_level(level(vec![], "127.0.0.1"))
            .await
            .unwrap()),
        "blocked"
    );
    let r = c
        .check_read(pb::ReadCheckRequest {
            filters: vec![],
            authed_pubkeys: vec![],
            address: "127.0.0.1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.allowed && r.reason.starts_with("blocked:"));
    assert_eq!(
        c.list_blocked_i_ps(empty())
            .await
            .unwrap()
            .into_inner()
            .ips
            .len(),
        1
    );
    c.unblock_ip(pb::IpRequest {
        ip: "127.0.0.1".into(),
    })
    .await
    .unwrap();
    assert!(c
        .list_blocked_i_ps(empty())
        .await
        .unwrap()
        .into_inner()
        .ips
        .is_empty());

    // Peer relays become admins; throttling is off.
    c.update_peer_admins(pb::UpdatePeerAdminsRequest {
        peer_pubkeys: vec![pk_bytes(&peer)],
    })
    .await
    .unwrap();
    assert_eq!(
        lvl(c
            .get_access_level(level(pk_bytes(&peer), ""))
            .await
            .unwrap()),
        "admin"
    );
    assert_eq!(
        c.get_throttle_delay(pb::ThrottleDelayRequest::default())
            .await
            .unwrap()
            .into_inner()
            .delay_ms,
        0
    );
}

#[tokio::test]
async fn follows_rpcs() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (admin, a, b) = (Keys::generate(), Keys::generate(), Keys::generate());
    let engine = AclEngine::open(
        AclConfig {
            mode: Mode::Follows,
            admins: vec![admin.public_key()],
            ..AclConfig::default()
        },
        store.clone(),
    )
    .await
    .unwrap();
    let (addr, _stop) = serve(engine, None).await;
    let mut c = client(addr).await;
    let followed = |list: pb::PubkeyList| list.pubkeys;
    assert!(followed(
        c.get_followed_pubkeys(pb::Empty {})
            .await
            .unwrap()
            .into_inner()
    )
    .is_empty());
    let list = EventBuilder::new(Kind::ContactList, "")
        .tags([Tag::public_key(a.public_key())])
        .custom_created_at(Timestamp::now())
        .sign_with_keys(&admin)
        .unwrap();
    store.save_event(&list).await.unwrap();
    c.refresh_follows(pb::Empty {}).await.unwrap();
    assert_eq!(
        followed(
            c.get_followed_pubkeys(pb::Empty {})
                .await
                .unwrap()
                .into_inner()
        ),
        vec![a.public_key().to_hex()]
    );
    c.add_follow(pb::PubkeyRequest {
        pubkey: b.public_key().to_hex(),
    })
    .await
    .unwrap();
    assert_eq!(
        followed(
            c.get_followed_pubkeys(pb::Empty {})
                .await
                .unwrap()
                .into_inner()
        )
        .len(),
        2
    );
}

#[tokio::test]
async fn grpc_acl_caches_fails_closed_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (owner, alice) = (Keys::generate(), Keys::generate());
    let engine = AclEngine::open(
        AclConfig {
            mode: Mode::Managed,
            owners: vec![owner.public_key()],
            ..AclConfig::default()
        },
        store(&dir).await,
    )
    .await
    .unwrap();
    let (addr, stop) = serve(engine.clone(), None).await;
    let acl = GrpcAcl::connect_lazy(&addr.to_string(), Duration::from_secs(2), Mode::None).unwrap();
    assert_eq!(acl.current_mode().await.unwrap(), Mode::Managed);
    assert_eq!(acl.mode(), "managed");
    assert!(acl
        .access_level(&owner.public_key())
        .await
        .unwrap()
        .is_admin());

    let ctx = AccessContext {
        authed: &[],
        ip: LOCAL,
    };
    acl.list_add(ListKind::AllowedPubkeys, &alice.public_key().to_hex(), "")
        .await
        .unwrap();
    assert_eq!(acl.check_write(&ctx, &note(&alice)).await, Decision::Allow);
    // A change made behind the client's back shows after its cache is cleared (or the TTL).
    engine
        .add_to_list(ListKind::BannedPubkeys, &alice.public_key().to_hex(), "")
        .await
        .unwrap();
    assert_eq!(acl.check_write(&ctx, &note(&alice)).await, Decision::Allow);
    acl.clear_cache();
    assert!(matches!(
        acl.check_write(&ctx, &note(&alice)).await,
        Decision::Deny(r) if r.starts_with("blocked:")
    ));
    assert_eq!(
        acl.list(ListKind::BannedPubkeys).await.unwrap()[0].key,
        alice.public_key().to_hex()
    );
    let pk: PublicKey = alice.public_key();
    acl.list_remove(ListKind::BannedPubkeys, &pk.to_hex())
        .await
        .unwrap();
    // The ban took her off the allow list; put her back.
    acl.list_add(ListKind::AllowedPubkeys, &pk.to_hex(), "")
        .await
        .unwrap();
    assert_eq!(acl.check_write(&ctx, &note(&alice)).await, Decision::Allow);

    // Down: fail closed with `error:` for writes and reads, and admin calls fail.
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    acl.clear_cache();
    let refused = |d: Decision| matches!(d, Decision::Deny(r) if r.starts_with("error:"));
    assert!(refused(acl.check_write(&ctx, &note(&alice)).await));
    assert!(refused(acl.check_read(&ctx, &[]).await));
    assert!(acl.list(ListKind::BlockedIps).await.is_err());

    // Back on the same port: recovers by itself.
    let (_addr, _stop) = serve(engine, Some(addr)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while acl.check_write(&ctx, &note(&alice)).await != Decision::Allow {
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(acl.check_read(&ctx, &[]).await, Decision::Allow);
}

/// Decision cost with 10,000 follows, in-process vs over gRPC (cache misses and hits).
/// Indicative only (debug build): `cargo test -p orly-acl --test grpc -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing report, not a correctness test"]
async fn decision_cost_with_10k_follows() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let admin = Keys::generate();
    let follows: Vec<Keys> = (0..10_000).map(|_| Keys::generate()).collect();
    let list = EventBuilder::new(Kind::ContactList, "")
        .tags(follows.iter().map(|k| Tag::public_key(k.public_key())))
        .sign_with_keys(&admin)
        .unwrap();
    store.save_event(&list).await.unwrap();
    let engine = AclEngine::open(
        AclConfig {
            mode: Mode::Follows,
            admins: vec![admin.public_key()],
            ..AclConfig::default()
        },
        store,
    )
    .await
    .unwrap();
    assert_eq!(engine.followed_pubkeys().len(), 10_000);
    let events: Vec<Event> = follows.iter().map(note).collect();
    let (addr, _stop) = serve(engine.clone(), None).await;
    let grpc =
        GrpcAcl::connect_lazy(&addr.to_string(), Duration::from_secs(5), Mode::Follows).unwrap();
    let ctx = AccessContext {
        authed: &[],
        ip: LOCAL,
    };
    let local: Arc<dyn Acl> = engine;
    let remote: Arc<dyn Acl> = grpc.clone();
    for (name, acl) in [
        ("in-process", &local),
        ("grpc miss", &remote),
        ("grpc hit", &remote),
    ] {
        let started = std::time::Instant::now();
        for e in &events {
            assert_eq!(acl.check_write(&ctx, e).await, Decision::Allow);
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{name:>11}: {} sequential check_write in {secs:.3}s = {:.0}/s",
            events.len(),
            events.len() as f64 / secs
        );
    }
    // Concurrent misses (the relay checks up to 32 events per connection at once).
    grpc.clear_cache();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for chunk in events.chunks(events.len() / 32) {
        let chunk = chunk.to_vec();
        let acl = remote.clone();
        tasks.push(tokio::spawn(async move {
            let ctx = AccessContext {
                authed: &[],
                ip: LOCAL,
            };
            for e in &chunk {
                assert_eq!(acl.check_write(&ctx, e).await, Decision::Allow);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  grpc miss: {} check_write, 32 concurrent, in {secs:.3}s = {:.0}/s",
        events.len(),
        events.len() as f64 / secs
    );
}
