//! Relay configuration: every setting is a flag and an env var with ORLY's name.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use nostr::PublicKey;
use orly_acl::{AclConfig, Mode as AclMode};
use orly_common::parse_duration;
use orly_common::parse_pubkey_list;
use orly_db::{StoreConfig, StoreKind};

/// The orly Nostr relay.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "orly",
    version,
    about = "orly: a Nostr relay (WebSocket and HTTP on one port)"
)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, env = "ORLY_LISTEN", default_value = "127.0.0.1")]
    pub listen: IpAddr,
    /// Port to listen on.
    #[arg(long, env = "ORLY_PORT", default_value_t = 3334)]
    pub port: u16,
    /// Log level or filter directive (e.g. info, debug, info,orly=trace).
    #[arg(long, env = "ORLY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Where events live: sqlite (embedded), postgres, or grpc (the orly-db service).
    #[arg(long, env = "ORLY_DB_TYPE", default_value = "sqlite")]
    pub db_type: StoreKind,
    /// Data directory holding the SQLite file (orly.db).
    #[arg(long, env = "ORLY_DATA_DIR", default_value_os_t = orly_db::config::default_data_dir())]
    pub data_dir: PathBuf,
    /// PostgreSQL URL for --db-type postgres.
    #[arg(long, env = "ORLY_DB_URL")]
    pub db_url: Option<String>,
    /// orly-db address for --db-type grpc; ORLY's name ORLY_GRPC_SERVER is read when this
    /// is unset [default: 127.0.0.1:50051].
    #[arg(long, env = "ORLY_GRPC_DB_SERVER")]
    pub grpc_db_server: Option<String>,
    /// Deadline of one call to orly-db over gRPC.
    #[arg(long, env = "ORLY_GRPC_DB_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub grpc_db_timeout: Duration,

    /// Where access control runs: local (in this process) or grpc (the orly-acl service).
    #[arg(long, env = "ORLY_ACL_TYPE", default_value = "local", value_parser = ["local", "grpc"])]
    pub acl_type: String,
    /// orly-acl address for --acl-type grpc.
    #[arg(long, env = "ORLY_GRPC_ACL_SERVER", default_value = "127.0.0.1:50052")]
    pub grpc_acl_server: String,
    /// Deadline of one call to orly-acl; when it passes (or the service is down) the
    /// request is refused with `error:`.
    #[arg(long, env = "ORLY_GRPC_ACL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub grpc_acl_timeout: Duration,
    /// Access control mode: none (open relay), follows (admins and whom they follow may
    /// write) or managed (NIP-86 allow/ban lists). With --acl-type grpc the service's mode
    /// rules; this is then only the initial hint.
    #[arg(long, env = "ORLY_ACL_MODE", default_value = "none")]
    pub acl_mode: AclMode,
    /// Owners: comma-separated hex or npub pubkeys (NIP-86, read privileged kinds).
    #[arg(long, env = "ORLY_OWNERS", default_value = "")]
    pub owners: String,
    /// Admins: comma-separated hex or npub pubkeys (NIP-86, read privileged kinds; in mode
    /// follows their follow lists decide who may write).
    #[arg(long, env = "ORLY_ADMINS", default_value = "")]
    pub admins: String,
    /// How often follow lists (mode follows) and lists (mode managed) are re-read from
    /// storage with --acl-type local.
    #[arg(long, env = "ORLY_FOLLOW_LIST_FREQUENCY", default_value = "1h", value_parser = parse_duration)]
    pub follow_list_frequency: Duration,
    /// Require NIP-42 authentication before any read or write.
    #[arg(long, env = "ORLY_AUTH_REQUIRED", default_value_t = false)]
    pub auth_required: bool,
    /// Require NIP-42 authentication before writes only.
    #[arg(long, env = "ORLY_AUTH_TO_WRITE", default_value_t = false)]
    pub auth_to_write: bool,
    /// Serve privileged kinds (DMs, gift wraps, ...) to anyone, not only to their parties.
    #[arg(long, env = "ORLY_PRIVILEGED_OPEN", default_value_t = false)]
    pub privileged_open: bool,

    /// Answer NIP-77 (NEG-OPEN / NEG-MSG / NEG-CLOSE) and list NIP 77 in NIP-11.
    #[arg(long, env = "ORLY_NEGENTROPY_ENABLED", default_value_t = false)]
    pub negentropy_enabled: bool,
    /// Where the sync subsystems run: local (in this process) or grpc (their services).
    #[arg(long, env = "ORLY_SYNC_TYPE", default_value = "local", value_parser = ["local", "grpc"])]
    pub sync_type: String,
    /// orly-sync-negentropy address(es) for --sync-type grpc; several comma-separated addresses
    /// are replicas: new sessions are spread over them and each stays on its replica.
    #[arg(
        long,
        env = "ORLY_GRPC_SYNC_NEGENTROPY",
        default_value = "127.0.0.1:50064"
    )]
    pub grpc_sync_negentropy: String,
    /// Deadline of one call to a sync service.
    #[arg(long, env = "ORLY_GRPC_SYNC_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub grpc_sync_timeout: Duration,
    /// Largest negentropy message the relay sends (local sync; 0: unlimited, else >= 4096).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_FRAME_SIZE", default_value_t = 4096)]
    pub negentropy_frame_size: u64,
    /// Negentropy id size in bytes (local sync); protocol version 0x61 fixes it at 32.
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_ID_SIZE", default_value_t = 32)]
    pub negentropy_id_size: usize,
    /// An idle NIP-77 session is closed after this long (local sync).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_SESSION_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub negentropy_session_timeout: Duration,
    /// Most events one NIP-77 session may cover; more get NEG-ERR "blocked: …" (local sync).
    #[arg(
        long,
        env = "ORLY_SYNC_NEGENTROPY_MAX_RECORDS",
        default_value_t = 1_000_000
    )]
    pub negentropy_max_records: usize,
    /// Peer relays (WebSocket URLs, comma-separated) to sync with over NIP-77 (local sync).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_PEERS", default_value = "")]
    pub negentropy_peers: String,
    /// Time between relay-to-relay negentropy passes (local sync).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub negentropy_interval: Duration,
    /// This relay's public URL (ws:// or wss://); NIP-42 AUTH events must name it when set.
    #[arg(long, env = "ORLY_RELAY_URL")]
    pub relay_url: Option<String>,

    /// orly-sync-distributed address for --sync-type grpc (e.g. 127.0.0.1:50061); unset: no
    /// distributed sync.
    #[arg(long, env = "ORLY_GRPC_SYNC_DISTRIBUTED")]
    pub grpc_sync_distributed: Option<String>,
    /// orly-sync-cluster address for --sync-type grpc (e.g. 127.0.0.1:50062); unset: no cluster.
    #[arg(long, env = "ORLY_GRPC_SYNC_CLUSTER")]
    pub grpc_sync_cluster: Option<String>,
    /// orly-sync-relaygroup address for --sync-type grpc (e.g. 127.0.0.1:50063); unset: no
    /// relay group.
    #[arg(long, env = "ORLY_GRPC_SYNC_RELAYGROUP")]
    pub grpc_sync_relaygroup: Option<String>,
    /// Distributed sync peers (http(s) or ws(s) URLs, comma-separated) for local sync; with
    /// peers or relay group admins the distributed sync runs in-process.
    #[arg(long, env = "ORLY_RELAY_PEERS", default_value = "")]
    pub relay_peers: String,
    /// Time between distributed pulls from each peer (local sync).
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub distributed_interval: Duration,
    /// How long a distributed pull waits at the peer for a new event (local sync; at most 25s,
    /// 0: poll every interval).
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_LONG_POLL", default_value = "25s", value_parser = parse_duration)]
    pub distributed_long_poll: Duration,
    /// Who may publish cluster membership (kind 39108), npub or hex (local sync); falls back to
    /// ORLY_ADMINS, as ORLY does. With admins the cluster sync runs in-process.
    #[arg(long, env = "ORLY_CLUSTER_ADMINS")]
    pub cluster_admins: Option<String>,
    /// Replicate privileged events (DMs, gift wraps, …) between cluster members (local sync).
    #[arg(long, env = "ORLY_CLUSTER_PROPAGATE_PRIVILEGED_EVENTS", default_value = "true", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub cluster_propagate_privileged: bool,
    /// Pause after a failed cluster poll (local sync).
    #[arg(long, env = "ORLY_SYNC_CLUSTER_POLL_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub cluster_poll_interval: Duration,
    /// Who may publish relay group configs (kinds 39105 and 10008), npub or hex (local sync).
    #[arg(long, env = "ORLY_RELAY_GROUP_ADMINS", default_value = "")]
    pub relay_group_admins: String,
    /// How often the relay looks for events stored by other processes (sync services, other
    /// relay replicas) to deliver them to live subscriptions; 0 disables.
    #[arg(long, env = "ORLY_STORE_FOLLOW_INTERVAL", default_value = "50ms", value_parser = parse_duration)]
    pub store_follow_interval: Duration,

    /// NIP-11 name.
    #[arg(long, env = "ORLY_APP_NAME", default_value = "orly")]
    pub name: String,
    /// NIP-11 description.
    #[arg(
        long,
        env = "ORLY_RELAY_DESCRIPTION",
        default_value = "An orly Nostr relay"
    )]
    pub description: String,
    /// NIP-11 contact.
    #[arg(long, env = "ORLY_RELAY_CONTACT")]
    pub contact: Option<String>,

    /// Largest WebSocket message accepted, in bytes.
    #[arg(long, env = "ORLY_MAX_MESSAGE_SIZE", default_value_t = 131_072)]
    pub max_message_size: usize,
    /// Open subscriptions allowed per connection.
    #[arg(long, env = "ORLY_MAX_SUBSCRIPTIONS", default_value_t = 20)]
    pub max_subscriptions: usize,
    /// Filters allowed in one REQ or COUNT.
    #[arg(long, env = "ORLY_MAX_FILTERS", default_value_t = 10)]
    pub max_filters: usize,
    /// Largest `limit` honoured; larger limits are clamped to it (NIP-11 max_limit).
    #[arg(long, env = "ORLY_MAX_LIMIT", default_value_t = 5000)]
    pub max_limit: usize,
    /// Limit applied to the stored part of a filter that names none.
    #[arg(long, env = "ORLY_DEFAULT_LIMIT", default_value_t = 500)]
    pub default_limit: usize,
    /// Most values in one filter field (ids, authors, kinds, a tag).
    #[arg(long, env = "ORLY_MAX_FILTER_VALUES", default_value_t = 2000)]
    pub max_filter_values: usize,
    /// Most tags in one event.
    #[arg(long, env = "ORLY_MAX_EVENT_TAGS", default_value_t = 2500)]
    pub max_event_tags: usize,
    /// How far in the future an event's created_at may be.
    #[arg(long, env = "ORLY_CREATED_AT_FUTURE_LIMIT", default_value = "15m", value_parser = parse_duration)]
    pub created_at_future_limit: Duration,
    /// Messages queued for one connection before it is dropped as a slow reader.
    #[arg(long, env = "ORLY_SEND_QUEUE", default_value_t = 1024)]
    pub send_queue: usize,
    /// EVENTs accepted per connection per second (0: unlimited); excess gets `rate-limited:`.
    #[arg(long, env = "ORLY_EVENTS_PER_SECOND", default_value_t = 0)]
    pub events_per_second: u32,
    /// Interval of WebSocket pings; a connection silent for three intervals is closed.
    #[arg(long, env = "ORLY_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub ping_interval: Duration,
}

