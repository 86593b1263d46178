//! orly-acl without a single point of failure, with real processes: replicas on one orly-db
//! converge (a ban made through one is enforced by the other within its refresh interval),
//! and `GrpcAcl` spreads its calls over the replicas a name resolves to and keeps accepting
//! writes when one of them is killed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{grpc_store, start_db, wait_until, AclReplica};
use nostr::{Event, EventBuilder, Keys, Kind, Tag, Timestamp};
use orly_acl::grpc_client::UNAVAILABLE_REASON;
use orly_acl::{nip86, nip98, GrpcAcl, Mode};
use orly_common::acl::{AccessContext, Acl, Decision};
use orly_common::ClientOptions;
use orly_proto::orlyacl::v1 as pb;
use orly_testkit::{free_port_on, free_port_on_all, loopback, TestDns};

/// Far more than the replicas' refresh interval (1 s here): waits end as soon as they can.
const CONVERGE: Duration = Duration::from_secs(30);

fn managed(owner: &Keys) -> Vec<(&'static str, String)> {
    vec![
        ("ORLY_ACL_MODE", "managed".into()),
        ("ORLY_OWNERS", owner.public_key().to_hex()),
        ("ORLY_ACL_REFRESH_INTERVAL", "1s".into()),
        // The full reload alone would take an hour: convergence must come from the checks.
        ("ORLY_FOLLOW_LIST_FREQUENCY", "1h".into()),
    ]
}

fn local() -> SocketAddr {
    let ip = loopback(1);
    SocketAddr::new(ip, free_port_on(ip))
}

fn note(keys: &Keys, kind: u16) -> Event {
    EventBuilder::new(Kind::from(kind), "hi")
        .sign_with_keys(keys)
        .unwrap()
}

fn write_check(event: &Event) -> pb::WriteCheckRequest {
    pb::WriteCheckRequest {
        event: Some(event.into()),
        authed_pubkeys: vec![],
        address: "127.0.0.1".into(),
    }
}

