//! The `OrlyRelay` custom resource (`orly.dev/v1alpha1`): spec, status, defaults and the
//! validation rules the API server enforces (schema ranges and enums plus CEL rules).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the custom resource.
pub const GROUP: &str = "orly.dev";
/// API version of the custom resource.
pub const VERSION: &str = "v1alpha1";
/// Default image repository; each binary is an image named after it under this repository.
pub const DEFAULT_REPOSITORY: &str = "ghcr.io/orly-relay";

/// The regular expression a duration setting must match (Go-style `30s`, `5m`, `1h30m`),
/// because the services parse their interval settings with humantime.
const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";
/// A relay URL as clients and peers use it (NIP-42's `relay` tag, peer sync's own URL).
const RELAY_URL_PATTERN: &str = r"^(wss?|https?)://[^\s/?#]+(/\S*)?$";
/// Key of the gRPC token in its Secret.
pub const GRPC_AUTH_TOKEN_KEY: &str = "token";
/// Seconds the relay's `preStop` drain leaves to the process after draining (SIGTERM, exit).
pub const DRAIN_MARGIN_SECONDS: i64 = 5;
/// One orly relay deployment: the database, ACL, sync services and the relay itself.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "orly.dev",
    version = "v1alpha1",
    kind = "OrlyRelay",
    namespaced,
    shortname = "orly",
    status = "OrlyRelayStatus",
    derive = "PartialEq",
    doc = "An orly Nostr relay: db, acl, the chosen sync services and the relay, rolled out tier by tier.",
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Relay", "type": "string", "jsonPath": ".status.relayReplicas"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("!self.relay.nip77 || self.sync.negentropy.enabled")
        .message("relay.nip77 requires sync.negentropy.enabled")
)]
#[serde(rename_all = "camelCase")]
pub struct OrlyRelaySpec {
    /// Where the images come from.
    #[serde(default)]
    pub images: ImagesSpec,
    /// Log level of every component (ORLY_LOG_LEVEL).
    #[serde(default)]
    pub log_level: LogLevel,
    /// The event store.
    #[serde(default)]
    pub database: DatabaseSpec,
    /// Access control.
    #[serde(default)]
    pub acl: AclSpec,
    /// The four sync services; each is off unless enabled.
    #[serde(default)]
    pub sync: SyncSpec,
    /// The relay (WebSocket + HTTP).
    #[serde(default)]
    pub relay: RelaySpec,
    /// Who may reach each component: one NetworkPolicy per component.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
    /// The token every gRPC call carries (ORLY_GRPC_AUTH_TOKEN on every component).
    #[serde(default)]
    pub grpc_auth: GrpcAuthSpec,
    /// mTLS between the components; plain gRPC (with the token) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_tls: Option<GrpcTlsSpec>,
}

/// The NetworkPolicies: each gRPC port open only to the components that call it, the relay's
/// port to everyone, the metrics port to `metricsFrom`. Egress is never restricted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create a NetworkPolicy per component.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Who may scrape the gRPC services' metrics port (9100). Unset: every pod of the
    /// namespace; an empty list: nobody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_from: Option<Vec<NetworkPolicyPeer>>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            metrics_from: None,
        }
    }
}

/// Where the gRPC token comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcAuthSpec {
    /// A Secret of yours holding the token. Unset: the operator creates `<relay>-grpc-auth`
    /// once (32 random bytes, hex) and never changes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub secret_name: Option<String>,
    /// Key of the token in that Secret.
    #[serde(default = "default_token_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

impl Default for GrpcAuthSpec {
    fn default() -> Self {
        Self {
            secret_name: None,
            key: default_token_key(),
        }
    }
}

/// The certificates of mTLS between the components.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcTlsSpec {
    /// A Secret with `tls.crt`, `tls.key` and `ca.crt` (a cert-manager Certificate's Secret
    /// fits), mounted in every component; the certificate must be valid for the names the
    /// components dial (`<relay>-<component>`).
    #[schemars(length(min = 1))]
    pub secret_name: String,
}

/// Image repository, tag and pull settings shared by every component.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImagesSpec {
    /// Repository holding one image per binary (`<repository>/orly-db:<tag>`, ...).
    /// Defaults to ghcr.io/orly-relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Image tag; defaults to the operator's own version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Image pull policy for every container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
    /// Names of Secrets used to pull the images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<String>,
}

