//! `orly sync-cluster` (ORLY's `orly-sync-cluster`): replication between the member relays of
//! a cluster (membership by kind 39108), as `orlysync.cluster.v1.ClusterSyncService` with
//! `grpc.health.v1`, until SIGTERM. The `orly` binary dispatches here; anyhow is used only
//! because this is the top of a program.

use std::time::Duration;

use super::{env_bool, fallback};
use crate::{grpc_server, ClusterSettings, ClusterSync};
use anyhow::anyhow;
use clap::builder::BoolishValueParser;
use clap::ArgAction;
use orly_consts::Service;

crate::service_args! {
    name: "orly-sync-cluster",
    prefix: "ORLY_SYNC_CLUSTER",
    listen: orly_consts::SYNC_CLUSTER_LISTEN,
    about: "orly cluster sync: replicates every member relay of the cluster (membership by kind 39108) in near real time",
    {
    /// Who may publish cluster membership (kind 39108), npub or hex, comma-separated
    /// [falls back to ORLY_CLUSTER_ADMINS, then ORLY_ADMINS].
    #[arg(long, env = "ORLY_SYNC_CLUSTER_ADMINS")]
    admins: Option<String>,
    /// Replicate privileged events (DMs, gift wraps, …) [default true; falls back to
    /// ORLY_CLUSTER_PROPAGATE_PRIVILEGED_EVENTS].
    #[arg(long, env = "ORLY_SYNC_CLUSTER_PROPAGATE_PRIVILEGED", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    propagate_privileged: Option<bool>,
    /// This relay's public URL, never replicated from [falls back to ORLY_RELAY_URL].
    #[arg(long, env = "ORLY_SYNC_CLUSTER_RELAY_URL")]
    relay_url: Option<String>,
    /// Pause after a failed poll, and between polls of members that cannot long-poll.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_POLL_INTERVAL", default_value = "5s", value_parser = orly_common::parse_duration)]
    poll_interval: Duration,
    /// How long a member holds a poll open waiting for new events (at most 5s).
    #[arg(long, env = "ORLY_SYNC_CLUSTER_LONG_POLL", default_value = "5s", value_parser = orly_common::parse_duration)]
    long_poll: Duration,
    /// How long a member's NIP-11 identity is cached.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_NIP11_TTL", default_value = "30m", value_parser = orly_common::parse_duration)]
    nip11_ttl: Duration,
    /// Deadline of one request to a member (a long poll gets the long-poll time on top).
    #[arg(long, env = "ORLY_SYNC_CLUSTER_TIMEOUT", default_value = "10s", value_parser = orly_common::parse_duration)]
    timeout: Duration,
    /// Lease on a member held by the replica replicating it.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_LEASE_TTL", default_value = "15s", value_parser = orly_common::parse_duration)]
    lease_ttl: Duration,
    /// Answer unsigned /cluster requests (ORLY members sign none); signed ones are still checked.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_ALLOW_UNAUTHENTICATED", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    allow_unauthenticated: bool,
    /// Start replicating at start-up (false: only the Start RPC starts it).
    #[arg(long, env = "ORLY_SYNC_CLUSTER_AUTOSTART", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    autostart: bool,
    }
}

/// Runs the service with `args` (the first one is the program name, as in `std::env::args`).
/// Bad arguments and `--help` exit the process with clap's message.
pub fn main_from<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let parsed = Args::parse_from_args(args);
    orly_common::service::run_main(Service::SyncCluster.binary(), run(parsed))
}

async fn run((args, log_level): (Args, String)) -> anyhow::Result<()> {
    orly_common::init_tracing(&log_level);
    let admins =
        fallback(args.admins.clone(), &["ORLY_CLUSTER_ADMINS", "ORLY_ADMINS"]).unwrap_or_default();
    let admins = orly_common::parse_pubkey_list(&admins)
        .map_err(|e| anyhow!("ORLY_SYNC_CLUSTER_ADMINS: {e}"))?;
    if admins.is_empty() {
        tracing::warn!("no cluster admins: membership comes only from the UpdateMembership RPC");
    }
    let settings = ClusterSettings {
        admins,
        propagate_privileged: args
            .propagate_privileged
            .or_else(|| env_bool("ORLY_CLUSTER_PROPAGATE_PRIVILEGED_EVENTS"))
            .unwrap_or(true),
        relay_url: fallback(args.relay_url.clone(), &["ORLY_RELAY_URL"]),
        poll_interval: args.poll_interval,
        long_poll: args.long_poll,
        nip11_ttl: args.nip11_ttl,
        timeout: args.timeout,
        lease_ttl: args.lease_ttl,
        allow_unauthenticated: args.allow_unauthenticated,
        ..ClusterSettings::default()
    };
    let store = args.open_store().await?;
    let sync = ClusterSync::new(store, settings).map_err(|e| anyhow!(e))?;
    if args.autostart {
        sync.start();
    }
    let stopper = sync.clone();
    orly_common::service::serve_until_signal(
        Service::SyncCluster.binary(),
        &args.listen,
        &args.metrics_listen,
        |listener, shutdown| grpc_server::serve_cluster(listener, sync, shutdown),
        || async move { stopper.stop().await },
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_orlys() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        let (args, level) = Args::parse_from_args(["orly-sync-cluster"]);
        assert_eq!(args.listen, orly_consts::SYNC_CLUSTER_LISTEN);
        assert_eq!(args.db_server, orly_consts::DB_LISTEN);
        assert_eq!(level, "info");
    }
}
