//! Relay configuration: every setting is a flag and an env var with ORLY's name, and
//! [`ignored_variables`]: which of the set ones have no effect in the chosen mode.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, ValueEnum};
use nostr::PublicKey;
use orly_acl::{AclConfig, Mode as AclMode};
use orly_common::parse_duration;
use orly_common::parse_pubkey_list;
use orly_consts::env;
use orly_db::{StoreConfig, StoreKind};

/// Where access control runs (`ORLY_ACL_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum AclType {
    /// In this process, over the relay's own store.
    #[default]
    Local,
    /// The orly-acl service.
    Grpc,
}

/// Where the sync subsystems run (`ORLY_SYNC_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum SyncType {
    /// In this process.
    #[default]
    Local,
    /// Their services (orly-sync-*).
    Grpc,
}

impl std::fmt::Display for AclType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Grpc => "grpc",
        })
    }
}

impl std::fmt::Display for SyncType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Grpc => "grpc",
        })
    }
}

/// What `orly --help` says about NIP-77, and the README repeats.
pub const NIP77_HELP: &str = "NIP-77 (negentropy sync for clients, e.g. `strfry sync` or nostr-sdk) is on by \
default with --sync-type local: the relay answers NEG-OPEN / NEG-MSG / NEG-CLOSE itself and lists 77 \
in NIP-11. ORLY_NEGENTROPY_ENABLED=false turns it off. With --sync-type grpc it needs the \
orly-sync-negentropy service and ORLY_NEGENTROPY_ENABLED=true (orly launcher and the operator set \
both).";