impl Cli {
    /// The store settings, honouring ORLY's alternative env name for the gRPC address.
    pub fn store_config(&self) -> StoreConfig {
        let grpc_server = self
            .grpc_db_server
            .clone()
            .or_else(|| std::env::var("ORLY_GRPC_SERVER").ok())
            .unwrap_or_else(|| "127.0.0.1:50051".into());
        StoreConfig {
            kind: self.db_type,
            data_dir: self.data_dir.clone(),
            postgres_url: self.db_url.clone(),
            grpc_server,
            grpc_timeout: self.grpc_db_timeout,
            ..StoreConfig::default()
        }
    }

    /// `ORLY_OWNERS` and `ORLY_ADMINS`, parsed.
    pub fn owners_and_admins(&self) -> Result<(Vec<PublicKey>, Vec<PublicKey>), String> {
        let owners = parse_pubkey_list(&self.owners).map_err(|e| format!("ORLY_OWNERS: {e}"))?;
        let admins = parse_pubkey_list(&self.admins).map_err(|e| format!("ORLY_ADMINS: {e}"))?;
        Ok((owners, admins))
    }

    /// The in-process ACL engine's settings.
    pub fn acl_config(&self) -> Result<AclConfig, String> {
        let (owners, admins) = self.owners_and_admins()?;
        Ok(AclConfig {
            mode: self.acl_mode,
            owners,
            admins,
            refresh_interval: self.follow_list_frequency,
        })
    }

