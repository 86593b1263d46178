//! The Kubernetes suite: the operator installed by its Helm chart runs OrlyRelays in a kind
//! cluster or any cluster a kubeconfig names, and these tests drive them through the relay
//! Service (port-forwarded by `e2e/kind/run.sh`) and `kubectl`:
//!
//! - `minimal` (operator/examples/minimal.yaml: SQLite StatefulSet db, acl, one relay):
//!   publish and query; the db pod and the relay pod deleted, replaced by their
//!   StatefulSet / Deployment, every acknowledged event still there; no HPA.
//! - `scaled` (e2e/kind/orlyrelay-postgres.yaml: PostgreSQL, 2 db and 2 relay replicas,
//!   negentropy autoscaled 1..3, NIP-77 on), when `ORLY_E2E_SCALED_URL` is set: NIP-77 sync
//!   with nostr-sdk; `kubectl scale` of the negentropy Deployment while the relay keeps
//!   accepting every event; a db pod and a negentropy pod deleted while it keeps serving; the
//!   HPA the operator made for the negentropy Deployment.
//!
//! Both relays: the gRPC token Secret on every component, a NetworkPolicy per component
//! opening each gRPC port to its callers only, headless gRPC Services, the relay's preStop
//! drain (a WebSocket open on a relay pod being deleted is closed with 1001).
//!
//! The tests of `run.sh --plan` (which cluster, where the images come from) need no cluster
//! and run in every `cargo test`.
//!
//! Env (set by run.sh): `ORLY_E2E_NAMESPACE`, `ORLY_E2E_MINIMAL_RELAY`, `ORLY_E2E_MINIMAL_URL`,
//! `ORLY_E2E_SCALED_RELAY`, `ORLY_E2E_SCALED_URL` (ws://127.0.0.1:<forwarded port>).
//! run.sh re-establishes a port-forward when the pod behind it goes away, so the tests retry
//! connections for a while after deleting the pod that serves the forward. The tests run on a
//! multi-threaded runtime so the background publisher keeps going while `kubectl` runs.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use nostr::{Event, EventId, Filter, Keys, Kind};
use nostr_sdk::prelude::{
    Client as SdkClient, MemoryDatabase, MemoryDatabaseOptions, NostrDatabase, SyncDirection,
    SyncOptions,
};
use orly_e2e::kube::{
    child_name, component_selector, env_secret_ref, get_json, is_headless, kubectl, policy_callers,
    pre_stop_command, ready_replicas, running_pods, secret_value,
};
use orly_e2e::ws::{self, Client};
use orly_e2e::{note, note_at, now, wait_for};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const READY_TIMEOUT: Duration = Duration::from_secs(300);

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn namespace() -> String {
    env("ORLY_E2E_NAMESPACE", "orly-e2e")
}

struct Relay {
    name: String,
    url: String,
}

fn minimal() -> Relay {
    Relay {
        name: env("ORLY_E2E_MINIMAL_RELAY", "minimal"),
        url: std::env::var("ORLY_E2E_MINIMAL_URL")
            .expect("ORLY_E2E_MINIMAL_URL is not set: run e2e/kind/run.sh"),
    }
}

/// The PostgreSQL relay, when run.sh deployed it.
fn scaled() -> Option<Relay> {
    let url = std::env::var("ORLY_E2E_SCALED_URL").ok()?;
    Some(Relay {
        name: env("ORLY_E2E_SCALED_RELAY", "scaled"),
        url,
    })
}

fn notes(label: &str, n: usize) -> Vec<Event> {
    let keys = Keys::generate();
    (0..n)
        .map(|i| note(&keys, &format!("{label} {i}")))
        .collect()
}

/// Waits until the relay answers a REQ (through a port-forward that may be re-established).
async fn wait_serving(url: &str) -> Result<()> {
    wait_for(
        &format!("{url} serving"),
        READY_TIMEOUT,
        Duration::from_secs(1),
        || async { ws::relay_serves(url).await.map(|ok| ok.then_some(())) },
    )
    .await
}

