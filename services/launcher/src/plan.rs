//! What to run: each service's binary (and subcommand), environment and readiness probe,
//! grouped in tiers. Names, ports and env names come from `orly_consts`.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use orly_consts::{env, Service};

use crate::probe::Probe;
use crate::{LaunchError, LauncherConfig};

/// The name of the multi-call binary: started under this name a service needs its subcommand.
pub const MULTI_CALL: &str = "orly";

/// One child process to supervise.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Short name used in logs and output prefixes (db, acl, sync-negentropy, relay).
    pub name: &'static str,
    pub exec: Exec,
    /// Variables set for this child on top of the launcher's environment.
    pub env: Vec<(String, String)>,
    /// Variables of the launcher's environment this child does not get: exact names, and
    /// prefixes ending in `_`.
    pub env_remove: Vec<String>,
    pub probe: Probe,
    pub ready_timeout: Duration,
}

impl ServiceSpec {
    /// Whether `var` is one of the launcher's variables this child does not get.
    pub fn removes(&self, var: &str) -> bool {
        self.env_remove
            .iter()
            .any(|r| var == r || (r.ends_with('_') && var.starts_with(r.as_str())))
    }
}

/// Services started together once the previous tier is Ready.
#[derive(Debug, Clone)]
pub struct Tier {
    pub name: &'static str,
    pub services: Vec<ServiceSpec>,
}

/// Where the launcher finds the binaries it starts.
#[derive(Debug, Clone, Default)]
pub struct Executables {
    /// The launcher's own directory: ORLY-named links there are used first.
    pub dir: Option<PathBuf>,
    /// The multi-call `orly` binary the launcher runs in; it starts any service by its
    /// subcommand when no link is found.
    pub multi_call: Option<PathBuf>,
}

impl Executables {
    /// The launcher's own executable and directory (`std::env::current_exe`), when it runs in
    /// the multi-call binary.
    pub fn of(multi_call: Option<PathBuf>) -> Self {
        Self {
            dir: multi_call
                .as_deref()
                .and_then(Path::parent)
                .map(Path::to_path_buf),
            multi_call,
        }
    }
}

/// Whether `a` and `b` are the same file (a link to it, symbolic or hard).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// How to start one binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub binary: PathBuf,
    /// The service's subcommand when `binary` is the multi-call `orly`.
    pub args: Vec<String>,
    /// The program name the child sees (`orly` for the multi-call binary, so its subcommand
    /// decides even when the file is a copy under another name).
    pub arg0: Option<String>,
}

impl Exec {
    /// `binary` as it is: a link named after an ORLY binary dispatches on that name.
    fn plain(binary: PathBuf) -> Self {
        Self {
            binary,
            args: Vec::new(),
            arg0: None,
        }
    }

    /// The multi-call binary starting `service` by its subcommand.
    fn multi_call(binary: PathBuf, service: Service) -> Self {
        let args = match service {
            Service::Relay => Vec::new(),
            s => vec![s.name().to_string()],
        };
        Self {
            binary,
            args,
            arg0: Some(MULTI_CALL.to_string()),
        }
    }

    /// A file found by name or path: the multi-call binary when it is called `orly`.
    fn found(binary: PathBuf, service: Service) -> Self {
        if binary.file_name() == Some(OsStr::new(MULTI_CALL)) {
            Self::multi_call(binary, service)
        } else {
            Self::plain(binary)
        }
    }
}

/// How to start `service` whose binary setting is `name`. A path is taken as given. A bare
/// name is looked up next to the launcher; when the launcher runs in the multi-call binary,
/// a file found there must be a link to it (an older, separately built binary left there is
/// skipped with a warning), and without one the multi-call binary itself starts the service
/// by its subcommand. PATH comes last. A binary named `orly` is given the subcommand.
pub fn resolve_binary(service: Service, name: &str, exes: &Executables) -> Option<Exec> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then(|| Exec::found(p, service));
    }
    if let Some(dir) = &exes.dir {
        let p = dir.join(name);
        if p.is_file() {
            match &exes.multi_call {
                Some(own) if !same_file(&p, own) => tracing::warn!(
                    service = service.name(),
                    skipped = %p.display(),
                    "a binary next to the launcher is not a link to it; the launcher's own \
                     binary runs the service instead (name the file in the *_BINARY setting \
                     to use it)"
                ),
                _ => return Some(Exec::found(p, service)),
            }
        }
    }
    if let Some(own) = &exes.multi_call {
        if name == service.binary() || name == MULTI_CALL {
            return Some(Exec::multi_call(own.clone(), service));
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .map(|p| Exec::found(p, service))
    })
}