/// One NIP-86 call by `owner` through `admin`, as the relay makes it.
async fn nip86_call(
    admin: &GrpcAcl,
    owner: &Keys,
    method: &str,
    params: serde_json::Value,
) -> serde_json::Value {
    let body = serde_json::json!({"method": method, "params": params}).to_string();
    let url = "http://relay.example/api/nip86";
    let now = Timestamp::now().as_secs();
    let auth = nip98::authorization_header(owner, url, "POST", Some(body.as_bytes()), now);
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::HOST, "relay.example".parse().unwrap());
    headers.insert(
        http::header::CONTENT_TYPE,
        nip86::CONTENT_TYPE.parse().unwrap(),
    );
    headers.insert(http::header::AUTHORIZATION, auth.parse().unwrap());
    let uri: http::Uri = nip86::PATH.parse().unwrap();
    let resp = nip86::handle(
        admin,
        nip86::Nip86Request {
            method: &http::Method::POST,
            uri: &uri,
            headers: &headers,
            body: body.as_bytes(),
        },
        now,
    )
    .await;
    assert_eq!(resp.status, 200, "{method}: {resp:?}");
    assert!(resp.body["error"].is_null(), "{method}: {resp:?}");
    resp.body["result"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_through_one_replica_is_enforced_by_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, db) = start_db(dir.path()).await;
    let (owner, alice) = (Keys::generate(), Keys::generate());
    let one = AclReplica::start(local(), db, &managed(&owner)).await;
    let two = AclReplica::start(local(), db, &managed(&owner)).await;
    let admin_one =
        GrpcAcl::connect_lazy(&one.addr.to_string(), Duration::from_secs(5), Mode::Managed)
            .unwrap();
    let mut c2 = two.client().await;
    let e = note(&alice, 1);

    // Allowed through replica one (NIP-86), then writes pass on replica two.
    let hex = alice.public_key().to_hex();
    nip86_call(&admin_one, &owner, "allowpubkey", serde_json::json!([hex])).await;
    wait_until(CONVERGE, "replica two allows alice", || {
        let (c2, e) = (c2.clone(), e.clone());
        async move {
            let mut c2 = c2;
            c2.check_write(write_check(&e))
                .await
                .is_ok_and(|d| d.into_inner().allowed)
        }
    })
    .await;

    // Banned through replica one: replica two refuses her within its refresh interval.
    nip86_call(
        &admin_one,
        &owner,
        "banpubkey",
        serde_json::json!([hex, "spam"]),
    )
    .await;
    wait_until(CONVERGE, "replica two refuses the banned alice", || {
        let (c2, e) = (c2.clone(), e.clone());
        async move {
            let mut c2 = c2;
            c2.check_write(write_check(&e)).await.is_ok_and(|d| {
                let d = d.into_inner();
                !d.allowed && d.reason.starts_with("blocked:")
            })
        }
    })
    .await;
    let banned = c2
        .list_banned_pubkeys(pb::Empty {})
        .await
        .unwrap()
        .into_inner()
        .pubkeys;
    assert_eq!(banned.len(), 1);
    assert_eq!(
        (banned[0].pubkey.as_str(), banned[0].reason.as_str()),
        (hex.as_str(), "spam")
    );

    // The same over plain gRPC, the other way round: an IP blocked on two, refused by one.
    c2.block_ip(pb::BlockIpRequest {
        ip: "10.9.8.7".into(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let c1 = one.client().await;
    wait_until(CONVERGE, "replica one refuses the blocked address", || {
        let c1 = c1.clone();
        async move {
            let mut c1 = c1;
            c1.check_read(pb::ReadCheckRequest {
                filters: vec![],
                authed_pubkeys: vec![],
                address: "10.9.8.7".into(),
            })
            .await
            .is_ok_and(|d| !d.into_inner().allowed)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_lists_and_added_follows_reach_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, db) = start_db(dir.path()).await;
    let (admin, bob, carol) = (Keys::generate(), Keys::generate(), Keys::generate());
    let envs = vec![
        ("ORLY_ACL_MODE", "follows".to_string()),
        ("ORLY_ADMINS", admin.public_key().to_hex()),
        ("ORLY_ACL_REFRESH_INTERVAL", "1s".into()),
        ("ORLY_FOLLOW_LIST_FREQUENCY", "1h".into()),
    ];
    let one = AclReplica::start(local(), db, &envs).await;
    let two = AclReplica::start(local(), db, &envs).await;
    let allowed = |addr: SocketAddr, who: Keys| async move {
        let replica = common::AclReplica::client_at(addr).await;
        let Some(mut c) = replica else { return false };
        c.check_write(write_check(&note(&who, 1)))
            .await
            .is_ok_and(|d| d.into_inner().allowed)
    };

    // The admin's follow list, stored by someone else (the relay): both replicas follow bob.
    let list = EventBuilder::new(Kind::ContactList, "")
        .tags([Tag::public_key(bob.public_key())])
        .sign_with_keys(&admin)
        .unwrap();
    grpc_store(db).save_event(&list).await.unwrap();
    for r in [&one, &two] {
        wait_until(CONVERGE, "a replica follows bob", || {
            allowed(r.addr, bob.clone())
        })
        .await;
    }
    // AddFollow on replica one: replica two lets carol write too.
    one.client()
        .await
        .add_follow(pb::PubkeyRequest {
            pubkey: carol.public_key().to_hex(),
        })
        .await
        .unwrap();
    wait_until(CONVERGE, "replica two follows carol", || {
        allowed(two.addr, carol.clone())
    })
    .await;
}

/// Issue 16's acceptance for orly-acl: one name answered by a real DNS server with two
/// loopback addresses, an orly-acl replica on each (same port); `GrpcAcl` uses both, and
/// with one killed every write check is still answered, none refused as unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_acl_spreads_over_replicas_and_survives_losing_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, db) = start_db(dir.path()).await;
    let dns = TestDns::start().await.unwrap();
    let ips = [loopback(2), loopback(3)];
    let port = free_port_on_all(&ips);
    assert_ne!(port, 0, "no port free on both loopback addresses");
    dns.set("acl.orly.test", &ips);
    let (owner, alice) = (Keys::generate(), Keys::generate());
    let one = AclReplica::start(SocketAddr::new(ips[0], port), db, &managed(&owner)).await;
    let mut two = AclReplica::start(SocketAddr::new(ips[1], port), db, &managed(&owner)).await;

    // Alice may write, on both replicas.
    one.client()
        .await
        .allow_pubkey(pb::BanPubkeyRequest {
            pubkey: alice.public_key().to_hex(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let c2 = two.client().await;
    wait_until(CONVERGE, "replica two allows alice", || {
        let c2 = c2.clone();
        let e = note(&alice, 1);
        async move {
            let mut c2 = c2;
            c2.check_write(write_check(&e))
                .await
                .is_ok_and(|d| d.into_inner().allowed)
        }
    })
    .await;

    let acl = GrpcAcl::with_options(
        &format!("acl.orly.test:{port}"),
        ClientOptions {
            dns_servers: vec![dns.addr()],
            resolve_interval: Duration::from_millis(500),
            ..ClientOptions::new("orly-acl", Duration::from_secs(5))
        },
        Mode::Managed,
    )
    .unwrap();
    wait_until(CONVERGE, "both replicas resolved", || {
        let n = acl.channel().replicas().len();
        async move { n == 2 }
    })
    .await;

    let ctx = AccessContext {
        authed: &[],
        ip: "127.0.0.1".parse().unwrap(),
    };
    // Every kind is its own cache key, so every check reaches a replica.
    let mut kind = 1000u16;
    let mut checks = |n: usize| {
        let start = kind;
        kind += n as u16;
        (start..start + n as u16)
            .map(|k| note(&alice, k))
            .collect::<Vec<_>>()
    };
    let (before_one, before_two) = (one.checks("write").await, two.checks("write").await);
    for e in checks(40) {
        assert_eq!(acl.check_write(&ctx, &e).await, Decision::Allow);
    }
    let (used_one, used_two) = (
        one.checks("write").await - before_one,
        two.checks("write").await - before_two,
    );
    assert!(
        used_one > 0 && used_two > 0,
        "calls were not spread: {used_one} on {}, {used_two} on {}",
        one.addr,
        two.addr
    );
    assert_eq!(used_one + used_two, 40);

    // A replica lost: every write check after it is still answered, and allowed.
    two.proc.kill();
    let before_one = one.checks("write").await;
    for e in checks(40) {
        let d = acl.check_write(&ctx, &e).await;
        assert_ne!(
            d,
            Decision::Deny(UNAVAILABLE_REASON.into()),
            "refused as unavailable"
        );
        assert_eq!(d, Decision::Allow);
    }
    assert_eq!(one.checks("write").await - before_one, 40);
}
