//! Benchmark (ignored by default): for sets of N events with 0 %, 1 % and 10 % differences split
//! between both sides, the round trips, bytes each way and wall time of (a) the reconciliation
//! alone (a negentropy client against the engine, in-process) and (b) a full relay-to-relay sync
//! (our `SyncManager` against a peer relay over a loopback WebSocket: reconcile, download with
//! verification, upload).
//!
//! ```text
//! ORLY_NEG_BENCH_SIZES=10000,100000 CARGO_TARGET_DIR=/work/target \
//!   cargo test -p orly-sync-negentropy --release --test bench -- --ignored --nocapture
//! ```

mod common;

use std::time::{Duration, Instant};

use common::*;
use nostr::{Event, Filter, Keys};
use orly_sync_negentropy::{
    reconcile_as_client, EngineSettings, NegentropyEngine, SyncManager, SyncSettings,
};

fn sizes() -> Vec<usize> {
    std::env::var("ORLY_NEG_BENCH_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn percents() -> Vec<usize> {
    std::env::var("ORLY_NEG_BENCH_PERCENTS")
        .unwrap_or_else(|_| "0,1,10".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// `n` signed events over a few keys, spread over ~a month of timestamps.
fn corpus(n: usize) -> Vec<Event> {
    let keys: Vec<Keys> = (0..8).map(|_| Keys::generate()).collect();
    (0..n)
        .map(|i| {
            nostr::EventBuilder::text_note(format!("bench {i}"))
                .custom_created_at(nostr::Timestamp::from(1_700_000_000 + (i as u64 * 26)))
                .sign_with_keys(&keys[i % keys.len()])
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: minutes of work; run with --ignored --nocapture (see the module docs)"]
async fn negentropy_benchmark() {
    println!(
        "{:>9} {:>5} {:>6} | {:>6} {:>9} {:>9} {:>8} {:>7} | {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "events", "diff%", "diffs", "rounds", "rec_up_B", "rec_dn_B", "rec_ms", "goal_B",
        "rounds", "rec_up_B", "rec_dn_B", "ws_up_B", "ws_dn_B", "rec_ms", "sync_ms"
    );
    for n in sizes() {
        let started = Instant::now();
        let max_diff = n / 10;
        let all = corpus(n + max_diff);
        eprintln!("signed {} events in {:?}", all.len(), started.elapsed());
        for pct in percents() {
            let diffs = n * pct / 100;
            let shared = &all[..n - diffs];
            // Differences split between both sides, interleaved in time with the shared events.
            let extra = &all[n - diffs..n];
            let (ours_only, theirs_only): (Vec<Event>, Vec<Event>) = extra
                .iter()
                .cloned()
                .enumerate()
                .partition(|(i, _)| i % 2 == 0)
                .into_iter_pair();
            let dir = tempfile::tempdir().unwrap();
            let (ours, theirs) = (store(&dir, "ours.db").await, store(&dir, "theirs.db").await);
            let t = Instant::now();
            save(&ours, shared).await;
            save(&theirs, shared).await;
            save(&ours, &ours_only).await;
            save(&theirs, &theirs_only).await;
            eprintln!("n={n} diff={pct}%: stores filled in {:?}", t.elapsed());

            // (a) Reconciliation alone, in-process.
            let engine = NegentropyEngine::new(
                theirs.clone(),
                EngineSettings {
                    max_records: 0,
                    ..EngineSettings::default()
                },
            )
            .unwrap();
            let client_items = ours.negentropy_items(&[Filter::new()]).await.unwrap();
            let t = Instant::now();
            let rec = reconcile_as_client(
                &*engine,
                "bench",
                "bench",
                &Filter::new(),
                &client_items,
                4096,
            )
            .await
            .unwrap();
            let rec_time = t.elapsed();
            assert_eq!(rec.have.len(), ours_only.len());
            assert_eq!(rec.need.len(), theirs_only.len());
            let goal = 3 * diffs as u64 * 32 + 16 * 1024;

            // (b) Full relay-to-relay sync over a WebSocket.
            let peer = spawn_peer(theirs.clone(), PeerMode::Honest).await;
            let manager = SyncManager::new(
                ours.clone(),
                SyncSettings {
                    max_records: 0,
                    interval: Duration::from_secs(3600),
                    peer_timeout: Duration::from_secs(120),
                    ..SyncSettings::default()
                },
            )
            .unwrap();
            let report = manager
                .sync_peer(&peer.url, None, &mut |_| {})
                .await
                .unwrap();
            assert_eq!(report.fetched as usize, theirs_only.len());
            assert_eq!(report.sent as usize, ours_only.len());
            assert_eq!(
                ours.count(&[Filter::new()]).await.unwrap(),
                theirs.count(&[Filter::new()]).await.unwrap()
            );
            println!(
                "{:>9} {:>5} {:>6} | {:>6} {:>9} {:>9} {:>8} {:>7} | {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
                n,
                pct,
                diffs,
                rec.rounds,
                rec.bytes_sent,
                rec.bytes_received,
                rec_time.as_millis(),
                goal,
                report.rounds,
                report.reconcile_bytes_sent,
                report.reconcile_bytes_received,
                report.bytes_sent,
                report.bytes_received,
                report.reconcile_time.as_millis(),
                report.total_time.as_millis(),
            );
        }
    }
}

trait IntoIterPair {
    fn into_iter_pair(self) -> (Vec<Event>, Vec<Event>);
}

impl IntoIterPair for (Vec<(usize, Event)>, Vec<(usize, Event)>) {
    fn into_iter_pair(self) -> (Vec<Event>, Vec<Event>) {
        (
            self.0.into_iter().map(|(_, e)| e).collect(),
            self.1.into_iter().map(|(_, e)| e).collect(),
        )
    }
}
