//! Peer sync past the record cap (issue 17): stores holding ten times more events than one
//! reconciliation may take converge window by window; later passes reconcile only the recent
//! windows, and old ones again once they are due for a re-check; a peer refusing a window
//! (`blocked:`) gets it in halves; a second holding more events than the cap is reported and
//! the rest still syncs.

mod common;

use std::time::Duration;

use common::*;
use nostr::Keys;
use orly_sync_negentropy::windows::KIND_WINDOWS;
use orly_sync_negentropy::{EngineSettings, SyncManager, SyncSettings, WindowPlan};

const CAP: usize = 500;
const DAY: u64 = 86_400;

fn settings(holder: &str) -> SyncSettings {
    SyncSettings {
        interval: Duration::from_secs(3600),
        max_records: CAP,
        batch_size: 100,
        peer_timeout: Duration::from_secs(20),
        window_recent: Duration::from_secs(3600),
        window_recheck: Duration::from_secs(6 * 3600),
        holder: holder.into(),
        ..SyncSettings::default()
    }
}

fn small_peer() -> EngineSettings {
    EngineSettings {
        max_records: CAP,
        ..EngineSettings::default()
    }
}

async fn plan(manager: &SyncManager, url: &str) -> WindowPlan {
    manager
        .peers()
        .book()
        .json::<WindowPlan>(KIND_WINDOWS, url)
        .await
        .unwrap()
        .expect("a stored plan")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_the_cap_converges_in_windows_and_later_passes_recheck_only_recent_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (store(&dir, "ours.db").await, store(&dir, "theirs.db").await);
    let keys = Keys::generate();
    let now = orly_common::time::now_secs();
    // 5,000 events over 50 days: 4,000 on both sides, 500 only ours, 500 only theirs.
    let all = events_at(&keys, (0..5000u64).map(|i| now - 50 * DAY + i * 864));
    let (mut shared, mut only_ours, mut only_theirs) = (Vec::new(), Vec::new(), Vec::new());
    for (i, e) in all.into_iter().enumerate() {
        match i % 10 {
            8 => only_ours.push(e),
            9 => only_theirs.push(e),
            _ => shared.push(e),
        }
    }
    save(&ours, &shared).await;
    save(&theirs, &shared).await;
    save(&ours, &only_ours).await;
    save(&theirs, &only_theirs).await;
    let peer = spawn_peer_with(theirs.clone(), PeerMode::Honest, small_peer()).await;
    let manager = SyncManager::new(ours.clone(), settings("replica-a")).unwrap();
    manager
        .add_peers(std::slice::from_ref(&peer.url))
        .await
        .unwrap();

    // The first pass: the old single reconciliation would be refused (4,500 > 500 records).
    let first = manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap();
    eprintln!(
        "first pass: {} windows, {} reconciled, {} cuts, {} rounds",
        first.windows, first.windows_reconciled, first.windows_split, first.rounds
    );
    assert_eq!(first.windows_failed, 0, "{}", first.window_error);
    assert_eq!((first.fetched, first.sent), (500, 500));
    assert!(first.windows >= 10, "{first:?}");
    assert!(first.windows_split > 0);
    assert!(u64::from(first.windows_reconciled) >= u64::from(first.windows));
    let everything = ids(&[&shared, &only_ours, &only_theirs]);
    assert_eq!(stored_ids(&ours).await, everything);
    assert_eq!(stored_ids(&theirs).await, everything);
    let stored = plan(&manager, &peer.url).await;
    assert!(stored.is_well_formed());
    assert_eq!(stored.windows.len() as u32, first.windows);
    for w in &stored.windows {
        // Each side of a window holds at most the cap; their union at most twice that.
        assert!(w.records <= 2 * CAP as u64, "window {w:?} is over the cap");
        assert!(w.checked_at > 0 && w.error.is_empty(), "{w:?}");
    }
    let state = manager.peers().state(&peer.url).await.unwrap().unwrap();
    assert_eq!(state.status, "idle");
    assert_eq!(state.windows, i64::from(first.windows));

    // Nothing changed: only the recent windows are reconciled.
    let second = manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap();
    eprintln!(
        "second pass: {} of {} windows reconciled",
        second.windows_reconciled, second.windows
    );
    assert_eq!((second.fetched, second.sent), (0, 0));
    assert!(
        (1..=2).contains(&second.windows_reconciled),
        "recent windows only: {second:?}"
    );
    assert_eq!(second.windows, first.windows);

    // New events on the peer, recent ones and old ones: the next pass brings the recent ones;
    // the old windows are not due yet.
    let recent = events_at(&keys, (0..20u64).map(|i| now - 600 + i));
    let late_old = events_at(&keys, (0..5u64).map(|i| now - 40 * DAY + i * 7));
    save(&theirs, &recent).await;
    save(&theirs, &late_old).await;
    let third = manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(third.fetched, 20, "{third:?}");
    assert!(third.windows_reconciled <= 2, "{third:?}");
    assert!(stored_ids(&ours).await.is_disjoint(&ids(&[&late_old])));

    // A replica that re-checks every window each pass (re-check age zero) follows the same
    // stored plan: a full sweep, which finds the late old events.
    let sweeper = SyncManager::new(
        ours.clone(),
        SyncSettings {
            window_recheck: Duration::ZERO,
            ..settings("replica-b")
        },
    )
    .unwrap();
    let sweep = sweeper
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap();
    eprintln!(
        "sweep: {} of {} windows reconciled",
        sweep.windows_reconciled, sweep.windows
    );
    assert_eq!(sweep.fetched, 5);
    assert!(sweep.windows_reconciled >= third.windows.saturating_sub(1));
    assert_eq!(
        stored_ids(&ours).await,
        ids(&[&shared, &only_ours, &only_theirs, &recent, &late_old])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_the_peer_refuses_are_halved_until_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (store(&dir, "ours.db").await, store(&dir, "theirs.db").await);
    let keys = Keys::generate();
    let now = orly_common::time::now_secs();
    // We are empty: our side always fits, the peer holds three times its cap.
    let theirs_only = events_at(&keys, (0..1500u64).map(|i| now - 10 * DAY + i * 500));
    save(&theirs, &theirs_only).await;
    let peer = spawn_peer_with(theirs.clone(), PeerMode::Honest, small_peer()).await;
    let manager = SyncManager::new(ours.clone(), settings("replica-a")).unwrap();
    manager
        .add_peers(std::slice::from_ref(&peer.url))
        .await
        .unwrap();
    let report = manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap();
    eprintln!(
        "{} windows, {} reconciled, {} cuts",
        report.windows, report.windows_reconciled, report.windows_split
    );
    assert_eq!(report.windows_failed, 0, "{}", report.window_error);
    assert!(report.windows_split >= 2, "{report:?}");
    assert_eq!(report.fetched, 1500);
    assert_eq!(stored_ids(&ours).await, ids(&[&theirs_only]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_over_the_cap_is_reported_and_the_rest_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (store(&dir, "ours.db").await, store(&dir, "theirs.db").await);
    let keys = Keys::generate();
    let now = orly_common::time::now_secs();
    let crowded = now - 3 * DAY;
    // 600 events of ours at one second: no window can hold them.
    let one_second = events_at(&keys, std::iter::repeat_n(crowded, 600));
    let before = events_at(&keys, (0..100u64).map(|i| crowded - 1000 + i));
    let after = events_at(&keys, (0..100u64).map(|i| crowded + 1000 + i));
    save(&ours, &one_second).await;
    save(&theirs, &before).await;
    save(&theirs, &after).await;
    let peer = spawn_peer_with(theirs.clone(), PeerMode::Honest, small_peer()).await;
    let manager = SyncManager::new(ours.clone(), settings("replica-a")).unwrap();
    let report = manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(report.windows_failed, 1, "{report:?}");
    assert!(report.window_error.contains("one second"), "{report:?}");
    assert_eq!(report.fetched, 200, "the windows around it synced");
    let state = manager.peers().state(&peer.url).await.unwrap().unwrap();
    assert_eq!(state.status, "error");
    assert!(
        state.last_error.contains("could not be reconciled"),
        "{state:?}"
    );
    // It stays failed (and due) on the next pass; nothing else is lost.
    let again = manager
        .sync_peer(&peer.url, None, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(again.windows_failed, 1);
    assert_eq!(again.fetched, 0);
}
