//! orly-acl: who may write to and read from the relay. One engine ([`AclEngine`]) holds the
//! modes `none`, `follows` and `managed` over an [`orly_db::EventStore`]; the relay uses it
//! in-process or, through [`GrpcAcl`], in the orly-acl service. [`nip86`] is the relay
//! management API (JSON-RPC over HTTP, NIP-98 authorized) on top of either.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use async_trait::async_trait;
use nostr::PublicKey;
use serde::{Deserialize, Serialize};

pub mod cli;
pub mod engine;
pub mod fuzz;
pub mod grpc_client;
pub mod grpc_server;
pub mod nip86;
pub mod nip98;
pub mod privileged;

pub use engine::{AclConfig, AclEngine};
pub use grpc_client::GrpcAcl;

/// Access control mode (`ORLY_ACL_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// An open relay: everyone may read and write.
    #[default]
    None,
    /// Admins and everyone their latest follow lists (kind 3) name may write.
    Follows,
    /// Allow and deny lists of pubkeys, events, kinds and IPs, kept in storage and
    /// administered over NIP-86.
    Managed,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Follows => "follows",
            Self::Managed => "managed",
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Ok(Self::None),
            "follows" => Ok(Self::Follows),
            "managed" => Ok(Self::Managed),
            other => Err(format!(
                "unknown ACL mode {other:?} (expected none, follows or managed)"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The access level of a pubkey (and address), ORLY's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// The address is blocked: nothing at all.
    Blocked,
    /// The pubkey is banned: nothing at all.
    Banned,
    /// Nothing (no identity while one is required).
    None,
    Read,
    /// Read and write.
    Write,
    /// Write, plus relay management over NIP-86.
    Admin,
    /// Everything an admin may, configured by `ORLY_OWNERS`.
    Owner,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::Banned => "banned",
            Self::None => "none",
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }

    /// Admin or owner: may use NIP-86 and is never refused by the lists.
    pub fn is_admin(self) -> bool {
        matches!(self, Self::Admin | Self::Owner)
    }

    pub fn can_write(self) -> bool {
        self >= Self::Write
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "blocked" => Self::Blocked,
            "banned" => Self::Banned,
            "none" => Self::None,
            "read" => Self::Read,
            "write" => Self::Write,
            "admin" => Self::Admin,
            "owner" => Self::Owner,
            other => return Err(format!("unknown access level {other:?}")),
        })
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the managed lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListKind {
    BannedPubkeys,
    AllowedPubkeys,
    BannedEvents,
    AllowedEvents,
    AllowedKinds,
    BlockedIps,
}

impl ListKind {
    pub const ALL: [ListKind; 6] = [
        Self::BannedPubkeys,
        Self::AllowedPubkeys,
        Self::BannedEvents,
        Self::AllowedEvents,
        Self::AllowedKinds,
        Self::BlockedIps,
    ];

    /// The storage marker prefix of this list; each entry is `<prefix><key>`.
    pub fn marker_prefix(self) -> &'static str {
        match self {
            Self::BannedPubkeys => "acl:banned_pubkey:",
            Self::AllowedPubkeys => "acl:allowed_pubkey:",
            Self::BannedEvents => "acl:banned_event:",
            Self::AllowedEvents => "acl:allowed_event:",
            Self::AllowedKinds => "acl:allowed_kind:",
            Self::BlockedIps => "acl:blocked_ip:",
        }
    }

    /// The list an entry leaves when it joins this one (a pubkey is banned or allowed, not
    /// both; likewise an event).
    pub fn opposite(self) -> Option<ListKind> {
        match self {
            Self::BannedPubkeys => Some(Self::AllowedPubkeys),
            Self::AllowedPubkeys => Some(Self::BannedPubkeys),
            Self::BannedEvents => Some(Self::AllowedEvents),
            Self::AllowedEvents => Some(Self::BannedEvents),
            Self::AllowedKinds | Self::BlockedIps => None,
        }
    }

    /// Checks and normalizes a key for this list: lowercase hex for pubkeys (npub accepted)
    /// and event ids, the canonical form of an IP address, a decimal kind.
    pub fn normalize_key(self, raw: &str) -> Result<String, AclError> {
        let raw = raw.trim();
        let bad = |what: &str| AclError::InvalidArgument(format!("{raw:?} is not a valid {what}"));
        match self {
            Self::BannedPubkeys | Self::AllowedPubkeys => orly_common::parse_pubkey(raw)
                .map(|p| p.to_hex())
                .map_err(|_| bad("pubkey")),
            Self::BannedEvents | Self::AllowedEvents => nostr::EventId::from_hex(raw)
                .map(|id| id.to_hex())
                .map_err(|_| bad("event id")),
            Self::AllowedKinds => raw
                .parse::<u16>()
                .map(|k| k.to_string())
                .map_err(|_| bad("kind")),
            Self::BlockedIps => raw
                .parse::<IpAddr>()
                .map(|ip| ip.to_string())
                .map_err(|_| bad("IP address")),
        }
    }
}

/// One entry of a managed list, as stored (JSON in the marker value) and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// The normalized key (hex pubkey, hex event id, kind number, IP).
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub reason: String,
    /// Unix seconds.
    #[serde(default)]
    pub added: i64,
}

/// Errors of ACL administration.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AclError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("access control unavailable: {0}")]
    Unavailable(String),
    #[error("configuration: {0}")]
    Config(String),
}

/// What NIP-86 needs from access control, in-process ([`AclEngine`]) or over gRPC
/// ([`GrpcAcl`]). Keys are checked and normalized with [`ListKind::normalize_key`].
#[async_trait]
pub trait AclAdmin: Send + Sync + 'static {
    /// The mode the lists are enforced in.
    async fn current_mode(&self) -> Result<Mode, AclError>;
    /// The access level of a pubkey (the address is not considered).
    async fn access_level(&self, pubkey: &PublicKey) -> Result<Level, AclError>;
    /// Adds (or updates) an entry; it leaves the opposite list.
    async fn list_add(&self, list: ListKind, key: &str, reason: &str) -> Result<(), AclError>;
    /// Removes an entry (absent is fine).
    async fn list_remove(&self, list: ListKind, key: &str) -> Result<(), AclError>;
    /// Every entry, sorted by key.
    async fn list(&self, list: ListKind) -> Result<Vec<ListEntry>, AclError>;
}