/// The orly Nostr relay.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "orly",
    version,
    about = "orly: a Nostr relay (WebSocket and HTTP on one port)",
    after_help = NIP77_HELP
)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, env = env::LISTEN, default_value = "127.0.0.1")]
    pub listen: IpAddr,
    /// Port to listen on.
    #[arg(long, env = env::PORT, default_value_t = orly_consts::Service::Relay.default_port())]
    pub port: u16,
    /// Log level or filter directive (e.g. info, debug, info,orly=trace).
    #[arg(long, env = env::LOG_LEVEL, default_value = "info")]
    pub log_level: String,

    /// Where events live: sqlite (embedded), postgres, or grpc (the orly-db service).
    #[arg(long, env = env::DB_TYPE, default_value = "sqlite")]
    pub db_type: StoreKind,
    /// Data directory holding the SQLite file (orly.db).
    #[arg(long, env = env::DATA_DIR, default_value_os_t = orly_db::config::default_data_dir())]
    pub data_dir: PathBuf,
    /// PostgreSQL URL for --db-type postgres.
    #[arg(long, env = env::DB_URL)]
    pub db_url: Option<String>,
    /// orly-db address for --db-type grpc; ORLY's name ORLY_GRPC_SERVER is read when this
    /// is unset [default: 127.0.0.1:50051].
    #[arg(long, env = env::GRPC_DB_SERVER)]
    pub grpc_db_server: Option<String>,
    /// Deadline of one call to orly-db over gRPC.
    #[arg(long, env = "ORLY_GRPC_DB_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub grpc_db_timeout: Duration,
    /// Connections of the SQL store: the SQLite read pool (stored queries run concurrently up
    /// to this many) or the PostgreSQL pool.
    #[arg(long, env = env::DB_MAX_CONNECTIONS, default_value_t = orly_db::sqlite::DEFAULT_READ_CONNECTIONS)]
    pub db_max_connections: u32,

    /// Where access control runs: local (in this process) or grpc (the orly-acl service).
    #[arg(long, env = env::ACL_TYPE, value_enum, default_value_t = AclType::Local)]
    pub acl_type: AclType,
    /// orly-acl address for --acl-type grpc.
    #[arg(long, env = env::GRPC_ACL_SERVER, default_value = orly_consts::ACL_LISTEN)]
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

    /// Answer NIP-77 (NEG-OPEN / NEG-MSG / NEG-CLOSE) and list NIP 77 in NIP-11 [default: true
    /// with --sync-type local; with grpc only when set to true].
    #[arg(long, env = "ORLY_NEGENTROPY_ENABLED", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub negentropy_enabled: Option<bool>,
    /// Where the sync subsystems run: local (in this process) or grpc (their services).
    #[arg(long, env = env::SYNC_TYPE, value_enum, default_value_t = SyncType::Local)]
    pub sync_type: SyncType,
    /// orly-sync-negentropy address(es) for --sync-type grpc; several comma-separated addresses
    /// are replicas: new sessions are spread over them and each stays on its replica.
    #[arg(
        long,
        env = "ORLY_GRPC_SYNC_NEGENTROPY",
        default_value = orly_consts::SYNC_NEGENTROPY_LISTEN
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
    /// Most NIP-77 sessions open at once; more get NEG-ERR "blocked: …" (local sync; 0: no cap).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_MAX_SESSIONS", default_value_t = orly_sync_negentropy::config::DEFAULT_MAX_SESSIONS)]
    pub negentropy_max_sessions: usize,
    /// Most events held by all open NIP-77 sessions together (local sync; 0: no cap).
    #[arg(long, env = "ORLY_SYNC_NEGENTROPY_MAX_TOTAL_RECORDS", default_value_t = orly_sync_negentropy::config::DEFAULT_MAX_TOTAL_RECORDS)]
    pub negentropy_max_total_records: usize,
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
    /// peers or relay group admins the distributed sync runs in-process. The service's name
    /// ORLY_SYNC_DISTRIBUTED_PEERS is read first; this is ORLY's relay-level name.
    #[arg(long, env = "ORLY_RELAY_PEERS", default_value = "")]
    pub relay_peers: String,
    /// Distributed sync peers under the service's name (local sync); wins over
    /// ORLY_RELAY_PEERS when both are set.
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_PEERS")]
    pub sync_distributed_peers: Option<String>,
    /// Time between distributed pulls from each peer (local sync).
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub distributed_interval: Duration,
    /// How long a distributed pull waits at the peer for a new event (local sync; at most 25s,
    /// 0: poll every interval).
    #[arg(long, env = "ORLY_SYNC_DISTRIBUTED_LONG_POLL", default_value = "25s", value_parser = parse_duration)]
    pub distributed_long_poll: Duration,
    /// Who may publish cluster membership (kind 39108), npub or hex (local sync); the
    /// service's name ORLY_SYNC_CLUSTER_ADMINS is read first, then this, then ORLY_ADMINS, as
    /// ORLY does. With admins the cluster sync runs in-process.
    #[arg(long, env = "ORLY_CLUSTER_ADMINS")]
    pub cluster_admins: Option<String>,
    /// Cluster admins under the service's name (local sync); wins over ORLY_CLUSTER_ADMINS.
    #[arg(long, env = "ORLY_SYNC_CLUSTER_ADMINS")]
    pub sync_cluster_admins: Option<String>,
    /// Replicate privileged events (DMs, gift wraps, …) between cluster members (local sync)
    /// [default: true]; the service's name ORLY_SYNC_CLUSTER_PROPAGATE_PRIVILEGED wins.
    #[arg(long = "cluster-propagate-privileged", env = "ORLY_CLUSTER_PROPAGATE_PRIVILEGED_EVENTS", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub cluster_propagate_privileged_events: Option<bool>,
    /// Whether to replicate privileged events, under the service's name (local sync).
    #[arg(long, env = "ORLY_SYNC_CLUSTER_PROPAGATE_PRIVILEGED", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub sync_cluster_propagate_privileged: Option<bool>,
    /// Pause after a failed cluster poll (local sync).
    #[arg(long, env = "ORLY_SYNC_CLUSTER_POLL_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub cluster_poll_interval: Duration,
    /// Who may publish relay group configs (kinds 39105 and 10008), npub or hex (local sync);
    /// the service's name ORLY_SYNC_RELAYGROUP_ADMINS is read first.
    #[arg(long, env = "ORLY_RELAY_GROUP_ADMINS", default_value = "")]
    pub relay_group_admins: String,
    /// Relay group admins under the service's name (local sync); wins over
    /// ORLY_RELAY_GROUP_ADMINS.
    #[arg(long, env = "ORLY_SYNC_RELAYGROUP_ADMINS")]
    pub sync_relaygroup_admins: Option<String>,
    /// Reverse proxies and ingresses (comma-separated CIDRs or addresses, e.g.
    /// "10.0.0.0/8,127.0.0.1"): only from these are `Forwarded` / `X-Forwarded-For` read, taking
    /// the right-most address that is not a trusted proxy. Empty: the TCP peer is the client.
    #[arg(long, env = "ORLY_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    /// Which header the trusted proxies' chain is read from: `auto` (`Forwarded` when present,
    /// else `X-Forwarded-For`), `forwarded` or `x-forwarded-for`. Behind a proxy that writes
    /// only `X-Forwarded-For` and passes a client's `Forwarded` through, `auto` would let the
    /// client name its address: choose the proxy's header.
    #[arg(long, env = "ORLY_TRUSTED_PROXY_HEADER", value_enum, default_value_t = crate::proxy::ProxyHeader::Auto)]
    pub trusted_proxy_header: crate::proxy::ProxyHeader,
    /// How often this process may purge expired (NIP-40) events; one process among those
    /// sharing the store does it at a time (a store lease).
    #[arg(long, env = "ORLY_PURGE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub purge_interval: Duration,

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
    /// Bytes queued for one connection (stored results, live events, NIP-77 replies) before
    /// it is closed as too slow a reader; stored results wait at half of it.
    #[arg(long, env = "ORLY_MAX_OUTBOUND_BYTES", default_value_t = 16 << 20)]
    pub max_outbound_bytes: usize,
    /// Bytes queued for every connection together; past it new REQs get `CLOSED
    /// "rate-limited: …"`, and a connection holding more than a sixteenth of its own budget
    /// (at least 64 KiB) is closed at its next live event.
    #[arg(long, env = "ORLY_MAX_OUTBOUND_BYTES_TOTAL", default_value_t = 1 << 30)]
    pub max_outbound_bytes_total: usize,
    /// Bytes of EVENTs one connection may have in flight (received, not yet answered), each
    /// counted as its JSON plus 512 B; past it the relay reads nothing more from that
    /// connection until OKs go out. Always room for one message of the largest size.
    #[arg(long, env = "ORLY_MAX_EVENT_BYTES_IN_FLIGHT", default_value_t = DEFAULT_EVENT_BYTES_IN_FLIGHT)]
    pub max_event_bytes_in_flight: usize,
    /// The same for every connection together: past it, connections wait their turn (their
    /// publishers are slowed by TCP) until the store catches up. Never less than one
    /// connection's.
    #[arg(long, env = "ORLY_MAX_EVENT_BYTES_IN_FLIGHT_TOTAL", default_value_t = DEFAULT_EVENT_BYTES_IN_FLIGHT_TOTAL)]
    pub max_event_bytes_in_flight_total: usize,
    /// How long one WebSocket send may take; a client that reads nothing for this long is
    /// closed and its queue freed.
    #[arg(long, env = "ORLY_WRITE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub write_timeout: Duration,
    /// Deadline of a REQ's stored part (query and sending); past it the REQ gets `CLOSED`.
    #[arg(long, env = "ORLY_QUERY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub query_timeout: Duration,
    /// Stored queries one connection runs at once; more REQs wait their turn.
    #[arg(long, env = "ORLY_MAX_CONCURRENT_REQS", default_value_t = 4)]
    pub max_concurrent_reqs: usize,
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
            .or_else(|| std::env::var(env::GRPC_SERVER).ok())
            .unwrap_or_else(|| orly_consts::DB_LISTEN.into());
        StoreConfig {
            kind: self.db_type,
            data_dir: self.data_dir.clone(),
            postgres_url: self.db_url.clone(),
            grpc_server,
            grpc_timeout: self.grpc_db_timeout,
            max_connections: self.db_max_connections,
        }
    }

    /// Whether the relay answers NIP-77: as set, else on in local sync mode.
    pub fn negentropy(&self) -> bool {
        self.negentropy_enabled
            .unwrap_or(self.sync_type == SyncType::Local)
    }

    /// The distributed sync peers (local sync): ORLY_SYNC_DISTRIBUTED_PEERS, else
    /// ORLY_RELAY_PEERS.
    pub fn distributed_peers(&self) -> &str {
        first_set(&[
            self.sync_distributed_peers.as_deref(),
            Some(&self.relay_peers),
        ])
    }

    /// Who may publish cluster membership (local sync): ORLY_SYNC_CLUSTER_ADMINS, else
    /// ORLY_CLUSTER_ADMINS, else ORLY_ADMINS.
    pub fn cluster_admin_list(&self) -> &str {
        first_set(&[
            self.sync_cluster_admins.as_deref(),
            self.cluster_admins.as_deref(),
            Some(&self.admins),
        ])
    }

    /// Whether the cluster replicates privileged events (local sync); true unless set.
    pub fn cluster_propagate_privileged(&self) -> bool {
        self.sync_cluster_propagate_privileged
            .or(self.cluster_propagate_privileged_events)
            .unwrap_or(true)
    }

    /// Who may publish relay group configs (local sync): ORLY_SYNC_RELAYGROUP_ADMINS, else
    /// ORLY_RELAY_GROUP_ADMINS.
    pub fn relay_group_admin_list(&self) -> &str {
        first_set(&[
            self.sync_relaygroup_admins.as_deref(),
            Some(&self.relay_group_admins),
        ])
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
            max_sessions: self.negentropy_max_sessions,
            max_total_records: self.negentropy_max_total_records,
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
            trusted_proxies: self
                .trusted_proxies
                .parse::<crate::proxy::TrustedProxies>()
                .map_err(|e| format!("ORLY_TRUSTED_PROXIES: {e}"))?
                .with_header(self.trusted_proxy_header),
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
                max_outbound_bytes: self.max_outbound_bytes,
                max_outbound_bytes_total: self.max_outbound_bytes_total,
                max_event_bytes_in_flight: self.max_event_bytes_in_flight,
                max_event_bytes_in_flight_total: self.max_event_bytes_in_flight_total,
                write_timeout: self.write_timeout,
                query_timeout: self.query_timeout,
                max_concurrent_reqs: self.max_concurrent_reqs.max(1),
                events_per_second: self.events_per_second,
                ping_interval: self.ping_interval,
            },
        })
    }
}