/// Kubernetes image pull policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The value Kubernetes expects in `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Log level passed to every component.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The env var value.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Per-component image override.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageOverride {
    /// Repository for this component only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Tag for this component only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// Pod-level settings every component accepts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Image repository/tag override for this component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageOverride>,
    /// Container resource requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector for the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for the pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Extra environment variables; they win over the operator's settings of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

/// Storage backend of orly-db.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseType {
    /// One file on a PersistentVolumeClaim; one db replica.
    #[default]
    Sqlite,
    /// An external PostgreSQL; db is stateless and scalable.
    Postgres,
}

impl DatabaseType {
    /// The `ORLY_DB_TYPE` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DatabaseType::Sqlite => "sqlite",
            DatabaseType::Postgres => "postgres",
        }
    }
}

/// The orly-db service and its storage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.type != 'postgres' || has(self.postgres)")
        .message("postgres requires a URL secret: set database.postgres.urlSecret"),
    validation = Rule::new("self.type != 'sqlite' || self.replicas <= 1")
        .message("sqlite allows one db replica")
)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Backend: sqlite (default) or postgres.
    #[serde(default, rename = "type")]
    pub type_: DatabaseType,
    /// orly-db replicas; sqlite allows at most one.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// SQLite storage (used when type is sqlite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlite: Option<SqliteSpec>,
    /// PostgreSQL connection (required when type is postgres).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSpec>,
    #[serde(flatten)]
    pub pod: PodOverrides,
}

impl Default for DatabaseSpec {
    fn default() -> Self {
        Self {
            type_: DatabaseType::Sqlite,
            replicas: 1,
            sqlite: None,
            postgres: None,
            pod: PodOverrides::default(),
        }
    }
}

/// The PersistentVolumeClaim behind the SQLite file.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SqliteSpec {
    /// Size of the volume (a Kubernetes quantity).
    #[serde(default = "default_storage_size")]
    pub storage_size: String,
    /// Storage class of the volume; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for SqliteSpec {
    fn default() -> Self {
        Self {
            storage_size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// Where the PostgreSQL URL comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSpec {
    /// Secret key holding the connection URL (ORLY_DB_URL).
    pub url_secret: SecretKeyRef,
}

/// A key in a Secret of the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key in the Secret.
    #[serde(default = "default_url_key")]
    pub key: String,
}

/// ACL mode of orly-acl and the relay.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AclMode {
    /// Open relay.
    #[default]
    None,
    /// Writes allowed to the follows of admins.
    Follows,
    /// Access managed through NIP-86.
    Managed,
}

impl AclMode {
    /// The `ORLY_ACL_MODE` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AclMode::None => "none",
            AclMode::Follows => "follows",
            AclMode::Managed => "managed",
        }
    }
}

/// The orly-acl service; its state is in the store, so any number of replicas serve alike.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AclSpec {
    /// none, follows or managed.
    #[serde(default)]
    pub mode: AclMode,
    /// Admin pubkeys (npub or hex).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admins: Vec<String>,
    /// Owner pubkeys (npub or hex).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owners: Vec<String>,
    /// orly-acl replicas when not autoscaled; the relay balances over them.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Autoscale between min and max replicas on CPU; replaces `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    #[serde(flatten)]
    pub pod: PodOverrides,
}

impl Default for AclSpec {
    fn default() -> Self {
        Self {
            mode: AclMode::None,
            admins: Vec::new(),
            owners: Vec::new(),
            replicas: 1,
            autoscaling: None,
            pod: PodOverrides::default(),
        }
    }
}

/// Horizontal pod autoscaling of one component.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas")
        .message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas")
)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Lower bound of replicas.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub min_replicas: i32,
    /// Upper bound of replicas.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// Average CPU utilisation the autoscaler aims at, in percent of the request.
    #[serde(
        default = "default_cpu_target",
        rename = "targetCPUUtilizationPercentage"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: i32,
}