/// Publishes, retrying connection failures and `error:` refusals for up to `READY_TIMEOUT`.
async fn publish_eventually(url: &str, events: &[Event]) -> Result<Vec<EventId>> {
    let mut ids = Vec::new();
    for e in events {
        wait_for("publish", READY_TIMEOUT, Duration::from_secs(1), || async {
            let mut c = Client::connect(url).await?;
            let ok = c.publish(e).await?;
            c.close().await;
            if ok.accepted {
                Ok(Some(()))
            } else if ok.message.starts_with("error:") {
                bail!("refused: {}", ok.message)
            } else {
                panic!("event refused for good: {}", ok.message)
            }
        })
        .await?;
        ids.push(e.id);
    }
    Ok(ids)
}

async fn assert_all_stored(url: &str, ids: &[EventId]) -> Result<()> {
    let found = wait_for("query", READY_TIMEOUT, Duration::from_secs(1), || async {
        ws::stored_at(url, ids).await.map(Some)
    })
    .await?;
    let missing: Vec<_> = ids.iter().filter(|i| !found.contains(i)).collect();
    ensure!(
        missing.is_empty(),
        "{} acknowledged events missing: {missing:?}",
        missing.len()
    );
    Ok(())
}

/// Deletes one Running pod of a component and waits until as many Ready pods run again, none
/// of them the deleted one.
async fn delete_pod_and_wait_replaced(relay: &str, component: &str) -> Result<String> {
    let ns = namespace();
    let before = running_pods(&ns, relay, component)?;
    let victim = before
        .first()
        .with_context(|| format!("no running {component} pod of {relay}"))?
        .clone();
    kubectl(&["-n", &ns, "delete", "pod", &victim, "--wait=false"])?;
    let start = Instant::now();
    loop {
        let now = running_pods(&ns, relay, component)?;
        if now.len() >= before.len() && !now.contains(&victim) {
            eprintln!(
                "{component} pod {victim} replaced by {now:?} in {:.1}s",
                start.elapsed().as_secs_f64()
            );
            return Ok(victim);
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!("{component} pod {victim} not replaced: running {now:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Publishes one event every 200 ms until stopped; counts the acknowledged and refused ones.
struct Publisher {
    stop: Arc<AtomicBool>,
    acked: Arc<std::sync::Mutex<Vec<EventId>>>,
    refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let refused = Arc::new(AtomicUsize::new(0));
        let (s, a, r) = (stop.clone(), acked.clone(), refused.clone());
        let task = tokio::spawn(async move {
            let keys = Keys::generate();
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let e = note(&keys, &format!("background {i}"));
                let res = async {
                    let mut c = Client::connect(&url).await?;
                    let ok = c.publish(&e).await?;
                    c.close().await;
                    anyhow::Ok(ok)
                }
                .await;
                match res {
                    Ok(ok) if ok.accepted => a.lock().unwrap().push(e.id),
                    Ok(ok) => {
                        eprintln!("background publish refused: {}", ok.message);
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        eprintln!("background publish failed: {err:#}");
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self {
            stop,
            acked,
            refused,
            task,
        }
    }

    async fn finish(self) -> (Vec<EventId>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (acked, self.refused.load(Ordering::Relaxed))
    }
}

/// nostr-sdk NIP-77 sync (both directions) of a fresh author's notes against `url`.
async fn nip77_sync(url: &str) -> Result<()> {
    let keys = Keys::generate();
    let t = now() - 10_000;
    let make = |label: &str, base: u64, n: usize| -> Vec<Event> {
        (0..n)
            .map(|i| note_at(&keys, &format!("{label} {i}"), base + i as u64))
            .collect()
    };
    let shared = make("shared", t, 30);
    let relay_only = make("relay-only", t + 1_000, 10);
    let client_only = make("client-only", t + 2_000, 5);
    publish_eventually(url, &[shared.clone(), relay_only.clone()].concat()).await?;
    let db = MemoryDatabase::with_opts(MemoryDatabaseOptions {
        events: true,
        max_events: None,
    });
    for e in shared.iter().chain(&client_only) {
        db.save_event(e).await?;
    }
    let client = SdkClient::builder().database(db).build();
    client.add_relay(url).await?;
    client.connect().await;
    let opts = SyncOptions::new()
        .direction(SyncDirection::Both)
        .initial_timeout(Duration::from_secs(20));
    let filter = Filter::new().kind(Kind::TextNote).author(keys.public_key());
    let out = tokio::time::timeout(Duration::from_secs(60), client.sync(filter, &opts))
        .await
        .context("NIP-77 sync did not finish in 60 s")??;
    client.shutdown().await;
    ensure!(out.failed.is_empty(), "sync failed: {:?}", out.failed);
    let got: BTreeSet<EventId> = out.val.received.iter().copied().collect();
    let want: BTreeSet<EventId> = relay_only.iter().map(|e| e.id).collect();
    ensure!(
        got == want,
        "received {} of {} relay-only events",
        got.len(),
        want.len()
    );
    let sent: BTreeSet<EventId> = out.val.sent.iter().copied().collect();
    ensure!(
        sent.len() == client_only.len(),
        "sent {} of {}",
        sent.len(),
        client_only.len()
    );
    let uploaded: Vec<EventId> = client_only.iter().map(|e| e.id).collect();
    assert_all_stored(url, &uploaded).await
}

/// NIP-77 with a few attempts: a session on a replica that went away ends with `error:` and
/// the client opens a new one.
async fn nip77_sync_eventually(url: &str) -> Result<()> {
    let mut last = None;
    for _ in 0..3 {
        match nip77_sync(url).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                eprintln!("NIP-77 sync attempt failed: {e:#}");
                last = Some(e);
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
    }
    Err(last.unwrap())
}

async fn wait_ready_replicas(deployment: &str, want: i64) -> Result<()> {
    let ns = namespace();
    let start = Instant::now();
    loop {
        let ready = ready_replicas(&ns, deployment)?;
        if ready == want {
            eprintln!(
                "{deployment}: {ready} ready after {:.1}s",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!("{deployment}: {ready} ready replicas, want {want}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn minimal_publish_and_query_through_the_relay_service() -> Result<()> {
    let r = minimal();
    wait_serving(&r.url).await?;
    let events = notes("kind minimal", 20);
    let ids = publish_eventually(&r.url, &events).await?;
    assert_all_stored(&r.url, &ids).await?;
    let mut c = Client::connect(&r.url).await?;
    let author = events[0].pubkey.to_hex();
    let got = c
        .req(json!({"authors": [author], "limit": 5}))
        .await?
        .map_err(|reason| anyhow::anyhow!("CLOSED: {reason}"))?;
    ensure!(got.len() == 5, "limit 5 returned {}", got.len());
    c.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn minimal_db_pod_deleted_is_replaced_and_events_stay() -> Result<()> {
    let r = minimal();
    wait_serving(&r.url).await?;
    let ids = publish_eventually(&r.url, &notes("before db pod delete", 10)).await?;
    // SQLite: one db pod of a StatefulSet, its volume claim kept across the replacement.
    delete_pod_and_wait_replaced(&r.name, "db").await?;
    wait_serving(&r.url).await?;
    assert_all_stored(&r.url, &ids).await?;
    let after = publish_eventually(&r.url, &notes("after db pod delete", 3)).await?;
    assert_all_stored(&r.url, &after).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn minimal_relay_pod_deleted_is_replaced_and_events_stay() -> Result<()> {
    let r = minimal();
    wait_serving(&r.url).await?;
    let ids = publish_eventually(&r.url, &notes("before relay pod delete", 10)).await?;
    delete_pod_and_wait_replaced(&r.name, "relay").await?;
    // run.sh's port-forward loop reconnects to the new pod.
    wait_serving(&r.url).await?;
    assert_all_stored(&r.url, &ids).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn minimal_has_no_hpa_and_the_expected_children() -> Result<()> {
    let r = minimal();
    let ns = namespace();
    let hpas = kubectl(&[
        "-n",
        &ns,
        "get",
        "hpa",
        "-l",
        &format!("app.kubernetes.io/instance={}", r.name),
        "-o",
        "name",
    ])?;
    ensure!(hpas.is_empty(), "minimal has HPAs: {hpas}");
    get_json(&ns, "statefulset", &child_name(&r.name, "db"))?;
    get_json(&ns, "deployment", &child_name(&r.name, "acl"))?;
    get_json(&ns, "deployment", &child_name(&r.name, "relay"))?;
    let svc = get_json(&ns, "service", &child_name(&r.name, "relay"))?;
    ensure!(
        svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["port"] == 3334),
        "relay Service has no port 3334: {svc}"
    );
    let relay = get_json(&ns, "orlyrelay", &r.name)?;
    let ready = relay["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    ensure!(
        ready,
        "OrlyRelay {} is not Ready: {}",
        r.name,
        relay["status"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn scaled_nip77_sync_through_the_relay_service() -> Result<()> {
    let Some(r) = scaled() else {
        eprintln!("ORLY_E2E_SCALED_URL unset: no PostgreSQL relay deployed, skipped");
        return Ok(());
    };
    wait_serving(&r.url).await?;
    nip77_sync_eventually(&r.url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn scaled_sync_deployment_scaled_while_the_relay_keeps_serving() -> Result<()> {
    let Some(r) = scaled() else {
        eprintln!("ORLY_E2E_SCALED_URL unset: no PostgreSQL relay deployed, skipped");
        return Ok(());
    };
    let ns = namespace();
    let deployment = child_name(&r.name, "sync-negentropy");
    wait_serving(&r.url).await?;
    let publisher = Publisher::start(r.url.clone());
    // kubectl scale owns the count then, and with the HPA there the operator leaves replicas
    // to it (the handoff), so the count sticks until the HPA acts; without metrics-server in
    // kind it does not.
    for want in [3, 1] {
        kubectl(&[
            "-n",
            &ns,
            "scale",
            "deployment",
            &deployment,
            &format!("--replicas={want}"),
        ])?;
        wait_ready_replicas(&deployment, want).await?;
        nip77_sync_eventually(&r.url).await?;
    }
    let (acked, refused) = publisher.finish().await;
    ensure!(
        refused == 0,
        "{refused} publishes refused while scaling the sync pods"
    );
    ensure!(!acked.is_empty(), "nothing published while scaling");
    assert_all_stored(&r.url, &acked).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn scaled_db_and_sync_pods_deleted_while_the_relay_keeps_serving() -> Result<()> {
    let Some(r) = scaled() else {
        eprintln!("ORLY_E2E_SCALED_URL unset: no PostgreSQL relay deployed, skipped");
        return Ok(());
    };
    wait_serving(&r.url).await?;
    let before = publish_eventually(&r.url, &notes("before scaled pod deletes", 10)).await?;
    let publisher = Publisher::start(r.url.clone());
    // PostgreSQL db pods are stateless replicas the relay balances over; a lost one may cost
    // an `error:` answer until the client drops it, never an acknowledged event.
    delete_pod_and_wait_replaced(&r.name, "db").await?;
    delete_pod_and_wait_replaced(&r.name, "sync-negentropy").await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (acked, refused) = publisher.finish().await;
    eprintln!(
        "while deleting pods: {} acknowledged, {refused} refused",
        acked.len()
    );
    ensure!(
        acked.len() > refused * 4,
        "the relay mostly failed: {} ok, {refused} refused",
        acked.len()
    );
    assert_all_stored(&r.url, &before).await?;
    assert_all_stored(&r.url, &acked).await?;
    nip77_sync_eventually(&r.url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn scaled_has_an_hpa_for_the_autoscaled_sync_service() -> Result<()> {
    let Some(r) = scaled() else {
        eprintln!("ORLY_E2E_SCALED_URL unset: no PostgreSQL relay deployed, skipped");
        return Ok(());
    };
    let ns = namespace();
    let name = child_name(&r.name, "sync-negentropy");
    let hpa = get_json(&ns, "hpa", &name)?;
    let spec = &hpa["spec"];
    ensure!(spec["scaleTargetRef"]["kind"] == "Deployment", "{spec}");
    ensure!(spec["scaleTargetRef"]["name"] == name.as_str(), "{spec}");
    ensure!(
        spec["minReplicas"] == 1 && spec["maxReplicas"] == 3,
        "{spec}"
    );
    let labels = &hpa["metadata"]["labels"];
    ensure!(
        labels["app.kubernetes.io/component"] == "sync-negentropy",
        "{labels}"
    );
    // The Deployment leaves its replica count to the HPA.
    let pods = kubectl(&[
        "-n",
        &ns,
        "get",
        "pods",
        "-l",
        &component_selector(&r.name, "sync-negentropy"),
        "-o",
        "name",
    ])?;
    ensure!(!pods.is_empty(), "no sync-negentropy pods");
    // Components without autoscaling have none.
    let relay_hpa = kubectl(&[
        "-n",
        &ns,
        "get",
        "hpa",
        &child_name(&r.name, "relay"),
        "--ignore-not-found",
        "-o",
        "name",
    ])?;
    ensure!(relay_hpa.is_empty(), "unexpected relay HPA: {relay_hpa}");
    Ok(())
}

/// The components of a relay and the workload kind each runs as.
fn workloads(relay: &str, sqlite: bool) -> Vec<(String, &'static str, &'static str)> {
    let mut out = vec![(
        child_name(relay, "db"),
        "db",
        if sqlite { "statefulset" } else { "deployment" },
    )];
    out.push((child_name(relay, "acl"), "acl", "deployment"));
    out.push((child_name(relay, "relay"), "relay", "deployment"));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn minimal_children_carry_the_token_and_network_policies() -> Result<()> {
    let r = minimal();
    let ns = namespace();
    let secret = child_name(&r.name, "grpc-auth");
    let token = secret_value(&ns, &secret, "token")?;
    ensure!(
        token.len() == 64 && token.chars().all(|c| c.is_ascii_hexdigit()),
        "the token is not 32 bytes of hex: {token:?}"
    );
    for (name, component, kind) in workloads(&r.name, true) {
        let workload = get_json(&ns, kind, &name)?;
        ensure!(
            env_secret_ref(&workload, "ORLY_GRPC_AUTH_TOKEN")
                == Some((secret.clone(), "token".to_string())),
            "{name} does not read the token from {secret}"
        );
        let policy = get_json(&ns, "networkpolicy", &name)?;
        let (port, callers): (i64, Option<Vec<&str>>) = match component {
            "db" => (50051, Some(vec!["acl", "relay"])),
            "acl" => (50052, Some(vec!["relay"])),
            _ => (3334, None),
        };
        let got = policy_callers(&policy, port)
            .with_context(|| format!("{name}: no rule opens {port}"))?;
        ensure!(
            got == callers.map(|c| c.into_iter().map(str::to_string).collect()),
            "{name}: port {port} open to {got:?}"
        );
        if component != "relay" {
            let service = get_json(&ns, "service", &name)?;
            ensure!(is_headless(&service), "{name} Service is not headless");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn minimal_relay_pod_drains_its_websockets_before_it_goes() -> Result<()> {
    let r = minimal();
    let ns = namespace();
    let relay = get_json(&ns, "deployment", &child_name(&r.name, "relay"))?;
    let command = pre_stop_command(&relay).context("the relay has no preStop hook")?;
    ensure!(
        command[..2] == ["orly", "drain"] && command.contains(&"--timeout".to_string()),
        "preStop is {command:?}"
    );
    ensure!(
        relay["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 30,
        "grace period: {}",
        relay["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    );
    wait_serving(&r.url).await?;
    let (mut socket, _) = tokio_tungstenite::connect_async(r.url.as_str()).await?;
    let pods = running_pods(&ns, &r.name, "relay")?;
    ensure!(pods.len() == 1, "one relay pod expected: {pods:?}");
    kubectl(&["-n", &ns, "delete", "pod", &pods[0], "--wait=false"])?;
    // The drain closes every WebSocket with 1001 (going away) before the pod stops.
    let close = tokio::time::timeout(Duration::from_secs(40), async {
        while let Some(message) = socket.next().await {
            match message {
                Ok(Message::Close(frame)) => return Ok(frame),
                Ok(_) => continue,
                Err(e) => bail!("the connection broke without a close frame: {e}"),
            }
        }
        bail!("the connection ended without a close frame")
    })
    .await
    .context("no close frame within 40 s")??;
    ensure!(
        close.as_ref().map(|f| f.code) == Some(CloseCode::Away),
        "closed with {close:?}, want 1001"
    );
    delete_pod_wait_gone(&ns, &r.name).await?;
    wait_serving(&r.url).await
}

/// Waits until a new relay pod runs after the old one was deleted.
async fn delete_pod_wait_gone(ns: &str, relay: &str) -> Result<()> {
    wait_for(
        "a new relay pod",
        READY_TIMEOUT,
        Duration::from_secs(1),
        || async { Ok((running_pods(ns, relay, "relay")?.len() == 1).then_some(())) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run e2e/kind/run.sh"]
async fn scaled_acl_pod_deleted_while_the_relay_keeps_accepting() -> Result<()> {
    let Some(r) = scaled() else {
        eprintln!("ORLY_E2E_SCALED_URL unset: no PostgreSQL relay deployed, skipped");
        return Ok(());
    };
    let ns = namespace();
    let acl = child_name(&r.name, "acl");
    wait_ready_replicas(&acl, 2).await?;
    ensure!(
        is_headless(&get_json(&ns, "service", &acl)?),
        "the relay must see every acl pod"
    );
    wait_serving(&r.url).await?;
    let publisher = Publisher::start(r.url.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    delete_pod_and_wait_replaced(&r.name, "acl").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (acked, refused) = publisher.finish().await;
    ensure!(
        refused == 0,
        "{refused} publishes refused with one of two acl pods gone"
    );
    ensure!(!acked.is_empty(), "nothing published");
    assert_all_stored(&r.url, &acked).await
}

/// `run.sh --plan` with only `vars` of the suite's environment set.
fn plan(vars: &[(&str, &str)]) -> (bool, String) {
    let mut command = std::process::Command::new("bash");
    command
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/kind/run.sh"))
        .arg("--plan");
    for (name, _) in std::env::vars() {
        if name.starts_with("ORLY_E2E_")
            || [
                "KEEP_CLUSTER",
                "CLUSTER_NAME",
                "IMAGE_REPOSITORY",
                "IMAGE_TAG",
            ]
            .contains(&name.as_str())
        {
            command.env_remove(name);
        }
    }
    command.envs(vars.iter().copied());
    let out = command.output().expect("bash runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn run_sh_makes_its_own_kind_cluster_by_default() {
    let (ok, text) = plan(&[("IMAGE_TAG", "t")]);
    assert!(ok, "{text}");
    for line in [
        "cluster: kind orly-e2e (created when missing; deleted afterwards unless KEEP_CLUSTER=1)",
        "image: localhost/orly-relay/orly-sync-negentropy:t",
        "images: loaded with kind load",
        "operator: release orly-operator in orly-system, watching all namespaces",
        "relays: minimal scaled in orly-e2e",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn run_sh_uses_an_existing_cluster_with_images_from_a_registry_or_a_hook() {
    let (ok, text) = plan(&[
        ("ORLY_E2E_KUBECONFIG", "/tmp/elsewhere.yaml"),
        ("ORLY_E2E_CONTEXT", "staging"),
        ("ORLY_E2E_REGISTRY", "registry.example.com/orly/"),
        ("ORLY_E2E_POSTGRES", "0"),
        ("IMAGE_TAG", "t"),
    ]);
    assert!(ok, "{text}");
    for line in [
        "cluster: existing, kubeconfig /tmp/elsewhere.yaml, context staging (never deleted)",
        "image: registry.example.com/orly/orly:t",
        "images: pulled by the cluster from registry.example.com/orly (not built, not loaded)",
        "operator: release orly-operator in orly-system, watching namespace orly-e2e only",
        "relays: minimal in orly-e2e",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(!text.contains("built with"), "{text}");

    let (ok, text) = plan(&[
        ("ORLY_E2E_KUBECONFIG", "/tmp/elsewhere.yaml"),
        ("ORLY_E2E_LOAD_IMAGES", "k3d image import -c dev"),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("images: loaded with: k3d image import -c dev <image>"),
        "{text}"
    );
    assert!(
        text.contains("image: localhost/orly-relay/orly-db:"),
        "{text}"
    );
}

#[test]
fn run_sh_refuses_an_existing_cluster_it_cannot_give_images() {
    let (ok, text) = plan(&[("ORLY_E2E_KUBECONFIG", "/tmp/elsewhere.yaml")]);
    assert!(!ok, "{text}");
    assert!(text.contains("set ORLY_E2E_REGISTRY"), "{text}");
}