/// The first value that is set and not blank, else "".
fn first_set<'a>(values: &[Option<&'a str>]) -> &'a str {
    values
        .iter()
        .flatten()
        .copied()
        .find(|v| !v.trim().is_empty())
        .unwrap_or("")
}

/// The variables read by the relay's in-process NIP-77 engine and negentropy peer sync.
const LOCAL_NEGENTROPY_VARS: &[&str] = &[
    "ORLY_SYNC_NEGENTROPY_FRAME_SIZE",
    "ORLY_SYNC_NEGENTROPY_ID_SIZE",
    "ORLY_SYNC_NEGENTROPY_SESSION_TIMEOUT",
    "ORLY_SYNC_NEGENTROPY_MAX_RECORDS",
    "ORLY_SYNC_NEGENTROPY_MAX_SESSIONS",
    "ORLY_SYNC_NEGENTROPY_MAX_TOTAL_RECORDS",
    "ORLY_SYNC_NEGENTROPY_PEERS",
    "ORLY_SYNC_NEGENTROPY_INTERVAL",
];

/// The variables read by the relay's in-process distributed, cluster and relay group sync.
const LOCAL_PEER_SYNC_VARS: &[&str] = &[
    "ORLY_RELAY_PEERS",
    "ORLY_SYNC_DISTRIBUTED_PEERS",
    "ORLY_SYNC_DISTRIBUTED_INTERVAL",
    "ORLY_SYNC_DISTRIBUTED_LONG_POLL",
    "ORLY_CLUSTER_ADMINS",
    "ORLY_SYNC_CLUSTER_ADMINS",
    "ORLY_CLUSTER_PROPAGATE_PRIVILEGED_EVENTS",
    "ORLY_SYNC_CLUSTER_PROPAGATE_PRIVILEGED",
    "ORLY_SYNC_CLUSTER_POLL_INTERVAL",
    "ORLY_RELAY_GROUP_ADMINS",
    "ORLY_SYNC_RELAYGROUP_ADMINS",
];

