//! podman through `std::process::Command`. [`Podman`] remembers every container, network and
//! volume it created and removes them on drop, so a failed or panicking test leaves nothing
//! behind; all names start with a prefix unique to the run.

use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// Runs `podman ARGS`; returns trimmed stdout, fails with stderr.
pub fn podman(args: &[&str]) -> Result<String> {
    let out = Command::new("podman")
        .args(args)
        .output()
        .with_context(|| format!("run podman {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "podman {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One container to start.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// Full container name (also its DNS name on its networks).
    pub name: String,
    pub image: String,
    pub networks: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `host_ip:host_port:container_port`.
    pub publish: Vec<String>,
    /// `volume:/path`.
    pub volumes: Vec<String>,
}

impl ContainerSpec {
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            ..Self::default()
        }
    }

    pub fn network(mut self, network: &str) -> Self {
        self.networks.push(network.to_string());
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    pub fn publish(mut self, spec: impl Into<String>) -> Self {
        self.publish.push(spec.into());
        self
    }

    pub fn volume(mut self, spec: impl Into<String>) -> Self {
        self.volumes.push(spec.into());
        self
    }
}

/// Creates podman objects under a unique prefix and removes them all on drop.
pub struct Podman {
    prefix: String,
    containers: Mutex<Vec<String>>,
    networks: Mutex<Vec<String>>,
    volumes: Mutex<Vec<String>>,
}

impl Podman {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            containers: Mutex::default(),
            networks: Mutex::default(),
            volumes: Mutex::default(),
        }
    }

    /// `<prefix>-<name>`.
    pub fn name(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// `podman network create <prefix>-<name>`; returns the full name.
    pub fn network(&self, name: &str) -> Result<String> {
        let full = self.name(name);
        podman(&["network", "create", &full])?;
        self.networks.lock().unwrap().push(full.clone());
        Ok(full)
    }

    /// `podman volume create <prefix>-<name>`; returns the full name.
    pub fn volume(&self, name: &str) -> Result<String> {
        let full = self.name(name);
        podman(&["volume", "create", &full])?;
        self.volumes.lock().unwrap().push(full.clone());
        Ok(full)
    }

    /// `podman run -d --name … --network … -e … -p … -v … IMAGE`.
    pub fn run(&self, spec: &ContainerSpec) -> Result<()> {
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into()];
        args.push(spec.name.clone());
        for n in &spec.networks {
            args.push("--network".into());
            args.push(n.clone());
        }
        for (k, v) in &spec.env {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        for p in &spec.publish {
            args.push("-p".into());
            args.push(p.clone());
        }
        for v in &spec.volumes {
            args.push("-v".into());
            args.push(v.clone());
        }
        args.push(spec.image.clone());
        // Registered before the run, so a half-created container is removed too.
        self.containers.lock().unwrap().push(spec.name.clone());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        podman(&refs)?;
        Ok(())
    }

    /// `podman kill NAME` (SIGKILL: nothing is flushed).
    pub fn kill(&self, name: &str) -> Result<()> {
        podman(&["kill", name]).map(drop)
    }

    /// `podman start NAME`.
    pub fn start(&self, name: &str) -> Result<()> {
        podman(&["start", name]).map(drop)
    }

    /// Whether the container is running.
    pub fn running(&self, name: &str) -> bool {
        podman(&["inspect", "--format", "{{.State.Running}}", name]).is_ok_and(|s| s == "true")
    }

    /// The last lines of a container's log (for failure messages).
    pub fn logs(&self, name: &str, lines: usize) -> String {
        let out = Command::new("podman")
            .args(["logs", "--tail", &lines.to_string(), name])
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("podman logs {name}: {e}"),
        }
    }

    /// The logs of every container this guard started, for a failure report.
    pub fn dump_logs(&self, lines: usize) {
        for c in self.containers.lock().unwrap().iter() {
            eprintln!("----- podman logs --tail {lines} {c}");
            eprintln!("{}", self.logs(c, lines));
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let containers = std::mem::take(&mut *self.containers.lock().unwrap());
        if !containers.is_empty() {
            let mut args = vec!["rm", "-f", "-t", "0"];
            args.extend(containers.iter().map(String::as_str));
            if let Err(e) = podman(&args) {
                // One missing container fails the batch: remove them one by one.
                eprintln!("cleanup: {e:#}");
                for c in &containers {
                    let _ = podman(&["rm", "-f", "-t", "0", c]);
                }
            }
        }
        for v in std::mem::take(&mut *self.volumes.lock().unwrap()) {
            if let Err(e) = podman(&["volume", "rm", "-f", &v]) {
                eprintln!("cleanup: {e:#}");
            }
        }
        for n in std::mem::take(&mut *self.networks.lock().unwrap()) {
            if let Err(e) = podman(&["network", "rm", "-f", &n]) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}
