//! The service through its gRPC face on a loopback socket, driven by the `GrpcNegentropy`
//! client (the relay's `ORLY_SYNC_TYPE=grpc` path) and by the generated client for the admin
//! RPCs.

mod common;

use std::time::Duration;

use common::*;
use nostr::{Filter, Keys, Kind};
use orly_proto::orlysync::common::v1 as cpb;
use orly_proto::orlysync::negentropy::v1 as pb;
use orly_sync_negentropy::{
    reconcile_as_client, EngineSettings, GrpcNegentropy, NegError, NegentropyHandler,
    ReplicatedNegentropy, SyncSettings, PROTOCOL_VERSION,
};
use tonic::Code;

fn client(svc: &Service) -> GrpcNegentropy {
    GrpcNegentropy::connect_lazy(&svc.addr.to_string(), Duration::from_secs(10)).unwrap()
}

fn no_autostart() -> SyncSettings {
    SyncSettings {
        interval: Duration::from_secs(3600),
        ..SyncSettings::default()
    }
}

#[tokio::test]
async fn reconciliation_over_grpc_yields_exact_have_and_need() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir, "relay.db").await;
    let keys = Keys::generate();
    let shared = events(&keys, 1, 800, 1_700_000_000);
    let relay_only = events(&keys, 1, 35, 1_700_000_020);
    let client_only = events(&keys, 1, 45, 1_700_000_070);
    save(&store, &shared).await;
    save(&store, &relay_only).await;
    let svc = serve(store, EngineSettings::default(), no_autostart()).await;
    let neg = client(&svc);
    let notes = Filter::new().kind(Kind::TextNote);

    // Client has extras.
    let out = reconcile_as_client(
        &neg,
        "conn-1",
        "a",
        &notes,
        &items(&[&shared, &relay_only, &client_only]),
        4096,
    )
    .await
    .unwrap();
    assert_eq!(out.have, ids(&[&client_only]));
    assert!(out.need.is_empty());
    // Relay has extras.
    let out = reconcile_as_client(&neg, "conn-1", "b", &notes, &items(&[&shared]), 4096)
        .await
        .unwrap();
    assert!(out.have.is_empty());
    assert_eq!(out.need, ids(&[&relay_only]));
    // Both.
    let out = reconcile_as_client(
        &neg,
        "conn-2",
        "c",
        &notes,
        &items(&[&shared, &client_only]),
        4096,
    )
    .await
    .unwrap();
    assert_eq!(out.have, ids(&[&client_only]));
    assert_eq!(out.need, ids(&[&relay_only]));
    assert!(out.rounds > 1);
    assert!(
        svc.engine.list_sessions().is_empty(),
        "NEG-CLOSE reached the service"
    );
}