/// The variables naming the sync services (`--sync-type grpc`).
const GRPC_SYNC_VARS: &[&str] = &[
    "ORLY_GRPC_SYNC_DISTRIBUTED",
    "ORLY_GRPC_SYNC_CLUSTER",
    "ORLY_GRPC_SYNC_RELAYGROUP",
    "ORLY_GRPC_SYNC_NEGENTROPY",
    "ORLY_GRPC_SYNC_TIMEOUT",
];

/// The variables that are set (`is_set(name)`) but have no effect with `cli`'s modes, in a
/// stable order, so the relay can name them at start-up instead of silently doing nothing.
/// A variable shadowed by another name of the same setting counts too (ORLY_RELAY_PEERS
/// when ORLY_SYNC_DISTRIBUTED_PEERS is set).
pub fn ignored_variables(cli: &Cli, is_set: impl Fn(&str) -> bool) -> Vec<&'static str> {
    let mut ignored: Vec<&'static str> = Vec::new();
    let mut when = |cond: bool, names: &[&'static str]| {
        if cond {
            ignored.extend(names.iter().copied().filter(|n| is_set(n)));
        }
    };
    let db = cli.db_type;
    when(db != StoreKind::Postgres, &[env::DB_URL]);
    when(db != StoreKind::Sqlite, &[env::DATA_DIR]);
    when(
        db != StoreKind::Grpc,
        &[
            env::GRPC_DB_SERVER,
            env::GRPC_SERVER,
            "ORLY_GRPC_DB_TIMEOUT",
        ],
    );
    when(db == StoreKind::Grpc, &[env::DB_MAX_CONNECTIONS]);
    let acl_grpc = cli.acl_type == AclType::Grpc;
    when(!acl_grpc, &[env::GRPC_ACL_SERVER, "ORLY_GRPC_ACL_TIMEOUT"]);
    // The service re-reads its own lists; the relay's refresh interval is then unused.
    when(acl_grpc, &["ORLY_FOLLOW_LIST_FREQUENCY"]);
    match cli.sync_type {
        SyncType::Local => {
            when(true, GRPC_SYNC_VARS);
            when(!cli.negentropy(), LOCAL_NEGENTROPY_VARS);
        }
        SyncType::Grpc => {
            when(true, LOCAL_NEGENTROPY_VARS);
            when(true, LOCAL_PEER_SYNC_VARS);
            when(!cli.negentropy(), &["ORLY_GRPC_SYNC_NEGENTROPY"]);
        }
    }
    if cli.sync_type == SyncType::Local {
        // Shadowed: the service's name of the same setting wins.
        let shadowed = [
            ("ORLY_SYNC_DISTRIBUTED_PEERS", "ORLY_RELAY_PEERS"),
            ("ORLY_SYNC_CLUSTER_ADMINS", "ORLY_CLUSTER_ADMINS"),
            (
                "ORLY_SYNC_CLUSTER_PROPAGATE_PRIVILEGED",
                "ORLY_CLUSTER_PROPAGATE_PRIVILEGED_EVENTS",
            ),
            ("ORLY_SYNC_RELAYGROUP_ADMINS", "ORLY_RELAY_GROUP_ADMINS"),
        ];
        for (wins, loses) in shadowed {
            when(is_set(wins), &[loses]);
        }
    }
    ignored.sort_unstable();
    ignored.dedup();
    ignored
}