/// The four sync services.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SyncSpec {
    /// orly-sync-distributed: serial-based pull sync between peer relays.
    #[serde(default)]
    pub distributed: DistributedSyncSpec,
    /// orly-sync-cluster: real-time cluster replication.
    #[serde(default)]
    pub cluster: ClusterSyncSpec,
    /// orly-sync-relaygroup: relay group configuration.
    #[serde(default)]
    pub relaygroup: RelayGroupSyncSpec,
    /// orly-sync-negentropy: NIP-77 sessions and relay-to-relay negentropy.
    #[serde(default)]
    pub negentropy: NegentropySyncSpec,
}

/// Settings every sync service shares.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyncCommon {
    /// Run this service.
    #[serde(default)]
    pub enabled: bool,
    /// Replicas when not autoscaled.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Autoscale between min and max replicas on CPU; replaces `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    #[serde(flatten)]
    pub pod: PodOverrides,
}

impl Default for SyncCommon {
    fn default() -> Self {
        Self {
            enabled: false,
            replicas: 1,
            autoscaling: None,
            pod: PodOverrides::default(),
        }
    }
}

/// orly-sync-distributed settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DistributedSyncSpec {
    #[serde(flatten)]
    pub common: SyncCommon,
    /// Peer relay URLs (ORLY_SYNC_DISTRIBUTED_PEERS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Pull interval, e.g. 30s (ORLY_SYNC_DISTRIBUTED_INTERVAL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: Option<String>,
}

/// orly-sync-cluster settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSyncSpec {
    #[serde(flatten)]
    pub common: SyncCommon,
    /// Cluster admin pubkeys (ORLY_SYNC_CLUSTER_ADMINS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admins: Vec<String>,
    /// Propagate privileged events to members (ORLY_SYNC_CLUSTER_PROPAGATE_PRIVILEGED).
    #[serde(default = "yes")]
    pub propagate_privileged: bool,
    /// Membership poll interval (ORLY_SYNC_CLUSTER_POLL_INTERVAL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub poll_interval: Option<String>,
}

impl Default for ClusterSyncSpec {
    fn default() -> Self {
        Self {
            common: SyncCommon::default(),
            admins: Vec::new(),
            propagate_privileged: true,
            poll_interval: None,
        }
    }
}

/// orly-sync-relaygroup settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RelayGroupSyncSpec {
    #[serde(flatten)]
    pub common: SyncCommon,
    /// Relay group admin pubkeys (ORLY_SYNC_RELAYGROUP_ADMINS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admins: Vec<String>,
}

/// orly-sync-negentropy settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NegentropySyncSpec {
    #[serde(flatten)]
    pub common: SyncCommon,
    /// Peer relay URLs (ORLY_SYNC_NEGENTROPY_PEERS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Relay-to-relay sync interval (ORLY_SYNC_NEGENTROPY_INTERVAL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: Option<String>,
    /// Negentropy frame size limit in bytes (ORLY_SYNC_NEGENTROPY_FRAME_SIZE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 1048576))]
    pub frame_size: Option<i32>,
    /// Id prefix size in bytes (ORLY_SYNC_NEGENTROPY_ID_SIZE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8, max = 32))]
    pub id_size: Option<i32>,
    /// Idle NIP-77 session timeout (ORLY_SYNC_NEGENTROPY_SESSION_TIMEOUT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub session_timeout: Option<String>,
}

/// How the relay Service is exposed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    /// The Service `spec.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The relay (`orly`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RelaySpec {
    /// Relay replicas when not autoscaled; they share the store through orly-db, so SQLite
    /// serves several too.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Autoscale between min and max replicas on CPU; replaces `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// The relay's public URL (ORLY_RELAY_URL; the sync services' own URL): NIP-42's `relay`
    /// tag is checked against it. Unset with auth required: taken from the Host header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = RELAY_URL_PATTERN))]
    pub url: Option<String>,
    /// Seconds a relay pod has to stop; its preStop drain of the WebSockets gets all but 5.
    #[serde(default = "default_grace_period")]
    #[schemars(range(min = 6))]
    pub termination_grace_period_seconds: i64,
    /// WebSocket/HTTP port (ORLY_PORT).
    #[serde(default = "default_relay_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Type of the relay Service.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Serve NIP-77 negentropy to clients (ORLY_NEGENTROPY_ENABLED); needs sync.negentropy.
    #[serde(default)]
    pub nip77: bool,
    /// Require NIP-42 authentication (ORLY_AUTH_REQUIRED).
    #[serde(default)]
    pub auth_required: bool,
    #[serde(flatten)]
    pub pod: PodOverrides,
}

