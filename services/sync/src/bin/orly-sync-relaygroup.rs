//! orly-sync-relaygroup: relay group configs (kind 39105, and ORLY's 10008) and the
//! authoritative relay list, as `orlysync.relaygroup.v1.RelayGroupService` with
//! `grpc.health.v1`, until SIGTERM/SIGINT.

use anyhow::anyhow;
use orly_sync::cli::fallback;
use orly_sync::{grpc_server, RelayGroup};

orly_sync::service_args! {
    name: "orly-sync-relaygroup",
    prefix: "ORLY_SYNC_RELAYGROUP",
    listen: "127.0.0.1:50063",
    about: "orly relay group service: validates relay group configs and names the authoritative relay list",
    {
    /// Who may publish relay group configs, npub or hex, comma-separated [falls back to
    /// ORLY_RELAY_GROUP_ADMINS]. Without any, no config is authoritative.
    #[arg(long, env = "ORLY_SYNC_RELAYGROUP_ADMINS")]
    admins: Option<String>,
    }
}

fn main() -> std::process::ExitCode {
    orly_common::service::run_main("orly-sync-relaygroup", run())
}

async fn run() -> anyhow::Result<()> {
    let (args, log_level) = Args::parse_all();
    orly_common::init_tracing(&log_level);
    let admins = fallback(args.admins.clone(), &["ORLY_RELAY_GROUP_ADMINS"]).unwrap_or_default();
    let admins = orly_common::parse_pubkey_list(&admins)
        .map_err(|e| anyhow!("ORLY_SYNC_RELAYGROUP_ADMINS: {e}"))?;
    if admins.is_empty() {
        tracing::warn!("no relay group admins: no config will be authoritative");
    }
    let store = args.open_store().await?;
    let group = RelayGroup::new(store, admins);
    orly_common::service::serve_until_signal(
        "orly-sync-relaygroup",
        &args.listen,
        &args.metrics_listen,
        |listener, shutdown| grpc_server::serve_relaygroup(listener, group, shutdown),
        || async {},
    )
    .await?;
    Ok(())
}
