//! Relay-to-relay sync against a tiny NIP-77 peer relay (WebSocket) backed by its own store:
//! the two stores converge, received events are verified, state and leases are kept.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use nostr::{Filter, Keys, Kind};
use orly_proto::orlysync::negentropy::v1 as pb;
use orly_sync_negentropy::peers::LEASE_PREFIX;
use orly_sync_negentropy::{EngineSettings, GrpcNegentropy, SyncError, SyncManager, SyncSettings};

fn settings() -> SyncSettings {
    SyncSettings {
        interval: Duration::from_secs(3600),
        batch_size: 40,
        peer_timeout: Duration::from_secs(10),
        ..SyncSettings::default()
    }
}

#[tokio::test]
async fn two_stores_converge_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (store(&dir, "ours.db").await, store(&dir, "theirs.db").await);
    let keys = Keys::generate();
    let shared = events(&keys, 1, 1200, 1_700_000_000);
    let only_ours = events(&keys, 1, 70, 1_700_000_100);
    let only_theirs = events(&keys, 1, 90, 1_700_000_150);
    save(&ours, &shared).await;
    save(&theirs, &shared).await;
    save(&ours, &only_ours).await;
    save(&theirs, &only_theirs).await;
    let peer = spawn_peer(theirs.clone(), PeerMode::Honest).await;

    let manager = SyncManager::new(ours.clone(), settings()).unwrap();
    manager
        .add_peers(std::slice::from_ref(&peer.url))
        .await
        .unwrap();
    let mut rounds_seen = 0;
    let report = manager
        .sync_peer(&peer.url, None, &mut |r| {
            rounds_seen = rounds_seen.max(r.rounds)
        })
        .await
        .unwrap();
    assert_eq!(report.have_count, 70);
    assert_eq!(report.need_count, 90);
    assert_eq!(report.fetched, 90);
    assert_eq!(report.sent, 70);
    assert_eq!(
        (report.invalid, report.missing, report.send_failed),
        (0, 0, 0)
    );
    assert!(report.rounds >= 1 && rounds_seen == report.rounds);
    assert!(
        report.reconcile_bytes_sent > 0 && report.bytes_received > report.reconcile_bytes_received
    );

    let all = ids(&[&shared, &only_ours, &only_theirs]);
    assert_eq!(stored_ids(&ours).await, all);
    assert_eq!(stored_ids(&theirs).await, all);

    // Persisted state.
    let state = manager.peers().state(&peer.url).await.unwrap().unwrap();
    assert_eq!(state.status, "idle");
    assert!(state.last_sync > 0);
    assert_eq!(state.events_synced, 160);
    assert_eq!((state.have_count, state.need_count), (70, 90));
    assert_eq!(state.consecutive_failures, 0);

    // Nothing left to do.
    let again = manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(
        (again.have_count, again.need_count, again.rounds),
        (0, 0, 1)
    );
    assert_eq!(
        manager
            .peers()
            .state(&peer.url)
            .await
            .unwrap()
            .unwrap()
            .events_synced,
        160
    );
    // The lease is released after a sync.
    let lease = ours
        .acquire_lease(
            &format!("{LEASE_PREFIX}{}", peer.url),
            "someone-else",
            10_000,
        )
        .await
        .unwrap();
    assert!(lease.acquired);
}

#[tokio::test]
async fn events_failing_verification_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (store(&dir, "ours.db").await, store(&dir, "theirs.db").await);
    let keys = Keys::generate();
    let shared = events(&keys, 1, 50, 1_700_000_000);
    let only_theirs = events(&keys, 1, 5, 1_700_000_100);
    save(&ours, &shared).await;
    save(&theirs, &shared).await;
    save(&theirs, &only_theirs).await;
    let peer = spawn_peer(theirs, PeerMode::Tampering).await;
    let manager = SyncManager::new(ours.clone(), settings()).unwrap();
    let report = manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(report.need_count, 5);
    assert_eq!(report.fetched, 0);
    // A tampered event has a different id than the one asked for, or a bad signature: dropped.
    assert_eq!(report.invalid, 5);
    assert_eq!(stored_ids(&ours).await, ids(&[&shared]));
}