#[tokio::test]
async fn many_concurrent_sessions_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir, "relay.db").await;
    let keys = Keys::generate();
    let shared = events(&keys, 1, 300, 1_700_000_000);
    let relay_only = events(&keys, 1, 10, 1_700_000_100);
    save(&store, &shared).await;
    save(&store, &relay_only).await;
    let svc = serve(store, EngineSettings::default(), no_autostart()).await;
    let neg = client(&svc);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (neg, shared, want) = (neg.clone(), shared.clone(), ids(&[&relay_only]));
        tasks.push(tokio::spawn(async move {
            let out = reconcile_as_client(
                &neg,
                &format!("conn-{}", i % 4),
                &format!("sub-{i}"),
                &Filter::new(),
                &items(&[&shared]),
                0,
            )
            .await
            .unwrap();
            assert_eq!(out.need, want);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn errors_travel_as_neg_err_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir, "relay.db").await;
    let keys = Keys::generate();
    save(&store, &events(&keys, 1, 20, 1_700_000_000)).await;
    let settings = EngineSettings {
        max_records: 10,
        ..EngineSettings::default()
    };
    let svc = serve(store, settings, no_autostart()).await;
    let neg = client(&svc);
    let all = Filter::new();
    let empty_initial = [PROTOCOL_VERSION, 0x00, 0x00, 0x02, 0x00]; // one range, empty id list

    let e = neg
        .message("c", "nope", &[PROTOCOL_VERSION])
        .await
        .unwrap_err();
    assert!(matches!(e, NegError::Closed(_)), "{e:?}");
    let e = neg
        .open("c", "s", &all, &[0x61, 0x00, 0x00, 0x07])
        .await
        .unwrap_err();
    assert!(matches!(e, NegError::Invalid(_)), "{e:?}");
    let e = neg.open("c", "s", &all, &empty_initial).await.unwrap_err();
    assert!(matches!(e, NegError::Blocked(_)), "{e:?}");
    assert!(e
        .reason()
        .starts_with("blocked: the filter matches more than 10"));
    let reply = neg.open("c", "s", &all, &[0x62]).await.unwrap();
    assert_eq!(reply.message, vec![PROTOCOL_VERSION]);

    // A session to list, then close by connection.
    let kind1 = Filter::new().kind(Kind::TextNote).limit(5);
    neg.open("c", "s", &kind1, &empty_initial).await.unwrap();
    neg.open("c", "t", &kind1, &empty_initial).await.unwrap();
    let sessions = neg.list_sessions().await.unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(
        (
            sessions[0].connection_id.as_str(),
            sessions[0].subscription_id.as_str()
        ),
        ("c", "s")
    );
    assert_eq!(sessions[0].round_count, 1);
    assert!(sessions[0].created_at > 0);
    neg.close_connection("c").await;
    assert!(neg.list_sessions().await.unwrap().is_empty());
    let e = neg
        .message("c", "s", &[PROTOCOL_VERSION])
        .await
        .unwrap_err();
    assert!(matches!(e, NegError::Closed(_)));

    // CloseSession by subscription id across connections.
    let mut raw = neg.raw();
    neg.open("x", "s", &kind1, &empty_initial).await.unwrap();
    neg.open("y", "s", &kind1, &empty_initial).await.unwrap();
    raw.close_session(pb::CloseSessionRequest {
        subscription_id: "s".into(),
        connection_id: String::new(),
    })
    .await
    .unwrap();
    assert!(neg.list_sessions().await.unwrap().is_empty());
    let status = raw
        .close_session(pb::CloseSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn an_unreachable_service_is_an_error_reason_not_a_hang() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let neg = GrpcNegentropy::connect_lazy(&addr.to_string(), Duration::from_secs(2)).unwrap();
    let started = std::time::Instant::now();
    let e = neg
        .open("c", "s", &Filter::new(), &[PROTOCOL_VERSION])
        .await
        .unwrap_err();
    assert!(matches!(e, NegError::Internal(_)), "{e:?}");
    assert!(e.reason().starts_with("error: "));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!neg.ready().await);
    neg.close("c", "s").await; // logged, not fatal
}

#[tokio::test]
async fn health_ready_and_peer_admin() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir, "relay.db").await;
    let svc = serve(store, EngineSettings::default(), no_autostart()).await;
    let neg = client(&svc);
    assert!(neg.ready().await);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", svc.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut serving = false;
    for _ in 0..50 {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: orly_proto::service_names::SYNC_NEGENTROPY.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving, "the named service reports SERVING");

    let mut raw = neg.raw();
    raw.add_peer(pb::AddPeerRequest {
        peer_url: "wss://b.example/".into(),
    })
    .await
    .unwrap();
    raw.add_peer(pb::AddPeerRequest {
        peer_url: "ws://a.example:7777".into(),
    })
    .await
    .unwrap();
    let e = raw
        .add_peer(pb::AddPeerRequest {
            peer_url: "https://nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let peers = raw
        .get_peers(cpb::Empty {})
        .await
        .unwrap()
        .into_inner()
        .peers;
    assert_eq!(
        peers,
        vec![
            "ws://a.example:7777".to_string(),
            "wss://b.example".to_string()
        ]
    );

    let state = raw
        .get_peer_sync_state(pb::PeerSyncStateRequest {
            peer_url: "wss://b.example".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(state.found);
    assert_eq!(state.state.unwrap().status, "idle");
    let state = raw
        .get_peer_sync_state(pb::PeerSyncStateRequest {
            peer_url: "wss://unknown.example".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!state.found);

    let status = raw
        .get_sync_status(cpb::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert!(!status.active);
    assert_eq!(status.peer_count, 2);
    raw.start(cpb::Empty {}).await.unwrap();
    assert!(
        raw.get_sync_status(cpb::Empty {})
            .await
            .unwrap()
            .into_inner()
            .active
    );
    raw.stop(cpb::Empty {}).await.unwrap();
    assert!(
        !raw.get_sync_status(cpb::Empty {})
            .await
            .unwrap()
            .into_inner()
            .active
    );

    raw.remove_peer(pb::RemovePeerRequest {
        peer_url: "wss://b.example".into(),
    })
    .await
    .unwrap();
    let e = raw
        .remove_peer(pb::RemovePeerRequest {
            peer_url: "wss://b.example".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = raw
        .trigger_sync(pb::TriggerSyncRequest {
            peer_url: "wss://b.example".into(),
            filter: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(
        raw.get_peers(cpb::Empty {})
            .await
            .unwrap()
            .into_inner()
            .peers,
        vec!["ws://a.example:7777".to_string()]
    );
}

#[tokio::test]
async fn sessions_spread_over_replicas_stay_pinned_and_fail_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir, "relay.db").await;
    let keys = Keys::generate();
    let shared = events(&keys, 1, 400, 1_700_000_000);
    let relay_only = events(&keys, 1, 20, 1_700_000_050);
    save(&store, &shared).await;
    save(&store, &relay_only).await;
    let a = serve(store.clone(), EngineSettings::default(), no_autostart()).await;
    let b = serve(store.clone(), EngineSettings::default(), no_autostart()).await;
    let neg = std::sync::Arc::new(
        ReplicatedNegentropy::connect_lazy(
            &format!("{}, {}", a.addr, b.addr),
            Duration::from_secs(5),
        )
        .unwrap(),
    );

    // New sessions alternate between the replicas...
    let empty = [PROTOCOL_VERSION, 0x00, 0x00, 0x02, 0x00];
    for i in 0..10 {
        neg.open("conn", &format!("s{i}"), &Filter::new(), &empty)
            .await
            .unwrap();
    }
    let mut counts: Vec<usize> = neg.sessions_per_replica().into_values().collect();
    counts.sort();
    assert_eq!(counts, vec![5, 5]);
    assert_eq!(a.engine.list_sessions().len(), 5);
    assert_eq!(b.engine.list_sessions().len(), 5);
    neg.close_connection("conn").await;
    assert!(a.engine.list_sessions().is_empty() && b.engine.list_sessions().is_empty());

    // ...and every message of a session reaches the replica that holds it.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (neg, shared, want) = (neg.clone(), shared.clone(), ids(&[&relay_only]));
        tasks.push(tokio::spawn(async move {
            let out = reconcile_as_client(
                &*neg,
                &format!("c{}", i % 3),
                &format!("sub{i}"),
                &Filter::new(),
                &items(&[&shared]),
                4096,
            )
            .await
            .unwrap();
            assert_eq!(out.need, want);
            assert!(out.rounds > 1);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // A replica dies: its sessions end with `closed:` (the client may reopen them); new
    // sessions go to the survivor.
    // (The balancer may put several opens in a row on one replica: open until B holds one.)
    let mut pinned_to_b = None;
    for i in 0..20 {
        neg.open("conn", &format!("held{i}"), &Filter::new(), &empty)
            .await
            .unwrap();
        if let Some(s) = b.engine.list_sessions().first() {
            pinned_to_b = Some(s.subscription_id.clone());
            break;
        }
    }
    let pinned_to_b = pinned_to_b.expect("a session lands on replica B");
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = neg.message("conn", &pinned_to_b, &empty).await.unwrap_err();
    assert!(matches!(e, NegError::Closed(_)), "{e:?}");
    for i in 0..6 {
        let out = reconcile_as_client(
            &*neg,
            "conn",
            &format!("after{i}"),
            &Filter::new(),
            &items(&[&shared]),
            0,
        )
        .await
        .unwrap();
        assert_eq!(out.need, ids(&[&relay_only]));
    }
}