impl Default for RelaySpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            autoscaling: None,
            url: None,
            termination_grace_period_seconds: default_grace_period(),
            port: default_relay_port(),
            service_type: ServiceType::ClusterIP,
            nip77: false,
            auth_required: false,
            pod: PodOverrides::default(),
        }
    }
}

/// Overall state of an OrlyRelay.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Tiers are being rolled out.
    Progressing,
    /// Every component is available.
    Ready,
    /// A child could not be applied.
    Degraded,
    /// The spec cannot be reconciled (unparsable or inconsistent); fixed only by editing it.
    Invalid,
    /// The `orly.dev/reconcile-paused` annotation is "true": the operator changes nothing.
    Paused,
}

/// Observed state, written by the operator through the status subresource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OrlyRelayStatus {
    /// Progressing, Ready, Degraded or Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Per-component replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentStatus>,
    /// Number of tiers (db, services, relay) that are Available, in order.
    #[serde(default)]
    pub available_tiers: i32,
    /// Ready/desired relay replicas, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_replicas: Option<String>,
}

/// Replicas of one component.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// Component name (db, acl, sync-distributed, ..., relay).
    pub name: String,
    /// Ready replicas.
    pub ready_replicas: i32,
    /// Desired replicas.
    pub desired_replicas: i32,
    /// Available in the tier-gating sense.
    pub available: bool,
}

fn one() -> i32 {
    1
}
fn yes() -> bool {
    true
}
fn default_storage_size() -> String {
    "1Gi".to_string()
}
fn default_url_key() -> String {
    "url".to_string()
}
fn default_cpu_target() -> i32 {
    80
}
fn default_relay_port() -> i32 {
    3334
}
fn default_grace_period() -> i64 {
    30
}
fn default_token_key() -> String {
    GRPC_AUTH_TOKEN_KEY.to_string()
}

/// The CRD as YAML, exactly as `crdgen` prints it and `crds/orlyrelay.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&OrlyRelay::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in CRD must be what the types generate; regenerate with
    /// `cargo run -p orly-operator --bin crdgen > crds/orlyrelay.yaml`.
    #[test]
    fn checked_in_crd_matches_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/orlyrelay.yaml");
        let on_disk = std::fs::read_to_string(path).expect("crds/orlyrelay.yaml exists");
        let generated = crd_yaml().expect("CRD serializes");
        assert!(
            on_disk == generated,
            "crds/orlyrelay.yaml is stale: run `cargo run -p orly-operator --bin crdgen > crds/orlyrelay.yaml`"
        );
    }

    #[test]
    fn crd_names_and_scope() {
        let crd = OrlyRelay::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("orlyrelays.orly.dev"));
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "OrlyRelay");
        assert_eq!(crd.spec.names.short_names, Some(vec!["orly".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        assert!(version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Ready", "Phase", "Relay", "Age"]);
    }

    #[test]
    fn empty_spec_takes_defaults() {
        let spec: OrlyRelaySpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec.database.type_, DatabaseType::Sqlite);
        assert_eq!(spec.database.replicas, 1);
        assert_eq!(spec.relay.port, 3334);
        assert_eq!(spec.relay.replicas, 1);
        assert!(spec.sync.cluster.propagate_privileged);
        assert!(!spec.sync.negentropy.common.enabled);
        assert_eq!(spec.acl.replicas, 1);
        assert_eq!(spec.relay.termination_grace_period_seconds, 30);
        assert!(spec.network_policy.enabled);
        assert_eq!(spec.network_policy.metrics_from, None);
        assert_eq!(spec.grpc_auth.key, "token");
        assert_eq!(spec.grpc_auth.secret_name, None);
        assert_eq!(spec.grpc_tls, None);
        // A section given without the defaulted fields still gets them.
        let spec: OrlyRelaySpec =
            serde_json::from_str(r#"{"acl": {"mode": "follows"}, "networkPolicy": {}}"#).unwrap();
        assert_eq!(spec.acl.replicas, 1);
        assert!(spec.network_policy.enabled);
    }
}
