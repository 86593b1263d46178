//! The `orly` binary the benchmarks start: the relay, and through its subcommands `orly db`
//! and `orly acl`. It sits next to the benchmark binaries in cargo's target directory.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use orly_consts::Service;

/// The multi-call `orly` binary.
#[derive(Debug, Clone)]
pub struct Orly {
    pub path: PathBuf,
}

impl Orly {
    /// `orly` next to the running executable.
    pub fn locate() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the benchmark's own path")?;
        let dir = exe
            .parent()
            .context("the benchmark has no parent directory")?;
        let path = dir.join(Service::Relay.binary());
        if !path.is_file() {
            bail!(
                "{} not found next to {}; build it first:\n  \
                 cargo build --release -p orly -p orly-bench",
                path.display(),
                exe.display()
            );
        }
        Ok(Self { path })
    }

    /// A command starting `service` (`orly`, `orly db`, `orly acl`, …).
    pub fn command(&self, service: Service) -> Command {
        let mut cmd = Command::new(&self.path);
        if service != Service::Relay {
            cmd.arg(service.name());
        }
        cmd
    }
}
