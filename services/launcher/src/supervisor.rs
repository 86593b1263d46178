//! One supervised child: spawned, its output forwarded with a prefix, restarted with capped
//! exponential backoff when it exits unexpectedly, and stopped with SIGTERM then SIGKILL.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::plan::ServiceSpec;
use crate::LaunchError;

/// Lines of a child's output kept for error messages.
const KEEP_LINES: usize = 20;
/// First wait before a restart; it doubles up to the configured maximum.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// A child that ran this long is considered healthy again: its backoff resets.
const STABLE_AFTER: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(200);

/// What a supervisor reports about its child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildState {
    Starting,
    Running {
        pid: u32,
        restarts: u32,
    },
    /// Exited unexpectedly; a restart is scheduled.
    Exited {
        status: String,
        restarts: u32,
    },
    /// Could not be spawned at all.
    SpawnFailed(String),
    Stopped,
}

/// A supervised child and the task that watches it.
pub struct Supervised {
    pub spec: ServiceSpec,
    state: watch::Receiver<ChildState>,
    stop: watch::Sender<Option<Duration>>,
    task: tokio::task::JoinHandle<()>,
    output: Arc<Mutex<VecDeque<String>>>,
}

impl Supervised {
    pub fn spawn(spec: ServiceSpec, backoff_max: Duration) -> Self {
        let (state_tx, state) = watch::channel(ChildState::Starting);
        let (stop, stop_rx) = watch::channel(None);
        let output = Arc::new(Mutex::new(VecDeque::with_capacity(KEEP_LINES)));
        let task = tokio::spawn(supervise(
            spec.clone(),
            state_tx,
            stop_rx,
            output.clone(),
            backoff_max,
        ));
        Self {
            spec,
            state,
            stop,
            task,
            output,
        }
    }

    pub fn name(&self) -> &'static str {
        self.spec.name
    }

    pub fn state(&self) -> ChildState {
        self.state.borrow().clone()
    }

    /// The child's current process id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        match *self.state.borrow() {
            ChildState::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    pub fn last_lines(&self) -> Vec<String> {
        self.output
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Waits until the probe passes. Fails when the child exits or cannot start first, or
    /// when the ready timeout passes.
    pub async fn wait_ready(&self) -> Result<(), LaunchError> {
        let deadline = Instant::now() + self.spec.ready_timeout;
        loop {
            match self.state() {
                ChildState::Exited { status, .. } => {
                    return Err(LaunchError::ExitedBeforeReady {
                        service: self.spec.name,
                        status,
                        last_lines: self.last_lines(),
                    })
                }
                ChildState::SpawnFailed(reason) => {
                    return Err(LaunchError::Spawn {
                        service: self.spec.name,
                        binary: self.spec.exec.binary.display().to_string(),
                        source: std::io::Error::other(reason),
                    })
                }
                ChildState::Running { .. } if self.spec.probe.is_ready().await => {
                    tracing::info!(service = self.spec.name, "ready");
                    return Ok(());
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::NotReady {
                    service: self.spec.name,
                    timeout: self.spec.ready_timeout,
                    last_lines: self.last_lines(),
                });
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Stops supervising: SIGTERM, then SIGKILL after `grace`; returns once the child is gone.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(Some(grace));
        let _ = self.task.await;
    }
}

async fn supervise(
    spec: ServiceSpec,
    state: watch::Sender<ChildState>,
    mut stop: watch::Receiver<Option<Duration>>,
    output: Arc<Mutex<VecDeque<String>>>,
    backoff_max: Duration,
) {
    let mut restarts = 0u32;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if stop.borrow().is_some() {
            break;
        }
        let mut child = match start(&spec, &output) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(service = spec.name, binary = %spec.exec.binary.display(), error = %e, "cannot start");
                let _ = state.send(ChildState::SpawnFailed(e.to_string()));
                if !sleep_unless_stopped(&mut stop, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
        };
        let pid = child.id().unwrap_or(0);
        let started = Instant::now();
        tracing::info!(service = spec.name, pid, restarts, binary = %spec.exec.binary.display(), args = ?spec.exec.args, "started");
        let _ = state.send(ChildState::Running { pid, restarts });
        tokio::select! {
            status = child.wait() => {
                let status = describe(status);
                tracing::warn!(service = spec.name, pid, %status, "exited unexpectedly; restarting");
                let _ = state.send(ChildState::Exited { status, restarts });
                if started.elapsed() >= STABLE_AFTER {
                    backoff = FIRST_BACKOFF;
                }
                if !sleep_unless_stopped(&mut stop, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(backoff_max);
                restarts += 1;
            }
            _ = stop.changed() => {
                let grace = stop.borrow().unwrap_or(Duration::from_secs(30));
                terminate(&spec, &mut child, grace).await;
                break;
            }
        }
    }
    let _ = state.send(ChildState::Stopped);
}

/// Sleeps for `d` unless a stop arrives first; false when stopping.
async fn sleep_unless_stopped(stop: &mut watch::Receiver<Option<Duration>>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => stop.borrow().is_none(),
        _ = stop.changed() => false,
    }
}

fn start(spec: &ServiceSpec, output: &Arc<Mutex<VecDeque<String>>>) -> std::io::Result<Child> {
    let mut cmd = Command::new(&spec.exec.binary);
    cmd.args(&spec.exec.args);
    if let Some(arg0) = &spec.exec.arg0 {
        cmd.arg0(arg0);
    }
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| spec.removes(k)) {
            cmd.env_remove(key);
        }
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // If the launcher itself dies, its children must not outlive it unnoticed.
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward(spec.name, out, output.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward(spec.name, err, output.clone()));
    }
    Ok(child)
}

/// Copies a child's lines to our stderr with a `[name]` prefix, keeping the last few.
async fn forward(
    name: &'static str,
    stream: impl AsyncRead + Unpin,
    keep: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{name}] {line}");
        if let Ok(mut k) = keep.lock() {
            if k.len() == KEEP_LINES {
                k.pop_front();
            }
            k.push_back(line);
        }
    }
}

async fn terminate(spec: &ServiceSpec, child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else { return };
    tracing::info!(service = spec.name, pid, "stopping (SIGTERM)");
    let sent = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .map(|p| kill_process(p, Signal::TERM));
    if !matches!(sent, Some(Ok(()))) {
        let _ = child.kill().await;
        return;
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => {
            tracing::info!(service = spec.name, pid, status = %describe(status), "stopped");
        }
        Err(_) => {
            tracing::warn!(
                service = spec.name,
                pid,
                ?grace,
                "did not stop in time; SIGKILL"
            );
            let _ = child.kill().await;
        }
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown status: {e}"),
    }
}