    /// Settings of the in-process negentropy engine and peer sync (`--sync-type local`).
    pub fn negentropy_settings(
        &self,
    ) -> (
        orly_sync_negentropy::EngineSettings,
        orly_sync_negentropy::SyncSettings,
        Vec<String>,
    ) {
        let engine = orly_sync_negentropy::EngineSettings {
            frame_size: self.negentropy_frame_size,
            id_size: self.negentropy_id_size,
            session_timeout: self.negentropy_session_timeout,
            max_records: self.negentropy_max_records,
            ..Default::default()
        };
        let sync = orly_sync_negentropy::SyncSettings {
            interval: self.negentropy_interval,
            frame_size: self.negentropy_frame_size,
            max_records: self.negentropy_max_records,
            ..Default::default()
        };
        let peers = self
            .negentropy_peers
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect();
        (engine, sync, peers)
    }

    pub fn relay_config(&self) -> Result<RelayConfig, String> {
        let (owners, admins) = self.owners_and_admins()?;
        Ok(RelayConfig {
            auth_required: self.auth_required,
            auth_to_write: self.auth_to_write,
            privileged_open: self.privileged_open,
            privileged_readers: owners.into_iter().chain(admins).collect(),
            relay_url: self.relay_url.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            contact: self.contact.clone(),
            limits: Limits {
                max_message_size: self.max_message_size,
                max_subscriptions: self.max_subscriptions,
                max_filters: self.max_filters,
                max_limit: self.max_limit,
                default_limit: self.default_limit,
                max_filter_values: self.max_filter_values,
                max_event_tags: self.max_event_tags,
                created_at_future_limit: self.created_at_future_limit,
                send_queue: self.send_queue,
                events_per_second: self.events_per_second,
                ping_interval: self.ping_interval,
            },
        })
    }
}

