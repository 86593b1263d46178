//! The real storage service, `orly db` (ORLY's `orly-db`, a link to `orly` of that name):
//! acknowledged events survive `kill -9` and a restart; the command line documents every env
//! var and refuses bad store types. It lives in this package because the binary is this
//! package's `orly`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nostr::{EventBuilder, EventId, Filter, Keys, Timestamp};
use orly_db::grpc_client::GrpcStore;
use orly_db::{EventStore, SaveOutcome};

const BIN: &str = env!("CARGO_BIN_EXE_orly");

/// Env vars the binary reads; cleared so the caller's environment cannot leak in.
const ENV_VARS: &[&str] = &[
    "ORLY_DB_LISTEN",
    "ORLY_DB_TYPE",
    "ORLY_DATA_DIR",
    "ORLY_DB_URL",
    "ORLY_DB_MAX_CONNECTIONS",
    "ORLY_LOG_LEVEL",
    "ORLY_DB_LOG_LEVEL",
    "ORLY_METRICS_LISTEN",
];

fn command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("db");
    for var in ENV_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// A running orly-db, killed (SIGKILL) when dropped.
struct Proc(Child);

impl Proc {
    fn spawn(port: u16, data_dir: &Path) -> Self {
        let child = command()
            .env("ORLY_DB_LISTEN", format!("127.0.0.1:{port}"))
            .env("ORLY_DATA_DIR", data_dir)
            .env("ORLY_LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn orly-db");
        Proc(child)
    }

    /// `kill -9`, then reap.
    fn kill9(mut self) {
        self.0.kill().expect("SIGKILL orly-db");
        self.0.wait().expect("reap orly-db");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    orly_testkit::free_port()
}

async fn wait_ready(client: &GrpcStore, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.ping().await {
            Ok(()) => return,
            Err(e) => {
                if let Some(status) = proc.0.try_wait().unwrap() {
                    panic!("orly-db exited early with {status}");
                }
                assert!(Instant::now() < deadline, "orly-db not ready: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn acknowledged_events_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let client =
        GrpcStore::connect_lazy(&format!("127.0.0.1:{port}"), Duration::from_secs(5)).unwrap();

    let mut proc = Proc::spawn(port, dir.path());
    wait_ready(&client, &mut proc).await;

    let keys = Keys::generate();
    let mut acked: Vec<(EventId, u64)> = Vec::new();
    for i in 0..300u64 {
        let event = EventBuilder::text_note(format!("durable {i}"))
            .custom_created_at(Timestamp::from(1_700_000_000 + i))
            .sign_with_keys(&keys)
            .unwrap();
        match client.save_event(&event).await.unwrap() {
            SaveOutcome::Stored { serial } => acked.push((event.id, serial)),
            other => panic!("event {i}: {other:?}"),
        }
    }
    let max_serial = acked.iter().map(|(_, s)| *s).max().unwrap();
    client.set_marker("durable", b"yes").await.unwrap();

    // No graceful shutdown: SIGKILL right after the last acknowledgement.
    proc.kill9();
    assert!(
        client.ping().await.is_err(),
        "orly-db still answers after kill -9"
    );

    let mut proc = Proc::spawn(port, dir.path());
    wait_ready(&client, &mut proc).await;

    let ids: Vec<EventId> = acked.iter().map(|(id, _)| *id).collect();
    let found = client.fetch_by_ids(&ids).await.unwrap();
    assert_eq!(found.len(), acked.len(), "acknowledged events lost");
    let by_query = client
        .query(&[Filter::new().author(keys.public_key())])
        .await
        .unwrap();
    assert_eq!(by_query.len(), acked.len());
    assert!(client.latest_serial().await.unwrap() >= max_serial);
    for (id, serial) in acked.iter().step_by(37) {
        assert_eq!(client.serial_by_id(id).await.unwrap(), Some(*serial));
    }
    assert_eq!(
        client.get_marker("durable").await.unwrap(),
        Some(b"yes".to_vec())
    );

    // serials keep increasing after the restart
    let after = EventBuilder::text_note("after restart")
        .sign_with_keys(&keys)
        .unwrap();
    match client.save_event(&after).await.unwrap() {
        SaveOutcome::Stored { serial } => assert!(serial > max_serial),
        other => panic!("after restart: {other:?}"),
    }
    drop(proc);
}

#[test]
fn help_lists_every_env_var() {
    let out = command()
        .arg("--help")
        .output()
        .expect("run orly-db --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for var in ENV_VARS.iter().filter(|v| **v != "ORLY_DB_LOG_LEVEL") {
        assert!(help.contains(var), "--help does not mention {var}:\n{help}");
    }
    for flag in [
        "--listen",
        "--db-type",
        "--data-dir",
        "--db-url",
        "--max-connections",
        "--log-level",
        "--metrics-listen",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
    assert!(help.contains("127.0.0.1:50051"));
    assert!(help.contains("[default: sqlite]"));
    assert!(help.contains("[default: 8]"));
    assert!(help.contains("[default: info]"));
}

#[test]
fn bogus_db_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = command()
        .env("ORLY_DB_TYPE", "bogus")
        .env("ORLY_DATA_DIR", dir.path())
        .env("ORLY_DB_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run orly-db");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus") && err.contains("sqlite"), "{err}");

    let out = command()
        .env("ORLY_DB_TYPE", "grpc")
        .env("ORLY_DATA_DIR", dir.path())
        .env("ORLY_DB_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run orly-db");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("grpc"), "{err}");
}

/// Started through a link named `orly-db` (as in the images), the binary is orly-db.
#[test]
fn a_link_named_orly_db_runs_the_storage_service() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("orly-db");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let out = Command::new(&link)
        .arg("--help")
        .output()
        .expect("run orly-db --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("Usage: orly-db"), "{help}");
    assert!(help.contains("ORLY_DB_LISTEN"), "{help}");
}