fn binary(
    service: Service,
    name: &str,
    env: &str,
    exes: &Executables,
) -> Result<Exec, LaunchError> {
    resolve_binary(service, name, exes).ok_or_else(|| LaunchError::BinaryNotFound {
        service: service.name(),
        binary: name.to_string(),
        env: env.to_string(),
    })
}

fn socket_addr(env: &str, value: &str) -> Result<SocketAddr, LaunchError> {
    value.parse().map_err(|e| LaunchError::InvalidSetting {
        env: env.into(),
        value: value.into(),
        reason: format!("{e} (expected host:port with an IP address)"),
    })
}

/// The relay's address: ORLY_LAUNCHER_RELAY_LISTEN when given, else the relay's own
/// ORLY_LISTEN and ORLY_PORT (each when set), else 127.0.0.1:3334.
pub fn relay_address(cfg: &LauncherConfig) -> Result<SocketAddr, LaunchError> {
    if let Some(listen) = cfg.relay_listen.as_deref().filter(|l| !l.trim().is_empty()) {
        return socket_addr("ORLY_LAUNCHER_RELAY_LISTEN", listen.trim());
    }
    let set = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let ip = match set(&cfg.orly_listen) {
        Some(v) => v
            .parse::<IpAddr>()
            .map_err(|e| LaunchError::InvalidSetting {
                env: env::LISTEN.into(),
                value: v.clone(),
                reason: format!("{e} (expected an IP address)"),
            })?,
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let port = match set(&cfg.orly_port) {
        Some(v) => v.parse::<u16>().map_err(|e| LaunchError::InvalidSetting {
            env: env::PORT.into(),
            value: v.clone(),
            reason: format!("{e} (expected a port number)"),
        })?,
        None => Service::Relay.default_port(),
    };
    Ok(SocketAddr::new(ip, port))
}

/// The address a client on this host uses to reach a listener bound to `addr`.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

fn kv(k: &str, v: impl ToString) -> (String, String) {
    (k.to_string(), v.to_string())
}

/// One sync service as configured: enabled, binary, listen address.
struct SyncChoice<'a> {
    service: Service,
    enabled: bool,
    binary: &'a str,
    listen: &'a str,
}

fn sync_services(cfg: &LauncherConfig) -> [SyncChoice<'_>; 4] {
    [
        SyncChoice {
            service: Service::SyncDistributed,
            enabled: cfg.sync_distributed_enabled,
            binary: &cfg.sync_distributed_binary,
            listen: &cfg.sync_distributed_listen,
        },
        SyncChoice {
            service: Service::SyncCluster,
            enabled: cfg.sync_cluster_enabled,
            binary: &cfg.sync_cluster_binary,
            listen: &cfg.sync_cluster_listen,
        },
        SyncChoice {
            service: Service::SyncRelayGroup,
            enabled: cfg.sync_relaygroup_enabled,
            binary: &cfg.sync_relaygroup_binary,
            listen: &cfg.sync_relaygroup_listen,
        },
        SyncChoice {
            service: Service::SyncNegentropy,
            enabled: cfg.sync_negentropy_enabled,
            binary: &cfg.sync_negentropy_binary,
            listen: &cfg.sync_negentropy_listen,
        },
    ]
}

/// The relay-level names (ORLY's) a sync service falls back to; when the service runs, they
/// configure it, not the relay.
fn relay_level_names(service: Service) -> &'static [&'static str] {
    match service {
        Service::SyncDistributed => &["ORLY_RELAY_PEERS"],
        Service::SyncCluster => &[
            "ORLY_CLUSTER_ADMINS",
            "ORLY_CLUSTER_PROPAGATE_PRIVILEGED_EVENTS",
        ],
        Service::SyncRelayGroup => &["ORLY_RELAY_GROUP_ADMINS"],
        _ => &[],
    }
}

/// The health service name of a gRPC service.
fn health(service: Service) -> &'static str {
    service
        .grpc_health_service()
        .expect("every service but the relay speaks gRPC")
}

/// The env name a gRPC service reads its listen address from.
fn listen_env(service: Service) -> &'static str {
    service
        .listen_env()
        .expect("every service but the relay has a listen variable")
}