/// Limits enforced per connection and per message.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_size: usize,
    pub max_subscriptions: usize,
    pub max_filters: usize,
    pub max_limit: usize,
    pub default_limit: usize,
    pub max_filter_values: usize,
    pub max_event_tags: usize,
    pub created_at_future_limit: Duration,
    pub send_queue: usize,
    pub events_per_second: u32,
    pub ping_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 131_072,
            max_subscriptions: 20,
            max_filters: 10,
            max_limit: 5000,
            default_limit: 500,
            max_filter_values: 2000,
            max_event_tags: 2500,
            created_at_future_limit: Duration::from_secs(900),
            send_queue: 1024,
            events_per_second: 0,
            ping_interval: Duration::from_secs(30),
        }
    }
}

/// What the relay itself needs (the store and ACL are handed in separately).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// NIP-42 AUTH before any read or write.
    pub auth_required: bool,
    /// NIP-42 AUTH before writes.
    pub auth_to_write: bool,
    /// Privileged kinds served to anyone.
    pub privileged_open: bool,
    /// Besides their parties, who may read privileged kinds (owners and admins).
    pub privileged_readers: Vec<PublicKey>,
    pub relay_url: Option<String>,
    pub name: String,
    pub description: String,
    pub contact: Option<String>,
    pub limits: Limits,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            auth_required: false,
            auth_to_write: false,
            privileged_open: false,
            privileged_readers: Vec::new(),
            relay_url: None,
            name: "orly".into(),
            description: "An orly Nostr relay".into(),
            contact: None,
            limits: Limits::default(),
        }
    }
}
