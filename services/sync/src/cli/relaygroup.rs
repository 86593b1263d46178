//! `orly sync-relaygroup` (ORLY's `orly-sync-relaygroup`): relay group configs (kind 39105,
//! and ORLY's 10008) and the authoritative relay list, as
//! `orlysync.relaygroup.v1.RelayGroupService` with `grpc.health.v1`, until SIGTERM/SIGINT. The
//! `orly` binary dispatches here; anyhow is used only because this is the top of a program.

use super::fallback;
use crate::{grpc_server, RelayGroup};
use anyhow::anyhow;
use orly_consts::Service;

crate::service_args! {
    name: "orly-sync-relaygroup",
    prefix: "ORLY_SYNC_RELAYGROUP",
    listen: orly_consts::SYNC_RELAYGROUP_LISTEN,
    about: "orly relay group service: validates relay group configs and names the authoritative relay list",
    {
    /// Who may publish relay group configs, npub or hex, comma-separated [falls back to
    /// ORLY_RELAY_GROUP_ADMINS]. Without any, no config is authoritative.
    #[arg(long, env = "ORLY_SYNC_RELAYGROUP_ADMINS")]
    admins: Option<String>,
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
    orly_common::service::run_main(Service::SyncRelayGroup.binary(), run(parsed))
}

async fn run((args, log_level): (Args, String)) -> anyhow::Result<()> {
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
        Service::SyncRelayGroup.binary(),
        &args.listen,
        &args.metrics_listen,
        |listener, shutdown| grpc_server::serve_relaygroup(listener, group, shutdown),
        || async {},
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
        let (args, level) = Args::parse_from_args(["orly-sync-relaygroup"]);
        assert_eq!(args.listen, orly_consts::SYNC_RELAYGROUP_LISTEN);
        assert_eq!(args.db_server, orly_consts::DB_LISTEN);
        assert_eq!(level, "info");
    }
}