/// Builds the tiers: db; acl; the enabled sync services; the relay. Each child is told the
/// addresses it needs, so nothing is configured twice; the relay does not get the settings
/// the services read in its place, so it has nothing to warn about.
pub fn plan(cfg: &LauncherConfig, exes: &Executables) -> Result<Vec<Tier>, LaunchError> {
    let db_addr = socket_addr("ORLY_LAUNCHER_DB_LISTEN", &cfg.db_listen)?;
    let db_client = reachable(db_addr).to_string();
    let mut tiers = vec![Tier {
        name: "storage",
        services: vec![ServiceSpec {
            name: Service::Db.name(),
            exec: binary(Service::Db, &cfg.db_binary, "ORLY_LAUNCHER_DB_BINARY", exes)?,
            env: vec![kv(listen_env(Service::Db), db_addr)],
            env_remove: Vec::new(),
            probe: Probe::Grpc {
                addr: reachable(db_addr),
                service: health(Service::Db),
            },
            ready_timeout: cfg.db_ready_timeout,
        }],
    }];

    let mut relay_env = vec![
        kv(env::DB_TYPE, "grpc"),
        kv(env::GRPC_DB_SERVER, &db_client),
        kv(env::GRPC_SERVER, &db_client),
    ];
    // orly-db's storage settings.
    // orly-db reads these in the relay's place (the relay reaches it over gRPC).
    let mut relay_remove: Vec<String> = vec![
        env::DB_URL.into(),
        env::DATA_DIR.into(),
        env::DB_MAX_CONNECTIONS.into(),
    ];

    if cfg.acl_enabled {
        let addr = socket_addr("ORLY_LAUNCHER_ACL_LISTEN", &cfg.acl_listen)?;
        let exec = binary(
            Service::Acl,
            &cfg.acl_binary,
            "ORLY_LAUNCHER_ACL_BINARY",
            exes,
        )?;
        tiers.push(Tier {
            name: "access control",
            services: vec![ServiceSpec {
                name: Service::Acl.name(),
                exec,
                env: vec![
                    kv(listen_env(Service::Acl), addr),
                    kv("ORLY_ACL_DB_TYPE", "grpc"),
                    kv("ORLY_ACL_DB_SERVER", &db_client),
                ],
                env_remove: Vec::new(),
                probe: Probe::Grpc {
                    addr: reachable(addr),
                    service: health(Service::Acl),
                },
                ready_timeout: cfg.acl_ready_timeout,
            }],
        });
        relay_env.push(kv(env::ACL_TYPE, "grpc"));
        relay_env.push(kv(env::GRPC_ACL_SERVER, reachable(addr)));
        relay_remove.push("ORLY_FOLLOW_LIST_FREQUENCY".into());
    }

    let mut sync = Vec::new();
    let mut negentropy_runs = false;
    for choice in sync_services(cfg) {
        if !choice.enabled {
            continue;
        }
        let service = choice.service;
        let prefix = service.sync_env_prefix().expect("a sync service");
        let infix = prefix.trim_start_matches("ORLY_SYNC_");
        let addr = socket_addr(&format!("ORLY_LAUNCHER_SYNC_{infix}_LISTEN"), choice.listen)?;
        let exec = binary(
            service,
            choice.binary,
            &format!("ORLY_LAUNCHER_SYNC_{infix}_BINARY"),
            exes,
        )?;
        sync.push(ServiceSpec {
            name: service.name(),
            exec,
            env: vec![
                kv(listen_env(service), addr),
                kv(&format!("{prefix}_DB_TYPE"), "grpc"),
                kv(&format!("{prefix}_DB_SERVER"), &db_client),
            ],
            env_remove: Vec::new(),
            probe: Probe::Grpc {
                addr: reachable(addr),
                service: health(service),
            },
            ready_timeout: cfg.sync_ready_timeout,
        });
        let client_env = service.relay_client_env().expect("a sync service");
        relay_env.push(kv(client_env, reachable(addr)));
        relay_remove.push(format!("{prefix}_"));
        relay_remove.extend(relay_level_names(service).iter().map(|n| n.to_string()));
        negentropy_runs |= service == Service::SyncNegentropy;
    }
    if negentropy_runs {
        // Running the service means the relay should answer NIP-77 through it.
        relay_env.push(kv("ORLY_NEGENTROPY_ENABLED", "true"));
    }
    if !sync.is_empty() {
        relay_env.push(kv(env::SYNC_TYPE, "grpc"));
        tiers.push(Tier {
            name: "sync",
            services: sync,
        });
    }

    let relay_addr = relay_address(cfg)?;
    relay_env.push(kv(env::LISTEN, relay_addr.ip()));
    relay_env.push(kv(env::PORT, relay_addr.port()));
    let exec = binary(
        Service::Relay,
        &cfg.relay_binary,
        "ORLY_LAUNCHER_RELAY_BINARY",
        exes,
    )?;
    tiers.push(Tier {
        name: "relay",
        services: vec![ServiceSpec {
            name: Service::Relay.name(),
            exec,
            env: relay_env,
            env_remove: relay_remove,
            probe: Probe::Http {
                addr: reachable(relay_addr),
                path: "/readyz",
            },
            ready_timeout: cfg.relay_ready_timeout,
        }],
    });
    Ok(tiers)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The configuration of `args`, with the launcher's ORLY_LISTEN / ORLY_PORT unset.
    fn cfg(args: &[&str]) -> LauncherConfig {
        let mut all = vec!["orly-launcher"];
        all.extend_from_slice(args);
        let mut c = LauncherConfig::parse_from(all);
        c.orly_listen = None;
        c.orly_port = None;
        c
    }

    /// A directory holding executable files with the given names.
    fn bin_dir(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::write(dir.path().join(n), "#!/bin/sh\n").unwrap();
        }
        dir
    }

    /// Looks in `dir` only, as a launcher that is not the multi-call binary would.
    fn in_dir(dir: &Path) -> Executables {
        Executables {
            dir: Some(dir.to_path_buf()),
            multi_call: None,
        }
    }

    fn names(tiers: &[Tier]) -> Vec<Vec<&str>> {
        tiers
            .iter()
            .map(|t| t.services.iter().map(|s| s.name).collect())
            .collect()
    }

    #[test]
    fn default_plan_is_db_then_relay_with_addresses_passed_on() {
        let dir = bin_dir(&["orly-db", "orly"]);
        let tiers = plan(&cfg(&[]), &in_dir(dir.path())).unwrap();
        assert_eq!(names(&tiers), vec![vec!["db"], vec!["relay"]]);
        let relay = &tiers[1].services[0];
        assert!(relay.env.contains(&kv("ORLY_DB_TYPE", "grpc")));
        assert!(relay
            .env
            .contains(&kv("ORLY_GRPC_DB_SERVER", "127.0.0.1:50051")));
        assert!(relay.env.contains(&kv("ORLY_PORT", "3334")));
        assert!(relay.env.contains(&kv("ORLY_LISTEN", "127.0.0.1")));
        assert!(!relay.env.iter().any(|(k, _)| k == "ORLY_SYNC_TYPE"));
        assert_eq!(
            tiers[0].services[0].exec,
            Exec::plain(dir.path().join("orly-db"))
        );
        // A relay binary named orly is the multi-call binary; the relay needs no subcommand.
        assert_eq!(relay.exec.binary, dir.path().join("orly"));
        assert!(relay.exec.args.is_empty());
    }

    #[test]
    fn enabled_services_form_their_tiers_and_reach_the_relay() {
        let dir = bin_dir(&[
            "orly-db",
            "orly",
            "orly-acl",
            "orly-sync-negentropy",
            "orly-sync-cluster",
        ]);
        let tiers = plan(
            &cfg(&[
                "--acl-enabled",
                "true",
                "--sync-negentropy-enabled",
                "true",
                "--sync-cluster-enabled",
                "true",
                "--db-listen",
                "0.0.0.0:6000",
            ]),
            &in_dir(dir.path()),
        )
        .unwrap();
        assert_eq!(
            names(&tiers),
            vec![
                vec!["db"],
                vec!["acl"],
                vec!["sync-cluster", "sync-negentropy"],
                vec!["relay"]
            ]
        );
        let neg = &tiers[2].services[1];
        // A wildcard listen address is reached over loopback.
        assert!(neg
            .env
            .contains(&kv("ORLY_SYNC_NEGENTROPY_DB_SERVER", "127.0.0.1:6000")));
        assert!(neg
            .env
            .contains(&kv("ORLY_SYNC_NEGENTROPY_LISTEN", "127.0.0.1:50064")));
        let relay = &tiers[3].services[0];
        for expected in [
            kv("ORLY_SYNC_TYPE", "grpc"),
            kv("ORLY_GRPC_SYNC_NEGENTROPY", "127.0.0.1:50064"),
            kv("ORLY_GRPC_SYNC_CLUSTER", "127.0.0.1:50062"),
            kv("ORLY_ACL_TYPE", "grpc"),
            kv("ORLY_GRPC_ACL_SERVER", "127.0.0.1:50052"),
            kv("ORLY_NEGENTROPY_ENABLED", "true"),
        ] {
            assert!(relay.env.contains(&expected), "missing {expected:?}");
        }
    }

    #[test]
    fn the_relay_does_not_get_what_its_services_read_in_its_place() {
        let dir = bin_dir(&["orly"]);
        let tiers = plan(
            &cfg(&["--sync-distributed-enabled", "true"]),
            &Executables::of(Some(dir.path().join("orly"))),
        )
        .unwrap();
        let relay = &tiers[2].services[0];
        for var in [
            "ORLY_DB_URL",
            "ORLY_DATA_DIR",
            "ORLY_DB_MAX_CONNECTIONS",
            "ORLY_RELAY_PEERS",
            "ORLY_SYNC_DISTRIBUTED_PEERS",
            "ORLY_SYNC_DISTRIBUTED_INTERVAL",
        ] {
            assert!(relay.removes(var), "{var} reaches the relay");
        }
        // Nobody runs the cluster sync, so the relay keeps (and warns about) its settings.
        for var in [
            "ORLY_SYNC_TYPE",
            "ORLY_CLUSTER_ADMINS",
            "ORLY_SYNC_CLUSTER_ADMINS",
        ] {
            assert!(!relay.removes(var), "{var} taken from the relay");
        }
        let dist = &tiers[1].services[0];
        assert!(!dist.removes("ORLY_RELAY_PEERS"));
    }

    #[test]
    fn the_relay_address_honours_orly_listen_and_port_unless_the_launcher_names_one() {
        let mut c = cfg(&[]);
        c.orly_port = Some("7777".into());
        assert_eq!(relay_address(&c).unwrap().to_string(), "127.0.0.1:7777");
        c.orly_listen = Some("0.0.0.0".into());
        assert_eq!(relay_address(&c).unwrap().to_string(), "0.0.0.0:7777");
        let dir = bin_dir(&["orly"]);
        let tiers = plan(&c, &Executables::of(Some(dir.path().join("orly")))).unwrap();
        let relay = &tiers[1].services[0];
        assert!(relay.env.contains(&kv("ORLY_PORT", "7777")));
        assert!(relay.env.contains(&kv("ORLY_LISTEN", "0.0.0.0")));
        // Probes reach a wildcard address over loopback.
        assert_eq!(
            relay.probe,
            Probe::Http {
                addr: "127.0.0.1:7777".parse().unwrap(),
                path: "/readyz"
            }
        );

        c.relay_listen = Some("127.0.0.2:4000".into());
        assert_eq!(relay_address(&c).unwrap().to_string(), "127.0.0.2:4000");

        let mut bad = cfg(&[]);
        bad.orly_port = Some("http".into());
        let err = relay_address(&bad).unwrap_err().to_string();
        assert!(err.contains("ORLY_PORT"), "{err}");
        bad.orly_port = None;
        bad.orly_listen = Some("localhost".into());
        let err = relay_address(&bad).unwrap_err().to_string();
        assert!(err.contains("ORLY_LISTEN"), "{err}");
    }

    #[test]
    fn the_multi_call_binary_runs_services_through_links_or_its_subcommands() {
        let dir = bin_dir(&["orly", "orly-acl"]);
        let own = dir.path().join("orly");
        std::os::unix::fs::symlink(&own, dir.path().join("orly-db")).unwrap();
        let exes = Executables::of(Some(own.clone()));
        // A link next to the launcher is run as it is: it dispatches on its name.
        assert_eq!(
            resolve_binary(Service::Db, "orly-db", &exes),
            Some(Exec::plain(dir.path().join("orly-db")))
        );
        // A separate file of that name is not ours: the launcher's own binary runs instead.
        let acl = resolve_binary(Service::Acl, "orly-acl", &exes).unwrap();
        assert_eq!(acl, Exec::multi_call(own.clone(), Service::Acl));
        assert_eq!(acl.args, vec!["acl"]);
        assert_eq!(acl.arg0.as_deref(), Some("orly"));
        // No link at all: the subcommand.
        assert_eq!(
            resolve_binary(Service::SyncCluster, "orly-sync-cluster", &exes).map(|e| e.args),
            Some(vec!["sync-cluster".to_string()])
        );
        // The relay is the multi-call binary itself.
        let relay = resolve_binary(Service::Relay, "orly", &exes).unwrap();
        assert_eq!(relay.binary, own);
        assert!(relay.args.is_empty());
        // A path named orly gets the subcommand too.
        assert_eq!(
            resolve_binary(Service::Db, own.to_str().unwrap(), &Executables::default())
                .map(|e| e.args),
            Some(vec!["db".to_string()])
        );
    }

    #[test]
    fn missing_binaries_and_bad_addresses_are_named() {
        let dir = bin_dir(&["orly-db"]);
        let err = plan(&cfg(&[]), &in_dir(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("relay") && err.contains("ORLY_LAUNCHER_RELAY_BINARY"),
            "{err}"
        );
        let err = plan(&cfg(&["--db-listen", "nowhere"]), &in_dir(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ORLY_LAUNCHER_DB_LISTEN"), "{err}");
    }
}