#[tokio::test]
async fn a_filter_limits_what_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (store(&dir, "ours.db").await, store(&dir, "theirs.db").await);
    let keys = Keys::generate();
    let notes = events(&keys, 1, 30, 1_700_000_000);
    let reactions = events(&keys, 7, 20, 1_700_000_000);
    save(&theirs, &notes).await;
    save(&theirs, &reactions).await;
    let peer = spawn_peer(theirs, PeerMode::Honest).await;
    let manager = SyncManager::new(ours.clone(), settings()).unwrap();
    let report = manager
        .sync_peer(
            &peer.url,
            Some(Filter::new().kind(Kind::Reaction)),
            &mut |_| {},
        )
        .await
        .unwrap();
    assert_eq!(report.fetched, 20);
    assert_eq!(stored_ids(&ours).await, ids(&[&reactions]));
}

#[tokio::test]
async fn a_peer_leased_by_another_replica_is_skipped_and_failures_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let ours = store(&dir, "ours.db").await;
    let theirs = store(&dir, "theirs.db").await;
    let peer = spawn_peer(theirs, PeerMode::Honest).await;
    let manager = SyncManager::new(ours.clone(), settings()).unwrap();
    manager
        .add_peers(std::slice::from_ref(&peer.url))
        .await
        .unwrap();

    let lease = format!("{LEASE_PREFIX}{}", peer.url);
    assert!(
        ours.acquire_lease(&lease, "replica-b", 60_000)
            .await
            .unwrap()
            .acquired
    );
    let e = manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(e, SyncError::Busy(ref m) if m.contains("replica-b")),
        "{e:?}"
    );
    ours.release_lease(&lease, "replica-b").await.unwrap();
    assert!(manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .is_ok());

    // A dead peer: the failure is recorded, and counted until a success.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("ws://{}", listener.local_addr().unwrap());
    drop(listener);
    manager
        .add_peers(std::slice::from_ref(&dead))
        .await
        .unwrap();
    for n in 1..=2 {
        let e = manager
            .sync_peer(&dead, None, &mut |_| {})
            .await
            .unwrap_err();
        assert!(matches!(e, SyncError::Connect { .. }), "{e:?}");
        let state = manager.peers().state(&dead).await.unwrap().unwrap();
        assert_eq!(
            (state.status.as_str(), state.consecutive_failures),
            ("error", n)
        );
        assert!(state.last_error.contains("cannot connect"));
    }
    // A pass over all peers syncs the live one and reports the dead one.
    let results = manager.sync_all(None).await;
    assert_eq!(results.len(), 2);
    assert_eq!(results.iter().filter(|(_, r)| r.is_ok()).count(), 1);
}

