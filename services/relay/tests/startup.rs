//! The `orly` binary as a user starts it: the help of the relay and of each program names
//! every setting, NIP-77 is on by default in local mode (and off when told), and a variable
//! that has no effect in the chosen mode is named in a warning at start-up.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

const ORLY: &str = env!("CARGO_BIN_EXE_orly");

fn free_port() -> u16 {
    orly_testkit::free_port()
}

/// `orly` with `args` and no ORLY_* variable of the caller's environment.
fn orly(args: &[&str]) -> Command {
    let mut cmd = Command::new(ORLY);
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ORLY_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn help(args: &[&str]) -> String {
    let out = orly(args).output().expect("run orly --help");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_program_has_its_full_help() {
    let relay = help(&["--help"]);
    for needle in [
        "ORLY_NEGENTROPY_ENABLED",
        "NIP-77",
        "ORLY_SYNC_DISTRIBUTED_PEERS",
        "ORLY_RELAY_PEERS",
        "[default: 3334]",
        "orly db",
        "orly-sync-negentropy",
        "orly launcher",
    ] {
        assert!(
            relay.contains(needle),
            "orly --help lacks {needle}:\n{relay}"
        );
    }
    assert_eq!(
        help(&["relay", "--help"]).lines().count(),
        relay.lines().count()
    );
    let cases: [(&[&str], &[&str]); 7] = [
        (
            &["db", "--help"],
            &[
                "ORLY_DB_LISTEN",
                "[default: 127.0.0.1:50051]",
                "ORLY_DB_URL",
            ],
        ),
        (
            &["acl", "--help"],
            &[
                "ORLY_ACL_LISTEN",
                "[default: 127.0.0.1:50052]",
                "ORLY_ACL_MODE",
            ],
        ),
        (
            &["sync-distributed", "--help"],
            &[
                "ORLY_SYNC_DISTRIBUTED_LISTEN",
                "[default: 127.0.0.1:50061]",
                "ORLY_SYNC_DISTRIBUTED_PEERS",
            ],
        ),
        (
            &["sync-cluster", "--help"],
            &[
                "ORLY_SYNC_CLUSTER_LISTEN",
                "[default: 127.0.0.1:50062]",
                "ORLY_SYNC_CLUSTER_ADMINS",
            ],
        ),
        (
            &["sync-relaygroup", "--help"],
            &[
                "ORLY_SYNC_RELAYGROUP_LISTEN",
                "[default: 127.0.0.1:50063]",
                "ORLY_SYNC_RELAYGROUP_ADMINS",
            ],
        ),
        (
            &["sync-negentropy", "--help"],
            &[
                "ORLY_SYNC_NEGENTROPY_LISTEN",
                "[default: 127.0.0.1:50064]",
                "ORLY_SYNC_NEGENTROPY_PEERS",
            ],
        ),
        (
            &["launcher", "--help"],
            &[
                "ORLY_LAUNCHER_RELAY_LISTEN",
                "ORLY_PORT",
                "[default: orly-db]",
                "[default: 127.0.0.1:50051]",
            ],
        ),
    ];
    for (args, needles) in cases {
        let text = help(args);
        assert!(text.contains(&format!("Usage: orly {}", args[0])), "{text}");
        for needle in needles {
            assert!(
                text.contains(needle),
                "orly {args:?} lacks {needle}:\n{text}"
            );
        }
    }
}

/// A relay process, its stderr collected; killed on drop.
struct Relay {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    port: u16,
    _data: tempfile::TempDir,
}

impl Relay {
    fn start(env: &[(&str, &str)]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = orly(&[])
            .env("ORLY_LISTEN", "127.0.0.1")
            .env("ORLY_PORT", port.to_string())
            .env("ORLY_DATA_DIR", data.path())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn orly");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            log,
            port,
            _data: data,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The NIP-11 document, once the relay answers.
    async fn nip11(&self) -> serde_json::Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                let req = "GET / HTTP/1.1\r\nHost: x\r\nAccept: application/nostr+json\r\n\
                           Connection: close\r\n\r\n";
                if s.write_all(req.as_bytes()).await.is_ok() {
                    let mut buf = Vec::new();
                    let _ = s.read_to_end(&mut buf).await;
                    let text = String::from_utf8_lossy(&buf);
                    if let Some((_, body)) = text.split_once("\r\n\r\n") {
                        if let Ok(v) = serde_json::from_str(body) {
                            return v;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no NIP-11 document; log:\n{}", self.log());
    }

    fn stop(mut self) -> String {
        let pid = Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = kill_process(pid, Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.log()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nips(doc: &serde_json::Value) -> Vec<u64> {
    doc["supported_nips"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect()
}

#[tokio::test]
async fn nip77_is_on_by_default_in_local_mode_and_off_when_told() {
    let relay = Relay::start(&[]);
    assert!(nips(&relay.nip11().await).contains(&77));
    relay.stop();
    let relay = Relay::start(&[("ORLY_NEGENTROPY_ENABLED", "false")]);
    assert!(!nips(&relay.nip11().await).contains(&77));
    relay.stop();
}

#[tokio::test]
async fn a_variable_without_effect_in_this_mode_is_named_at_start_up() {
    let relay = Relay::start(&[
        ("ORLY_DB_TYPE", "sqlite"),
        ("ORLY_DB_URL", "postgres://nobody@127.0.0.1/none"),
        ("ORLY_GRPC_SYNC_CLUSTER", "127.0.0.1:50062"),
    ]);
    relay.nip11().await;
    let log = relay.stop();
    for name in ["ORLY_DB_URL", "ORLY_GRPC_SYNC_CLUSTER"] {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN")
                    && l.contains(&format!("{name} is set but has no effect"))),
            "no warning for {name}:\n{log}"
        );
    }
    assert!(!log.contains("ORLY_DATA_DIR is set"), "{log}");
}
