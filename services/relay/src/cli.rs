//! The `orly` program: one binary for the relay and every service. [`main`] picks the
//! program from the name it was started under (ORLY's `orly-db`, `orly-acl`, `orly-sync-*`,
//! `orly-launcher`, e.g. as links in an image) or from its first argument (`orly db`, …), and
//! [`relay_main_from`] is the relay itself: configuration, store, ACL, NIP-77 and the peer
//! sync, served until SIGTERM. anyhow is used only because this is the top of a program.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use orly_acl::{AclAdmin, AclEngine, GrpcAcl};
use orly_consts::Service;

use crate::acl::Acl;
use crate::config::{ignored_variables, AclType, SyncType};
use crate::sync::{NegentropyPeers, SyncHooks};
use crate::{Cli, Relay};

/// What one run of the binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// The relay or one of the gRPC services.
    Service(Service),
    /// The supervisor of the split deployment.
    Launcher,
    /// `orly drain`: tells the relay on this host to drain (a pod's preStop hook).
    Drain,
}

impl Program {
    /// Every program, in the order `orly --help` lists them.
    pub const ALL: [Program; 8] = [
        Program::Service(Service::Relay),
        Program::Service(Service::Db),
        Program::Service(Service::Acl),
        Program::Service(Service::SyncDistributed),
        Program::Service(Service::SyncCluster),
        Program::Service(Service::SyncRelayGroup),
        Program::Service(Service::SyncNegentropy),
        Program::Launcher,
    ];

    /// The subcommand of `orly`.
    pub fn subcommand(self) -> &'static str {
        match self {
            Program::Service(s) => s.name(),
            Program::Launcher => orly_launcher::SUBCOMMAND,
            Program::Drain => orly_consts::RELAY_DRAIN_SUBCOMMAND,
        }
    }

    /// ORLY's binary name, under which a link to `orly` runs this program.
    pub fn binary(self) -> &'static str {
        match self {
            Program::Service(s) => s.binary(),
            Program::Launcher => orly_launcher::BINARY,
            Program::Drain => Service::Relay.binary(),
        }
    }
}

/// Chooses the program for `args` (`args[0]` is the name the binary was started under) and
/// the arguments it parses: its own name first, then its flags. A link named after an ORLY
/// binary runs that program; otherwise a first argument naming a program selects it; anything
/// else is the relay's own command line.
pub fn route(args: &[OsString]) -> (Program, Vec<OsString>) {
    let invoked = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(OsStr::to_str)
        .unwrap_or_default();
    if let Some(p) = Program::ALL
        .into_iter()
        .find(|p| p.binary() == invoked && *p != Program::Service(Service::Relay))
    {
        return (p, args.to_vec());
    }
    let sub = args.get(1).and_then(|a| a.to_str()).unwrap_or_default();
    let drain = (sub == orly_consts::RELAY_DRAIN_SUBCOMMAND).then_some(Program::Drain);
    match Program::ALL
        .into_iter()
        .find(|p| p.subcommand() == sub)
        .or(drain)
    {
        Some(p) => {
            // `orly db --help` shows "Usage: orly db …".
            let mut rest = vec![OsString::from(format!("orly {sub}"))];
            rest.extend(args[2..].iter().cloned());
            (p, rest)
        }
        None => (Program::Service(Service::Relay), args.to_vec()),
    }
}

/// The text `orly --help` ends with: NIP-77, then the programs of the binary.
fn relay_after_help() -> String {
    let mut text = String::from(crate::config::NIP77_HELP);
    text.push_str(
        "\n\nThe same binary runs every orly service: `orly <program> --help` for each, or a \
         link to it under ORLY's binary name:\n",
    );
    for p in Program::ALL {
        text.push_str(&format!("  orly {:<18} {}\n", p.subcommand(), p.binary()));
    }
    text.push_str(
        "  orly drain              drain the relay on this host before it stops \
         (`orly drain --help`)\n",
    );
    text
}