/// Default of `ORLY_MAX_EVENT_BYTES_IN_FLIGHT`. Deep enough that a few pipelining publishers
/// fill the store's group commits: the SQLite writer's cost per event falls with the batch
/// size (each commit rewrites every index page it touched; at 128 KiB per connection eight
/// publishers gave batches of ~1,200 and ~24 KiB written per event, at 512 KiB ~14 KiB and
/// 15-20% less relay CPU per event, orly-bench, docs/benchmarks.md).
pub const DEFAULT_EVENT_BYTES_IN_FLIGHT: usize = 512 << 10;
/// Default of `ORLY_MAX_EVENT_BYTES_IN_FLIGHT_TOTAL`: with 50,000 connections the
/// per-connection bound alone would allow 25 GB.
pub const DEFAULT_EVENT_BYTES_IN_FLIGHT_TOTAL: usize = 64 << 20;
/// What an EVENT in flight counts beyond its JSON (the parsed event, its task).
pub const EVENT_OVERHEAD: usize = 512;

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
    pub max_outbound_bytes: usize,
    pub max_outbound_bytes_total: usize,
    pub max_event_bytes_in_flight: usize,
    pub max_event_bytes_in_flight_total: usize,
    pub write_timeout: Duration,
    pub query_timeout: Duration,
    pub max_concurrent_reqs: usize,
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
            max_outbound_bytes: 16 << 20,
            max_outbound_bytes_total: 1 << 30,
            max_event_bytes_in_flight: DEFAULT_EVENT_BYTES_IN_FLIGHT,
            max_event_bytes_in_flight_total: DEFAULT_EVENT_BYTES_IN_FLIGHT_TOTAL,
            write_timeout: Duration::from_secs(20),
            query_timeout: Duration::from_secs(30),
            max_concurrent_reqs: 4,
            events_per_second: 0,
            ping_interval: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// Byte permits of one connection's EVENTs in flight: the configured bound, at least room
    /// for one message of the largest size.
    pub fn event_budget(&self) -> u32 {
        let bytes = self
            .max_event_bytes_in_flight
            .max(self.max_message_size.saturating_add(EVENT_OVERHEAD));
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// Byte permits of every connection's EVENTs in flight together (never less than one
    /// connection's, so any EVENT can get in).
    pub fn event_budget_total(&self) -> usize {
        self.max_event_bytes_in_flight_total
            .max(self.event_budget() as usize)
            .min(tokio::sync::Semaphore::MAX_PERMITS)
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
    /// Proxies whose forwarding headers name the client ([`crate::proxy`]).
    pub trusted_proxies: crate::proxy::TrustedProxies,
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
            trusted_proxies: crate::proxy::TrustedProxies::none(),
            name: "orly".into(),
            description: "An orly Nostr relay".into(),
            contact: None,
            limits: Limits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration of `args` alone: the process environment is not read.
    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["orly"];
        all.extend_from_slice(args);
        let cmd = <Cli as clap::CommandFactory>::command();
        // Without env lookups, so a variable of the test's own environment cannot leak in.
        let cmd = cmd.mut_args(|a| a.env(None::<&str>));
        let matches = cmd.try_get_matches_from(all).unwrap();
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap()
    }

    fn ignored(args: &[&str], set: &[&str]) -> Vec<&'static str> {
        ignored_variables(&cli(args), |n| set.contains(&n))
    }

    #[test]
    fn nip77_is_on_in_local_mode_unless_turned_off() {
        assert!(cli(&[]).negentropy());
        assert!(!cli(&["--negentropy-enabled", "false"]).negentropy());
        assert!(!cli(&["--negentropy-enabled", "0"]).negentropy());
        assert!(!cli(&["--sync-type", "grpc"]).negentropy());
        assert!(cli(&["--sync-type", "grpc", "--negentropy-enabled", "yes"]).negentropy());
    }

    #[test]
    fn the_services_names_come_first() {
        let c = cli(&["--relay-peers", "http://a"]);
        assert_eq!(c.distributed_peers(), "http://a");
        let c = cli(&[
            "--relay-peers",
            "http://a",
            "--sync-distributed-peers",
            "http://b",
        ]);
        assert_eq!(c.distributed_peers(), "http://b");
        let c = cli(&["--sync-distributed-peers", " ", "--relay-peers", "http://a"]);
        assert_eq!(c.distributed_peers(), "http://a");
        let c = cli(&["--admins", "x"]);
        assert_eq!(c.cluster_admin_list(), "x");
        let c = cli(&["--admins", "x", "--cluster-admins", "y"]);
        assert_eq!(c.cluster_admin_list(), "y");
        let c = cli(&["--cluster-admins", "y", "--sync-cluster-admins", "z"]);
        assert_eq!(c.cluster_admin_list(), "z");
        assert!(cli(&[]).cluster_propagate_privileged());
        let c = cli(&[
            "--cluster-propagate-privileged",
            "true",
            "--sync-cluster-propagate-privileged",
            "false",
        ]);
        assert!(!c.cluster_propagate_privileged());
        let c = cli(&["--sync-relaygroup-admins", "g", "--relay-group-admins", "h"]);
        assert_eq!(c.relay_group_admin_list(), "g");
        assert_eq!(cli(&["--acl-type", "grpc"]).acl_type, AclType::Grpc);
        assert!(<Cli as clap::CommandFactory>::command()
            .try_get_matches_from(["orly", "--acl-type", "remote"])
            .is_err());
    }

    #[test]
    fn the_trusted_proxies_header_is_chosen() {
        use crate::proxy::ProxyHeader;
        let header = |args: &[&str]| cli(args).relay_config().unwrap().trusted_proxies.header();
        assert_eq!(
            header(&["--trusted-proxies", "10.0.0.0/8"]),
            ProxyHeader::Auto
        );
        assert_eq!(
            header(&["--trusted-proxy-header", "x-forwarded-for"]),
            ProxyHeader::XForwardedFor
        );
        assert_eq!(
            header(&["--trusted-proxy-header", "forwarded"]),
            ProxyHeader::Forwarded
        );
        assert!(<Cli as clap::CommandFactory>::command()
            .try_get_matches_from(["orly", "--trusted-proxy-header", "x-real-ip"])
            .is_err());
    }

    #[test]
    fn nothing_set_nothing_ignored() {
        assert!(ignored(&[], &[]).is_empty());
        assert!(ignored(&["--db-type", "grpc", "--sync-type", "grpc"], &[]).is_empty());
    }

    #[test]
    fn storage_settings_of_another_backend_are_named() {
        let set = [
            "ORLY_DB_URL",
            "ORLY_DATA_DIR",
            "ORLY_GRPC_DB_SERVER",
            "ORLY_GRPC_SERVER",
        ];
        assert_eq!(
            ignored(&[], &set),
            vec!["ORLY_DB_URL", "ORLY_GRPC_DB_SERVER", "ORLY_GRPC_SERVER"]
        );
        assert_eq!(
            ignored(&["--db-type", "postgres"], &set),
            vec!["ORLY_DATA_DIR", "ORLY_GRPC_DB_SERVER", "ORLY_GRPC_SERVER"]
        );
        assert_eq!(
            ignored(&["--db-type", "grpc"], &set),
            vec!["ORLY_DATA_DIR", "ORLY_DB_URL"]
        );
        // The pool size is orly-db's over gRPC; the relay's own SQL stores use it.
        let pool = ["ORLY_DB_MAX_CONNECTIONS"];
        assert!(ignored(&[], &pool).is_empty());
        assert!(ignored(&["--db-type", "postgres"], &pool).is_empty());
        assert_eq!(ignored(&["--db-type", "grpc"], &pool), pool);
        assert_eq!(
            cli(&["--db-max-connections", "3"])
                .store_config()
                .max_connections,
            3
        );
    }

    #[test]
    fn acl_settings_of_the_other_placement_are_named() {
        let set = [
            "ORLY_GRPC_ACL_SERVER",
            "ORLY_GRPC_ACL_TIMEOUT",
            "ORLY_FOLLOW_LIST_FREQUENCY",
        ];
        assert_eq!(
            ignored(&[], &set),
            vec!["ORLY_GRPC_ACL_SERVER", "ORLY_GRPC_ACL_TIMEOUT"]
        );
        assert_eq!(
            ignored(&["--acl-type", "grpc"], &set),
            vec!["ORLY_FOLLOW_LIST_FREQUENCY"]
        );
    }

    #[test]
    fn sync_settings_of_the_other_placement_are_named() {
        let set = [
            "ORLY_GRPC_SYNC_DISTRIBUTED",
            "ORLY_GRPC_SYNC_NEGENTROPY",
            "ORLY_RELAY_PEERS",
            "ORLY_SYNC_NEGENTROPY_PEERS",
            "ORLY_CLUSTER_ADMINS",
        ];
        assert_eq!(
            ignored(&[], &set),
            vec!["ORLY_GRPC_SYNC_DISTRIBUTED", "ORLY_GRPC_SYNC_NEGENTROPY"]
        );
        assert_eq!(
            ignored(
                &["--sync-type", "grpc", "--negentropy-enabled", "true"],
                &set
            ),
            vec![
                "ORLY_CLUSTER_ADMINS",
                "ORLY_RELAY_PEERS",
                "ORLY_SYNC_NEGENTROPY_PEERS"
            ]
        );
        // Without NIP-77 the negentropy service's address is unused too.
        assert!(ignored(&["--sync-type", "grpc"], &set).contains(&"ORLY_GRPC_SYNC_NEGENTROPY"));
    }

    #[test]
    fn negentropy_settings_without_nip77_are_named() {
        let set = [
            "ORLY_SYNC_NEGENTROPY_PEERS",
            "ORLY_SYNC_NEGENTROPY_FRAME_SIZE",
        ];
        assert!(ignored(&[], &set).is_empty());
        assert_eq!(
            ignored(&["--negentropy-enabled", "false"], &set),
            vec![
                "ORLY_SYNC_NEGENTROPY_FRAME_SIZE",
                "ORLY_SYNC_NEGENTROPY_PEERS"
            ]
        );
    }

    #[test]
    fn a_name_shadowed_by_the_services_name_is_named() {
        let set = ["ORLY_SYNC_DISTRIBUTED_PEERS", "ORLY_RELAY_PEERS"];
        assert_eq!(ignored(&[], &set), vec!["ORLY_RELAY_PEERS"]);
        assert!(ignored(&[], &["ORLY_RELAY_PEERS"]).is_empty());
        let set = ["ORLY_SYNC_RELAYGROUP_ADMINS", "ORLY_RELAY_GROUP_ADMINS"];
        assert_eq!(ignored(&[], &set), vec!["ORLY_RELAY_GROUP_ADMINS"]);
    }
}
