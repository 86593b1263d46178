//! What to run: each service's binary, environment and readiness probe, grouped in tiers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use orly_proto::service_names;

use crate::probe::Probe;
use crate::{LaunchError, LauncherConfig};

/// One child process to supervise.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Short name used in logs and output prefixes (db, acl, sync-negentropy, relay).
    pub name: &'static str,
    pub binary: PathBuf,
    /// Variables set for this child on top of the launcher's environment.
    pub env: Vec<(String, String)>,
    pub probe: Probe,
    pub ready_timeout: Duration,
}

/// Services started together once the previous tier is Ready.
#[derive(Debug, Clone)]
pub struct Tier {
    pub name: &'static str,
    pub services: Vec<ServiceSpec>,
}

/// Where `name` is: a path as given, else next to `exe_dir`, else on PATH.
pub fn resolve_binary(name: &str, exe_dir: Option<&Path>) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    if let Some(dir) = exe_dir {
        let p = dir.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn binary(
    service: &'static str,
    name: &str,
    env: &str,
    exe_dir: Option<&Path>,
) -> Result<PathBuf, LaunchError> {
    resolve_binary(name, exe_dir).ok_or_else(|| LaunchError::BinaryNotFound {
        service,
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

/// The sync services: (short name, env infix, enabled, binary, listen, health name).
fn sync_services(
    cfg: &LauncherConfig,
) -> [(&'static str, &'static str, bool, &str, &str, &'static str); 4] {
    [
        (
            "sync-distributed",
            "DISTRIBUTED",
            cfg.sync_distributed_enabled,
            &cfg.sync_distributed_binary,
            &cfg.sync_distributed_listen,
            service_names::SYNC_DISTRIBUTED,
        ),
        (
            "sync-cluster",
            "CLUSTER",
            cfg.sync_cluster_enabled,
            &cfg.sync_cluster_binary,
            &cfg.sync_cluster_listen,
            service_names::SYNC_CLUSTER,
        ),
        (
            "sync-relaygroup",
            "RELAYGROUP",
            cfg.sync_relaygroup_enabled,
            &cfg.sync_relaygroup_binary,
            &cfg.sync_relaygroup_listen,
            service_names::SYNC_RELAYGROUP,
        ),
        (
            "sync-negentropy",
            "NEGENTROPY",
            cfg.sync_negentropy_enabled,
            &cfg.sync_negentropy_binary,
            &cfg.sync_negentropy_listen,
            service_names::SYNC_NEGENTROPY,
        ),
    ]
}

/// Builds the tiers: db; acl; the enabled sync services; the relay. Each child is told the
/// addresses it needs, so nothing is configured twice.
pub fn plan(cfg: &LauncherConfig, exe_dir: Option<&Path>) -> Result<Vec<Tier>, LaunchError> {
    let db_addr = socket_addr("ORLY_LAUNCHER_DB_LISTEN", &cfg.db_listen)?;
    let db_client = reachable(db_addr).to_string();
    let mut tiers = vec![Tier {
        name: "storage",
        services: vec![ServiceSpec {
            name: "db",
            binary: binary("db", &cfg.db_binary, "ORLY_LAUNCHER_DB_BINARY", exe_dir)?,
            env: vec![kv("ORLY_DB_LISTEN", db_addr)],
            probe: Probe::Grpc {
                addr: reachable(db_addr),
                service: service_names::DB,
            },
            ready_timeout: cfg.db_ready_timeout,
        }],
    }];

    let mut relay_env = vec![
        kv("ORLY_DB_TYPE", "grpc"),
        kv("ORLY_GRPC_DB_SERVER", &db_client),
        kv("ORLY_GRPC_SERVER", &db_client),
    ];

    if cfg.acl_enabled {
        let addr = socket_addr("ORLY_LAUNCHER_ACL_LISTEN", &cfg.acl_listen)?;
        tiers.push(Tier {
            name: "access control",
            services: vec![ServiceSpec {
                name: "acl",
                binary: binary("acl", &cfg.acl_binary, "ORLY_LAUNCHER_ACL_BINARY", exe_dir)?,
                env: vec![
                    kv("ORLY_ACL_LISTEN", addr),
                    kv("ORLY_ACL_DB_TYPE", "grpc"),
                    kv("ORLY_ACL_DB_SERVER", &db_client),
                ],
                probe: Probe::Grpc {
                    addr: reachable(addr),
                    service: service_names::ACL,
                },
                ready_timeout: cfg.acl_ready_timeout,
            }],
        });
        relay_env.push(kv("ORLY_ACL_TYPE", "grpc"));
        relay_env.push(kv("ORLY_GRPC_ACL_SERVER", reachable(addr)));
    }

    let mut sync = Vec::new();
    for (name, infix, enabled, bin, listen, health) in sync_services(cfg) {
        if !enabled {
            continue;
        }
        let listen_env = format!("ORLY_LAUNCHER_SYNC_{infix}_LISTEN");
        let addr = socket_addr(&listen_env, listen)?;
        sync.push(ServiceSpec {
            name,
            binary: binary(
                name,
                bin,
                &format!("ORLY_LAUNCHER_SYNC_{infix}_BINARY"),
                exe_dir,
            )?,
            env: vec![
                kv(&format!("ORLY_SYNC_{infix}_LISTEN"), addr),
                kv(&format!("ORLY_SYNC_{infix}_DB_TYPE"), "grpc"),
                kv(&format!("ORLY_SYNC_{infix}_DB_SERVER"), &db_client),
            ],
            probe: Probe::Grpc {
                addr: reachable(addr),
                service: health,
            },
            ready_timeout: cfg.sync_ready_timeout,
        });
        relay_env.push(kv(&format!("ORLY_GRPC_SYNC_{infix}"), reachable(addr)));
        if infix == "NEGENTROPY" {
            // Running the service means the relay should answer NIP-77 through it.
            relay_env.push(kv("ORLY_NEGENTROPY_ENABLED", "true"));
        }
    }
    if !sync.is_empty() {
        relay_env.push(kv("ORLY_SYNC_TYPE", "grpc"));
        tiers.push(Tier {
            name: "sync",
            services: sync,
        });
    }

    let relay_addr = socket_addr("ORLY_LAUNCHER_RELAY_LISTEN", &cfg.relay_listen)?;
    relay_env.push(kv("ORLY_LISTEN", relay_addr.ip()));
    relay_env.push(kv("ORLY_PORT", relay_addr.port()));
    tiers.push(Tier {
        name: "relay",
        services: vec![ServiceSpec {
            name: "relay",
            binary: binary(
                "relay",
                &cfg.relay_binary,
                "ORLY_LAUNCHER_RELAY_BINARY",
                exe_dir,
            )?,
            env: relay_env,
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

    fn cfg(args: &[&str]) -> LauncherConfig {
        let mut all = vec!["orly-launcher"];
        all.extend_from_slice(args);
        LauncherConfig::parse_from(all)
    }

    /// A directory holding executable files with the given names.
    fn bin_dir(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::write(dir.path().join(n), "#!/bin/sh\n").unwrap();
        }
        dir
    }

    #[test]
    fn default_plan_is_db_then_relay_with_addresses_passed_on() {
        let dir = bin_dir(&["orly-db", "orly"]);
        let tiers = plan(&cfg(&[]), Some(dir.path())).unwrap();
        let names: Vec<Vec<&str>> = tiers
            .iter()
            .map(|t| t.services.iter().map(|s| s.name).collect())
            .collect();
        assert_eq!(names, vec![vec!["db"], vec!["relay"]]);
        let relay = &tiers[1].services[0];
        assert!(relay.env.contains(&kv("ORLY_DB_TYPE", "grpc")));
        assert!(relay
            .env
            .contains(&kv("ORLY_GRPC_DB_SERVER", "127.0.0.1:50051")));
        assert!(relay.env.contains(&kv("ORLY_PORT", "3334")));
        assert!(!relay.env.iter().any(|(k, _)| k == "ORLY_SYNC_TYPE"));
        assert_eq!(tiers[0].services[0].binary, dir.path().join("orly-db"));
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
            Some(dir.path()),
        )
        .unwrap();
        let names: Vec<Vec<&str>> = tiers
            .iter()
            .map(|t| t.services.iter().map(|s| s.name).collect())
            .collect();
        assert_eq!(
            names,
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
    fn missing_binaries_and_bad_addresses_are_named() {
        let dir = bin_dir(&["orly-db"]);
        let err = plan(&cfg(&[]), Some(dir.path())).unwrap_err().to_string();
        assert!(
            err.contains("relay") && err.contains("ORLY_LAUNCHER_RELAY_BINARY"),
            "{err}"
        );
        let err = plan(&cfg(&["--db-listen", "nowhere"]), Some(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ORLY_LAUNCHER_DB_LISTEN"), "{err}");
    }
}