/// Runs the program `std::env::args_os()` names; the process's exit code.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let (program, args) = route(&args);
    match program {
        Program::Service(Service::Relay) => relay_main_from(args),
        Program::Service(Service::Db) => orly_db::cli::main_from(args),
        Program::Service(Service::Acl) => orly_acl::cli::main_from(args),
        Program::Service(Service::SyncDistributed) => orly_sync::cli::distributed::main_from(args),
        Program::Service(Service::SyncCluster) => orly_sync::cli::cluster::main_from(args),
        Program::Service(Service::SyncRelayGroup) => orly_sync::cli::relaygroup::main_from(args),
        Program::Service(Service::SyncNegentropy) => orly_sync_negentropy::cli::main_from(args),
        // The launcher starts the other programs through this very binary.
        Program::Launcher => orly_launcher::cli::main_from(args, std::env::current_exe().ok()),
        Program::Drain => drain_main_from(args),
    }
}

/// `orly drain`: what a relay pod runs before it stops.
#[derive(Debug, clap::Parser)]
#[command(
    name = "orly drain",
    about = "Drain the relay on this host: it stops taking WebSockets (and reports not ready), \
             closes every one with 1001 (going away), and this command returns when they are \
             gone or the timeout passed. Exit status 0 when drained or when no relay listens."
)]
pub struct DrainCli {
    /// The relay's port on loopback.
    #[arg(long, env = "ORLY_PORT", default_value_t = orly_consts::Service::Relay.default_port())]
    pub port: u16,
    /// How long to wait for the connections to close.
    #[arg(long, default_value = "25s", value_parser = orly_common::parse_duration)]
    pub timeout: std::time::Duration,
}

