//! `orly sync-distributed` (ORLY's `orly-sync-distributed`): serial-based pull sync between
//! peer relays, as `orlysync.distributed.v1.DistributedSyncService` with `grpc.health.v1`,
//! until SIGTERM/SIGINT. The `orly` binary dispatches here; anyhow is used only because this
//! is the top of a program.

use std::time::Duration;

use super::fallback;
use crate::http::parse_url_list;
use crate::{grpc_server, DistributedSettings, DistributedSync};
use anyhow::anyhow;
use clap::builder::BoolishValueParser;
use clap::ArgAction;
use orly_consts::Service;

crate::service_args! {
    name: "orly-sync-distributed",
    prefix: "ORLY_SYNC_DISTRIBUTED",
    listen: orly_consts::SYNC_DISTRIBUTED_LISTEN,
    about: "orly distributed sync: pulls new events from peer relays by serial, and answers their pulls",
    {
    /// Peer relays, comma-separated http(s) or ws(s) URLs [falls back to ORLY_RELAY_PEERS];
    /// the relay group's relays are added to them.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_PEERS")]
    peers: Option<String>,
    /// This relay's public URL, never polled as a peer [falls back to ORLY_RELAY_URL].
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_RELAY_URL")]
    relay_url: Option<String>,
    /// node_id sent to peers (default: the relay identity pubkey, hex).
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_NODE_ID")]
    node_id: Option<String>,
    /// Time between pulls from a peer that cannot long-poll, and after a failure (TriggerSync
    /// wakes them earlier).
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_INTERVAL", default_value = "30s", value_parser = orly_common::parse_duration)]
    interval: Duration,
    /// How long a pull waits at the peer for a new event before asking again (at most 25s);
    /// 0: poll every interval.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_LONG_POLL", default_value = "25s", value_parser = orly_common::parse_duration)]
    long_poll: Duration,
    /// How long a peer's NIP-11 identity is cached.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_NIP11_TTL", default_value = "30m", value_parser = orly_common::parse_duration)]
    nip11_ttl: Duration,
    /// Deadline of one request to a peer.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_TIMEOUT", default_value = "10s", value_parser = orly_common::parse_duration)]
    timeout: Duration,
    /// Lease on a peer held by the replica pulling it; a dead replica's peers move after it.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_LEASE_TTL", default_value = "15s", value_parser = orly_common::parse_duration)]
    lease_ttl: Duration,
    /// Start pulling at start-up (false: only answer peers).
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_AUTOSTART", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
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
    orly_common::service::run_main(Service::SyncDistributed.binary(), run(parsed))
}

async fn run((args, log_level): (Args, String)) -> anyhow::Result<()> {
    orly_common::init_tracing(&log_level);
    let peers = fallback(args.peers.clone(), &["ORLY_RELAY_PEERS"]).unwrap_or_default();
    let settings = DistributedSettings {
        relay_url: fallback(args.relay_url.clone(), &["ORLY_RELAY_URL"]),
        node_id: args.node_id.clone(),
        peers: parse_url_list(&peers).map_err(|e| anyhow!("ORLY_SYNC_DISTRIBUTED_PEERS: {e}"))?,
        interval: args.interval,
        long_poll: args.long_poll,
        nip11_ttl: args.nip11_ttl,
        timeout: args.timeout,
        lease_ttl: args.lease_ttl,
        ..DistributedSettings::default()
    };
    let store = args.open_store().await?;
    let sync = DistributedSync::new(store, settings).map_err(|e| anyhow!(e))?;
    if args.autostart {
        sync.start();
    }
    let stopper = sync.clone();
    orly_common::service::serve_until_signal(
        Service::SyncDistributed.binary(),
        &args.listen,
        &args.metrics_listen,
        |listener, shutdown| grpc_server::serve_distributed(listener, sync, shutdown),
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
        let (args, level) = Args::parse_from_args(["orly-sync-distributed"]);
        assert_eq!(args.listen, orly_consts::SYNC_DISTRIBUTED_LISTEN);
        assert_eq!(args.db_server, orly_consts::DB_LISTEN);
        assert_eq!(level, "info");
    }
}
