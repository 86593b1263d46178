//! Benchmark against the fake API server: operator memory with 100 OrlyRelays, and the time
//! from a watch event to one OrlyRelay's children applied (first tier, and all tiers when
//! workloads become Available at once). Run with `cargo bench -p orly-operator --bench reconcile`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_api::FakeApi;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::core::error_boundary::DeserializeGuard;
use orly_operator::controller::{self, reconcile, ControllerConfig};
use orly_operator::crd::{OrlyRelay, OrlyRelaySpec, Phase};

const NS: &str = "bench";
const RELAYS: usize = 100;
const SAMPLES: usize = 20;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn relay(name: &str) -> OrlyRelay {
    let spec: OrlyRelaySpec = serde_yaml::from_str(
        "sync: {cluster: {enabled: true}, negentropy: {enabled: true}}\nrelay: {nip77: true}",
    )
    .expect("spec");
    let mut relay = OrlyRelay::new(name, spec);
    relay.metadata.namespace = Some(NS.into());
    relay
}

fn is_ready(fake: &FakeApi, name: &str) -> bool {
    fake.get::<OrlyRelay>(NS, name)
        .and_then(|r| r.status)
        .is_some_and(|s| s.phase == Some(Phase::Ready))
}

async fn wait(what: &str, timeout: Duration, check: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    start.elapsed()
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn stop_signal() -> (
    tokio::sync::oneshot::Sender<()>,
    impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

async fn memory_with_100_relays() {
    // Fill the fake with 100 Ready OrlyRelays and all their children first, reconciling
    // directly, so that the controller started afterwards only adds its own memory.
    let fake = FakeApi::new().quiet().auto_available();
    let harness = common::context(&fake);
    for i in 0..RELAYS {
        let name = format!("relay-{i:03}");
        fake.insert(&relay(&name));
        for _ in 0..4 {
            harness.sync(&fake);
            let stored: OrlyRelay = fake.get(NS, &name).expect("stored");
            let _ = reconcile(Arc::new(DeserializeGuard(Ok(stored))), harness.ctx.clone()).await;
        }
        assert!(is_ready(&fake, &name), "{name} Ready");
    }
    drop(harness);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let objects = fake.len();
    let before = rss_kib();

    let (stop, signal) = stop_signal();
    let started = Instant::now();
    let task = tokio::spawn(controller::run(
        fake.client(),
        ControllerConfig::default(),
        signal,
    ));
    // Every relay is reconciled once at start-up; wait until the request stream settles.
    let mut last = fake.len();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = fake.len();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    let after = rss_kib();
    println!(
        "memory: {RELAYS} OrlyRelays ({objects} objects in the fake API), RSS before controller {before} KiB, after initial sync {after} KiB, controller adds {} KiB; sync took {:?}",
        after.saturating_sub(before),
        started.elapsed().saturating_sub(Duration::from_secs(2)),
    );
    let _ = stop.send(());
    let _ = task.await;
}

async fn latency() {
    // First tier: watch event of a new OrlyRelay → its db tier applied and status written.
    let fake = FakeApi::new().quiet();
    let (stop, signal) = stop_signal();
    let task = tokio::spawn(controller::run(
        fake.client(),
        ControllerConfig::default(),
        signal,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut first_tier = Vec::new();
    for i in 0..SAMPLES {
        let name = format!("first-{i}");
        let inserted = Instant::now();
        fake.insert(&relay(&name));
        let f = fake.clone();
        let n = name.clone();
        wait("db tier", Duration::from_secs(10), move || {
            f.get::<StatefulSet>(NS, &format!("{n}-db")).is_some()
                && f.get::<OrlyRelay>(NS, &n).and_then(|r| r.status).is_some()
        })
        .await;
        first_tier.push(inserted.elapsed());
    }
    let _ = stop.send(());
    let _ = task.await;

    // All tiers: with instant rollouts, watch event → every child of the relay applied and
    // Ready (three gated reconciles, each triggered by the previous tier's watch events).
    let fake = FakeApi::new().quiet().auto_available();
    let (stop, signal) = stop_signal();
    let task = tokio::spawn(controller::run(
        fake.client(),
        ControllerConfig::default(),
        signal,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut all_tiers = Vec::new();
    for i in 0..SAMPLES {
        let name = format!("full-{i}");
        let inserted = Instant::now();
        fake.insert(&relay(&name));
        let f = fake.clone();
        let n = name.clone();
        wait("Ready", Duration::from_secs(10), move || {
            is_ready(&f, &n)
                && f.get::<Deployment>(NS, &format!("{n}-relay")).is_some()
                && f.get::<ConfigMap>(NS, &format!("{n}-relay")).is_some()
        })
        .await;
        all_tiers.push(inserted.elapsed());
    }
    let _ = stop.send(());
    let _ = task.await;

    println!(
        "latency, watch event -> db tier applied + status: median {:?}, p95 {:?} ({SAMPLES} samples)",
        percentile(&mut first_tier, 0.5),
        percentile(&mut first_tier, 0.95)
    );
    println!(
        "latency, watch event -> all 5 components' children applied and Ready: median {:?}, p95 {:?} ({SAMPLES} samples)",
        percentile(&mut all_tiers, 0.5),
        percentile(&mut all_tiers, 0.95)
    );
}

fn main() {
    // `cargo test --benches` runs this binary with `--bench` absent; keep it quick then.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("reconcile benchmark: run with `cargo bench -p orly-operator --bench reconcile`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        latency().await;
        memory_with_100_relays().await;
    });
}