#[tokio::test]
async fn sync_with_peer_streams_progress_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (store(&dir, "ours.db").await, store(&dir, "theirs.db").await);
    let keys = Keys::generate();
    let shared = events(&keys, 1, 300, 1_700_000_000);
    let only_theirs = events(&keys, 1, 12, 1_700_000_100);
    let old_only_theirs = events(&keys, 1, 8, 1_600_000_000);
    save(&ours, &shared).await;
    save(&theirs, &shared).await;
    save(&theirs, &only_theirs).await;
    save(&theirs, &old_only_theirs).await;
    let peer = spawn_peer(theirs, PeerMode::Honest).await;
    let svc = serve(ours.clone(), EngineSettings::default(), settings()).await;
    let mut raw = GrpcNegentropy::connect_lazy(&svc.addr.to_string(), Duration::from_secs(10))
        .unwrap()
        .raw();

    // `since` leaves the old events out.
    let mut stream = raw
        .sync_with_peer(pb::SyncPeerRequest {
            peer_url: peer.url.clone(),
            filter: None,
            since: 1_650_000_000,
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(p) = stream.next().await {
        last = Some(p.unwrap());
    }
    let last = last.unwrap();
    assert!(last.complete && last.error.is_empty(), "{last:?}");
    assert_eq!(
        (last.need_count, last.fetched_count, last.have_count),
        (12, 12, 0)
    );
    assert_eq!(stored_ids(&ours).await, ids(&[&shared, &only_theirs]));

    // TriggerSync on a known peer, in the background, takes the rest.
    raw.add_peer(pb::AddPeerRequest {
        peer_url: peer.url.clone(),
    })
    .await
    .unwrap();
    raw.trigger_sync(pb::TriggerSyncRequest {
        peer_url: peer.url.clone(),
        filter: None,
    })
    .await
    .unwrap();
    let mut converged = false;
    for _ in 0..100 {
        if stored_ids(&ours).await.len() == 320 {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(converged);
    let mut state = None;
    for _ in 0..100 {
        let s = raw
            .get_peer_sync_state(pb::PeerSyncStateRequest {
                peer_url: peer.url.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if s.state
            .as_ref()
            .is_some_and(|s| s.status == "idle" && s.events_synced == 20)
        {
            state = s.state;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = state.expect("peer state after TriggerSync");
    assert!(state.last_sync > 0);
    let status = raw
        .get_sync_status(orly_proto::orlysync::common::v1::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.peer_count, 1);
    assert!(status.last_sync > 0);

    // A dead peer: the stream ends with the error.
    let mut stream = raw
        .sync_with_peer(pb::SyncPeerRequest {
            peer_url: "ws://127.0.0.1:1".into(),
            filter: None,
            since: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let p = stream.next().await.unwrap().unwrap();
    assert!(p.complete && p.error.contains("cannot connect"), "{p:?}");
}

#[tokio::test]
async fn a_peer_lost_mid_sync_is_recorded_and_the_next_sync_converges() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (store(&dir, "ours.db").await, store(&dir, "theirs.db").await);
    let keys = Keys::generate();
    let shared = events(&keys, 1, 200, 1_700_000_000);
    let only_ours = events(&keys, 1, 15, 1_700_000_010);
    let only_theirs = events(&keys, 1, 25, 1_700_000_020);
    save(&ours, &shared).await;
    save(&theirs, &shared).await;
    save(&ours, &only_ours).await;
    save(&theirs, &only_theirs).await;
    let manager = SyncManager::new(ours.clone(), settings()).unwrap();

    // The peer goes away after reconciliation, before sending events.
    let flaky = spawn_peer(theirs.clone(), PeerMode::HangUpOnReq).await;
    let e = manager
        .sync_peer(&flaky.url, None, &mut |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, SyncError::Disconnected(_)), "{e:?}");
    let state = manager.peers().state(&flaky.url).await.unwrap().unwrap();
    assert_eq!(
        (state.status.as_str(), state.consecutive_failures),
        ("error", 1)
    );
    assert_eq!(stored_ids(&ours).await, ids(&[&shared, &only_ours]));

    // Back up (same store behind a new endpoint): one sync converges both sides.
    let peer = spawn_peer(theirs.clone(), PeerMode::Honest).await;
    let report = manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap();
    assert_eq!((report.fetched, report.sent), (25, 15));
    let all = ids(&[&shared, &only_ours, &only_theirs]);
    assert_eq!(stored_ids(&ours).await, all);
    assert_eq!(stored_ids(&theirs).await, all);
}

#[tokio::test]
async fn the_periodic_loop_syncs_and_a_dead_replicas_lease_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (store(&dir, "ours.db").await, store(&dir, "theirs.db").await);
    let keys = Keys::generate();
    let only_theirs = events(&keys, 1, 10, 1_700_000_000);
    save(&theirs, &only_theirs).await;
    let peer = spawn_peer(theirs, PeerMode::Honest).await;

    // Another replica took the peer's lease and died: it never renews nor releases it.
    let lease = format!("{LEASE_PREFIX}{}", peer.url);
    assert!(
        ours.acquire_lease(&lease, "replica-dead", 1500)
            .await
            .unwrap()
            .acquired
    );

    let manager = SyncManager::new(
        ours.clone(),
        SyncSettings {
            interval: Duration::from_millis(200),
            ..settings()
        },
    )
    .unwrap();
    manager
        .add_peers(std::slice::from_ref(&peer.url))
        .await
        .unwrap();
    assert!(manager.start());
    assert!(!manager.start(), "already running");
    assert!(manager.is_active());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        stored_ids(&ours).await.is_empty(),
        "the lease holds the peer for its ttl"
    );
    let mut converged = false;
    for _ in 0..200 {
        if stored_ids(&ours).await == ids(&[&only_theirs]) {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        converged,
        "the loop took the peer over once the dead replica's lease expired"
    );
    assert!(manager.stop());
    assert!(!manager.is_active());
    assert!(manager.last_sync() > 0);
}

/// Regression: stopping the loop in the middle of a sync used to leave the lease-renewal task
/// running, so the peer's lease was renewed forever and no other replica could take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_mid_sync_lets_the_peer_lease_expire() {
    let dir = tempfile::tempdir().unwrap();
    let ours = store(&dir, "ours.db").await;
    // A peer that accepts connections and never answers: the sync hangs in its first read.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", hang.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let ttl = Duration::from_secs(3);
    let manager = SyncManager::new(
        ours.clone(),
        SyncSettings {
            lease_ttl: ttl,
            peer_timeout: Duration::from_secs(60),
            ..settings()
        },
    )
    .unwrap();
    manager.add_peers(std::slice::from_ref(&url)).await.unwrap();
    assert!(manager.start());
    let mut syncing = false;
    for _ in 0..100 {
        if !manager.syncing().is_empty() {
            syncing = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(syncing, "the sync with the silent peer started");
    assert!(manager.stop());

    // Once its ttl has passed, another replica can take the lease.
    let lease = format!(
        "{LEASE_PREFIX}{}",
        orly_sync_negentropy::peers::normalize_peer_url(&url).unwrap()
    );
    let mut taken = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if ours
            .acquire_lease(&lease, "replica-b", 3000)
            .await
            .unwrap()
            .acquired
        {
            taken = true;
            break;
        }
    }
    assert!(taken, "the stopped replica still holds {lease}");
    holder.abort();
}

/// A replica whose lease renewals fail — its store became unreachable in the middle of a sync
/// with a peer that takes its time — stops that sync before its lease expires, so no other
/// replica can take the peer over while it still works on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_whose_renewals_fail_stops_before_its_lease_expires() {
    let dir = tempfile::tempdir().unwrap();
    let direct = store(&dir, "ours.db").await;
    // The replica reaches its store through an orly-db server that will die.
    let db_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let db_addr = listener.local_addr().unwrap();
    let served = direct.clone();
    db_rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let _ = orly_db::grpc_server::serve(listener, served, std::future::pending()).await;
    });
    let via_grpc: orly_db::SharedStore = std::sync::Arc::new(
        orly_db::grpc_client::GrpcStore::with_options(
            &db_addr.to_string(),
            orly_common::ClientOptions::new("orly-db", Duration::from_millis(500)),
        )
        .unwrap(),
    );
    // A peer that accepts and never answers: the sync waits in its first read.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", hang.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let manager = SyncManager::new(
        via_grpc,
        SyncSettings {
            lease_ttl: Duration::from_secs(3),
            peer_timeout: Duration::from_secs(120),
            ..settings()
        },
    )
    .unwrap();
    let sync = {
        let (manager, url) = (manager.clone(), url.clone());
        tokio::spawn(async move {
            let result = manager.sync_peer(&url, None, &mut |_| {}).await;
            (result, orly_common::time::now_ms_i64())
        })
    };
    let mut syncing = false;
    for _ in 0..200 {
        if !manager.syncing().is_empty() {
            syncing = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(syncing, "the sync with the silent peer started");

    db_rt.shutdown_background();
    let lease = format!(
        "{LEASE_PREFIX}{}",
        orly_sync_negentropy::peers::normalize_peer_url(&url).unwrap()
    );
    let probe = direct.acquire_lease(&lease, "probe", 1).await.unwrap();
    assert!(
        !probe.acquired,
        "the lease is still held when the store goes away"
    );
    let expires_at = orly_common::time::now_ms_i64() + probe.remaining_ms;

    let (result, stopped_at) = tokio::time::timeout(Duration::from_secs(30), sync)
        .await
        .expect("the sync stops")
        .unwrap();
    let e = result.unwrap_err();
    assert!(matches!(e, SyncError::LeaseLost(_)), "{e:?}");
    // SQLite's clock is this machine's clock, so the two compare.
    assert!(
        stopped_at < expires_at,
        "stopped at {stopped_at}, the lease expired at {expires_at}"
    );
    assert!(manager.syncing().is_empty());
    holder.abort();
}