fn drain_main_from(args: Vec<OsString>) -> ExitCode {
    let cli = <DrainCli as clap::Parser>::parse_from(args);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("orly drain: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(drain(cli.port, cli.timeout)) {
        Ok(answer) => {
            println!("orly drain: {answer}");
            if answer.starts_with("200") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            println!(
                "orly drain: no relay listens on port {}; nothing to drain",
                cli.port
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("orly drain: {e}");
            ExitCode::FAILURE
        }
    }
}

/// POSTs the drain request to the relay on loopback; the status line and body of the answer.
pub async fn drain(port: u16, timeout: std::time::Duration) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "POST {}?timeout={}ms HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n",
        crate::server::DRAIN_PATH,
        timeout.as_millis()
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    // The relay answers within the timeout; a little more for the answer itself.
    tokio::time::timeout(
        timeout + std::time::Duration::from_secs(5),
        tcp.read_to_end(&mut answer),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the relay did not answer"))??;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_once(' ').map(|(_, rest)| rest.to_string()))
        .unwrap_or_default();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
    Ok(format!("{status}: {body}"))
}

/// The relay with `args` (the first is the program name). Bad arguments and `--help` exit
/// the process with clap's message.
pub fn relay_main_from(args: Vec<OsString>) -> ExitCode {
    let mut args = args;
    // `orly relay …` parses as `orly …`.
    if args.first().is_some_and(|a| a == "orly relay") {
        args[0] = OsString::from("orly");
    }
    let matches = Cli::command()
        .after_help(relay_after_help())
        .get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    orly_common::service::run_main(Service::Relay.binary(), run(cli))
}

/// Names each variable that is set but has no effect with `cli`'s modes.
fn warn_ignored_variables(cli: &Cli) {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    for name in ignored_variables(cli, set) {
        tracing::warn!(
            variable = name,
            db_type = %cli.db_type,
            acl_type = %cli.acl_type,
            sync_type = %cli.sync_type,
            nip77 = cli.negentropy(),
            "{name} is set but has no effect in this mode"
        );
    }
}

/// Serves the relay until SIGTERM/SIGINT.
async fn run(cli: Cli) -> anyhow::Result<()> {
    orly_common::init_tracing(&cli.log_level);
    warn_ignored_variables(&cli);
    let store_cfg = cli.store_config();
    let store = orly_db::open_store(&store_cfg)
        .await
        .with_context(|| format!("opening the {} store", store_cfg.kind))?;
    let relay_cfg = cli.relay_config().map_err(anyhow::Error::msg)?;
    let (acl, admin, refresher): (Arc<dyn Acl>, Arc<dyn AclAdmin>, _) = if cli.acl_type
        == AclType::Grpc
    {
        let client =
            GrpcAcl::connect_lazy(&cli.grpc_acl_server, cli.grpc_acl_timeout, cli.acl_mode)
                .context("orly-acl client")?;
        (client.clone(), client, None)
    } else {
        let engine = AclEngine::new(cli.acl_config().map_err(anyhow::Error::msg)?, store.clone());
        if let Err(e) = engine.load().await {
            tracing::warn!(error = %e, "ACL lists not loaded yet; retrying in the background");
        }
        let refresher = engine.spawn_refresher();
        (engine.clone(), engine, Some(refresher))
    };
    tracing::info!(
        store = %store_cfg.kind,
        acl_type = %cli.acl_type,
        acl = %cli.acl_mode,
        sync_type = %cli.sync_type,
        nip77 = cli.negentropy(),
        "starting relay"
    );
    let (negentropy, negentropy_tasks, negentropy_peers) = if cli.negentropy() {
        enable_negentropy(&cli, &store).await?
    } else {
        (None, Vec::new(), None)
    };
    let (sync, hooks) = enable_sync(&cli, &store, negentropy_peers)?;
    let mut builder = Relay::builder(relay_cfg, store.clone(), acl).admin(admin);
    if let Some(n) = negentropy {
        builder = builder.negentropy(n);
    }
    if let Some(h) = hooks {
        builder = builder.sync(h);
    }
    let relay = builder.build();
    let addr = std::net::SocketAddr::new(cli.listen, cli.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let running = crate::spawn(listener, relay)?;
    println!("orly relay listening on ws://{}", running.addr);

    // NIP-40: expired events are filtered at query time and purged in the background, by one
    // of the processes sharing the store at a time.
    let purge = orly_db::spawn_purger(
        store.clone(),
        format!("relay:{}", running.relay.instance),
        cli.purge_interval,
    );
    orly_common::shutdown_signal().await;
    purge.abort();
    sync.stop().await;
    for t in negentropy_tasks {
        t.abort();
    }
    if let Some(r) = refresher {
        r.abort();
    }
    running.stop().await.context("stopping the server")?;
    Ok(())
}

type NegentropyPeerList = Option<Arc<dyn NegentropyPeers>>;

/// NIP-77: in-process engine (and peer sync, when peers or relay group admins are configured)
/// with `ORLY_SYNC_TYPE=local`, or the orly-sync-negentropy service(s) with `grpc`. Also
/// returns the peer list the relay group feeds.
async fn enable_negentropy(
    cli: &Cli,
    store: &orly_db::SharedStore,
) -> anyhow::Result<(
    Option<Arc<dyn orly_sync_negentropy::NegentropyHandler>>,
    Vec<tokio::task::JoinHandle<()>>,
    NegentropyPeerList,
)> {
    use orly_sync_negentropy::{
        GrpcNegentropy, NegentropyEngine, ReplicatedNegentropy, SyncManager,
    };
    if cli.sync_type == SyncType::Grpc {
        let client =
            ReplicatedNegentropy::connect_lazy(&cli.grpc_sync_negentropy, cli.grpc_sync_timeout)
                .map_err(anyhow::Error::msg)
                .context("orly-sync-negentropy client")?;
        // Peers live in the shared store: any replica takes the relay group's changes.
        let first = cli
            .grpc_sync_negentropy
            .split(',')
            .next()
            .unwrap_or_default();
        let peers = GrpcNegentropy::connect_lazy(first, cli.grpc_sync_timeout)
            .map_err(anyhow::Error::msg)?;
        tracing::info!(servers = %cli.grpc_sync_negentropy, "NIP-77 via orly-sync-negentropy");
        return Ok((Some(Arc::new(client)), Vec::new(), Some(Arc::new(peers))));
    }
    let (engine_settings, sync_settings, peers) = cli.negentropy_settings();
    let engine = NegentropyEngine::new(store.clone(), engine_settings)
        .map_err(anyhow::Error::msg)
        .context("negentropy settings")?;
    let mut tasks = vec![engine.spawn_reaper()];
    let mut peer_list: NegentropyPeerList = None;
    if !peers.is_empty() || !cli.relay_group_admin_list().trim().is_empty() {
        let manager = SyncManager::new(store.clone(), sync_settings)
            .map_err(anyhow::Error::msg)
            .context("negentropy peer sync settings")?;
        let peer_count = peers.len();
        peer_list = Some(Arc::new(manager.clone()));
        // Peers are stored once the store answers (orly-db may start after us); the loop holds
        // only a weak reference to the manager, so this task keeps it alive.
        tasks.push(tokio::spawn(async move {
            while let Err(e) = manager.add_peers(&peers).await {
                tracing::warn!(error = %e, "cannot store negentropy peers yet; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            manager.start();
            tracing::info!(peers = peer_count, "negentropy peer sync running");
            std::future::pending::<()>().await;
        }));
    }
    tracing::info!("NIP-77 in-process");
    Ok((Some(engine), tasks, peer_list))
}

/// The running peer sync: in-process engines to stop, and the relay's background tasks.
#[derive(Default)]
struct RunningSync {
    distributed: Option<Arc<orly_sync::DistributedSync>>,
    cluster: Option<Arc<orly_sync::ClusterSync>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningSync {
    /// Stops pulling and hands leases back so other replicas take over at once.
    async fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
        if let Some(d) = self.distributed {
            d.stop().await;
        }
        if let Some(c) = self.cluster {
            c.stop().await;
        }
    }
}

/// Distributed, cluster and relay group sync: in-process with `ORLY_SYNC_TYPE=local` (each
/// when configured: peers from ORLY_SYNC_DISTRIBUTED_PEERS or ORLY_RELAY_PEERS, cluster and
/// relay group admins), or the services named by `ORLY_GRPC_SYNC_*` with `grpc`.
fn enable_sync(
    cli: &Cli,
    store: &orly_db::SharedStore,
    negentropy_peers: NegentropyPeerList,
) -> anyhow::Result<(RunningSync, Option<Arc<SyncHooks>>)> {
    use orly_sync::{
        ClusterApi, ClusterSettings, ClusterSync, DistributedApi, DistributedSettings,
        DistributedSync, GrpcCluster, GrpcDistributed, GrpcRelayGroup, RelayGroup, RelayGroupApi,
    };
    let mut running = RunningSync::default();
    type Apis = (
        Option<Arc<dyn DistributedApi>>,
        Option<Arc<dyn ClusterApi>>,
        Option<Arc<dyn RelayGroupApi>>,
    );
    let (distributed, cluster, relaygroup): Apis = if cli.sync_type == SyncType::Grpc {
        let t = cli.grpc_sync_timeout;
        fn addr(a: &Option<String>) -> Option<&str> {
            a.as_deref().map(str::trim).filter(|a| !a.is_empty())
        }
        (
            match addr(&cli.grpc_sync_distributed) {
                Some(a) => Some(Arc::new(
                    GrpcDistributed::connect_lazy(a, t).map_err(anyhow::Error::msg)?,
                )),
                None => None,
            },
            match addr(&cli.grpc_sync_cluster) {
                Some(a) => Some(Arc::new(
                    GrpcCluster::connect_lazy(a, t).map_err(anyhow::Error::msg)?,
                )),
                None => None,
            },
            match addr(&cli.grpc_sync_relaygroup) {
                Some(a) => Some(Arc::new(
                    GrpcRelayGroup::connect_lazy(a, t).map_err(anyhow::Error::msg)?,
                )),
                None => None,
            },
        )
    } else {
        let group_admins = orly_common::parse_pubkey_list(cli.relay_group_admin_list())
            .map_err(|e| anyhow::anyhow!("ORLY_RELAY_GROUP_ADMINS: {e}"))?;
        let relaygroup = (!group_admins.is_empty()).then(|| {
            Arc::new(RelayGroup::new(store.clone(), group_admins)) as Arc<dyn RelayGroupApi>
        });
        let peers = orly_sync::http::parse_url_list(cli.distributed_peers())
            .map_err(|e| anyhow::anyhow!("ORLY_SYNC_DISTRIBUTED_PEERS / ORLY_RELAY_PEERS: {e}"))?;
        let distributed = if !peers.is_empty() || relaygroup.is_some() {
            let sync = DistributedSync::new(
                store.clone(),
                DistributedSettings {
                    relay_url: cli.relay_url.clone(),
                    peers,
                    interval: cli.distributed_interval,
                    long_poll: cli.distributed_long_poll,
                    ..DistributedSettings::default()
                },
            )
            .map_err(|e| anyhow::anyhow!("distributed sync: {e}"))?;
            sync.start();
            running.distributed = Some(sync.clone());
            Some(Arc::new(sync) as Arc<dyn DistributedApi>)
        } else {
            None
        };
        let admins = orly_common::parse_pubkey_list(cli.cluster_admin_list())
            .map_err(|e| anyhow::anyhow!("ORLY_CLUSTER_ADMINS: {e}"))?;
        let cluster = if admins.is_empty() {
            None
        } else {
            let sync = ClusterSync::new(
                store.clone(),
                ClusterSettings {
                    admins,
                    propagate_privileged: cli.cluster_propagate_privileged(),
                    relay_url: cli.relay_url.clone(),
                    poll_interval: cli.cluster_poll_interval,
                    ..ClusterSettings::default()
                },
            )
            .map_err(|e| anyhow::anyhow!("cluster sync: {e}"))?;
            sync.start();
            running.cluster = Some(sync.clone());
            Some(Arc::new(sync) as Arc<dyn ClusterApi>)
        };
        (distributed, cluster, relaygroup)
    };
    if distributed.is_none() && cluster.is_none() && relaygroup.is_none() {
        return Ok((running, None));
    }
    tracing::info!(
        sync_type = %cli.sync_type,
        distributed = distributed.is_some(),
        cluster = cluster.is_some(),
        relaygroup = relaygroup.is_some(),
        "peer sync enabled"
    );
    let has_group = relaygroup.is_some();
    let hooks = Arc::new(SyncHooks::new(
        distributed,
        cluster,
        relaygroup,
        negentropy_peers,
    ));
    if has_group {
        running.tasks.push(hooks.spawn_feeder(store.clone()));
    }
    Ok((running, Some(hooks)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn links_named_after_orly_binaries_run_their_program() {
        for p in Program::ALL {
            let (got, args) = route(&os(&[&format!("/usr/local/bin/{}", p.binary()), "--help"]));
            assert_eq!(got, p, "{}", p.binary());
            assert_eq!(
                args,
                os(&[&format!("/usr/local/bin/{}", p.binary()), "--help"])
            );
        }
    }

    #[test]
    fn a_first_argument_naming_a_program_selects_it() {
        let (p, args) = route(&os(&[
            "target/release/orly",
            "db",
            "--listen",
            "127.0.0.1:1",
        ]));
        assert_eq!(p, Program::Service(Service::Db));
        assert_eq!(args, os(&["orly db", "--listen", "127.0.0.1:1"]));
        let (p, _) = route(&os(&["orly", "sync-negentropy"]));
        assert_eq!(p, Program::Service(Service::SyncNegentropy));
        let (p, _) = route(&os(&["orly", "launcher"]));
        assert_eq!(p, Program::Launcher);
        let (p, args) = route(&os(&["orly", "relay", "--port", "7777"]));
        assert_eq!(p, Program::Service(Service::Relay));
        assert_eq!(args, os(&["orly relay", "--port", "7777"]));
    }

    #[test]
    fn anything_else_is_the_relay() {
        for args in [
            os(&["orly"]),
            os(&["orly", "--port", "7777"]),
            os(&["/opt/my-relay", "--help"]),
            os(&["orly", "orly-db"]),
            os(&[]),
        ] {
            let (p, rest) = route(&args);
            assert_eq!(p, Program::Service(Service::Relay), "{args:?}");
            assert_eq!(rest, args);
        }
    }

    #[test]
    fn the_relay_help_names_nip77_and_every_program() {
        let help = Cli::command()
            .after_help(relay_after_help())
            .render_help()
            .to_string();
        assert!(help.contains("ORLY_NEGENTROPY_ENABLED=false"), "{help}");
        for p in Program::ALL {
            assert!(help.contains(p.binary()), "{} missing:\n{help}", p.binary());
        }
    }
}
