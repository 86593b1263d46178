//! Settings of the session engine and of relay-to-relay sync, with the limits the negentropy
//! protocol puts on them. The binary fills them from `ORLY_SYNC_NEGENTROPY_*`.

use std::time::Duration;

use nostr::Filter;

/// Default `ORLY_SYNC_NEGENTROPY_FRAME_SIZE`: the largest negentropy message we send, in bytes.
pub const DEFAULT_FRAME_SIZE: u64 = 4096;
/// The smallest non-zero frame size the negentropy crate accepts (0 means no limit).
pub const MIN_FRAME_SIZE: u64 = 4096;
/// Event ids in negentropy protocol V1 (0x61) are always 32 bytes: id lists carry whole ids
/// and bounds carry at most 32-byte prefixes. Older drafts of NIP-77 let NEG-OPEN choose a
/// shorter id size (ORLY's default was 16); V1 removed that, so 32 is the only valid value.
pub const ID_SIZE: usize = negentropy::ID_SIZE;
/// Default `ORLY_SYNC_NEGENTROPY_SESSION_TIMEOUT`.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Default `ORLY_SYNC_NEGENTROPY_MAX_RECORDS`: the most events one session (or one peer sync)
/// may reconcile.
pub const DEFAULT_MAX_RECORDS: usize = 1_000_000;
/// Default `ORLY_SYNC_NEGENTROPY_MAX_SESSIONS`: NIP-77 sessions open at once in one process.
pub const DEFAULT_MAX_SESSIONS: usize = 1024;
/// Default `ORLY_SYNC_NEGENTROPY_MAX_TOTAL_RECORDS`: records held by all open sessions
/// together (about 40 bytes each: 400 MB).
pub const DEFAULT_MAX_TOTAL_RECORDS: usize = 10_000_000;
/// Largest negentropy message accepted from a client, in bytes (before hex: twice that). Clients
/// choose their own frame size (nostr-sdk uses 60,000), so this is far above ours.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 512 * 1024;
/// Default `ORLY_SYNC_NEGENTROPY_INTERVAL`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// Default `ORLY_SYNC_NEGENTROPY_RECENT`: windows reaching into this recent past are
/// reconciled with peers every pass.
pub const DEFAULT_WINDOW_RECENT: Duration = Duration::from_secs(3600);
/// Default `ORLY_SYNC_NEGENTROPY_RECHECK`: older windows are reconciled again this long after
/// their last reconciliation.
pub const DEFAULT_WINDOW_RECHECK: Duration = Duration::from_secs(6 * 3600);

/// How client sessions behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    /// Largest message we send (0: unlimited, else at least [`MIN_FRAME_SIZE`]).
    pub frame_size: u64,
    /// Id size in bytes; must be [`ID_SIZE`] (see there).
    pub id_size: usize,
    /// A session idle this long is closed; a later NEG-MSG gets `closed: …`.
    pub session_timeout: Duration,
    /// A filter matching more events than this is refused with `blocked: …` (0: no cap).
    pub max_records: usize,
    /// Largest negentropy message accepted (bytes, after hex decoding).
    pub max_message_bytes: usize,
    /// Sessions open (or opening) at once; a NEG-OPEN past it gets `blocked: …` (0: no cap).
    pub max_sessions: usize,
    /// Records held by all open sessions together; a NEG-OPEN whose set does not fit in what
    /// is left gets `blocked: …` (0: no cap).
    pub max_total_records: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            frame_size: DEFAULT_FRAME_SIZE,
            id_size: ID_SIZE,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            max_records: DEFAULT_MAX_RECORDS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_total_records: DEFAULT_MAX_TOTAL_RECORDS,
        }
    }
}

impl EngineSettings {
    /// Checks the settings against what the protocol allows.
    pub fn validate(&self) -> Result<(), String> {
        check_frame_size(self.frame_size)?;
        if self.id_size != ID_SIZE {
            return Err(format!(
                "id size {} is not supported: negentropy protocol V1 (0x61) uses {ID_SIZE}-byte ids",
                self.id_size
            ));
        }
        if self.session_timeout.is_zero() {
            return Err("session timeout must be positive".into());
        }
        if self.max_message_bytes == 0 {
            return Err("max message size must be positive".into());
        }
        Ok(())
    }
}

fn check_frame_size(frame_size: u64) -> Result<(), String> {
    if frame_size != 0 && frame_size < MIN_FRAME_SIZE {
        return Err(format!(
            "frame size {frame_size} is too small: use 0 (unlimited) or at least {MIN_FRAME_SIZE}"
        ));
    }
    Ok(())
}

/// How relay-to-relay sync behaves.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Time between sync passes over all peers.
    pub interval: Duration,
    /// Largest negentropy message we send to a peer.
    pub frame_size: u64,
    /// The most events reconciled with one peer at once (0: no cap): larger stores are synced
    /// in time windows of at most half of it on our side.
    pub max_records: usize,
    /// Windows reaching into this recent past are reconciled every pass.
    pub window_recent: Duration,
    /// Older windows are reconciled again this long after their last reconciliation.
    pub window_recheck: Duration,
    /// The events synced: `Filter::new()` is everything.
    pub filter: Filter,
    /// Event ids per `REQ` when downloading, and events per upload batch.
    pub batch_size: usize,
    /// Longest wait for any one answer from a peer (connect, NEG-MSG, EOSE, OK).
    pub peer_timeout: Duration,
    /// Lifetime of the per-peer lease (renewed while a sync runs).
    pub lease_ttl: Duration,
    /// Who holds leases: unique per replica.
    pub holder: String,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            frame_size: DEFAULT_FRAME_SIZE,
            max_records: DEFAULT_MAX_RECORDS,
            window_recent: DEFAULT_WINDOW_RECENT,
            window_recheck: DEFAULT_WINDOW_RECHECK,
            filter: Filter::new(),
            batch_size: 500,
            peer_timeout: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(120),
            holder: orly_peering::default_holder(),
        }
    }
}

impl SyncSettings {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        check_frame_size(self.frame_size)?;
        if self.interval.is_zero() {
            return Err("sync interval must be positive".into());
        }
        if self.batch_size == 0 || self.batch_size > orly_db::grpc_server::MAX_IDS_PER_REQUEST {
            return Err(format!(
                "batch size must be between 1 and {}",
                orly_db::grpc_server::MAX_IDS_PER_REQUEST
            ));
        }
        if self.max_records == 1 {
            return Err("max records must be 0 (no cap) or at least 2".into());
        }
        if self.lease_ttl < Duration::from_secs(3) {
            return Err("lease ttl must be at least 3s".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_limits_are_enforced() {
        assert!(EngineSettings::default().validate().is_ok());
        assert!(SyncSettings::default().validate().is_ok());
        let bad_frame = EngineSettings {
            frame_size: 1000,
            ..EngineSettings::default()
        };
        assert!(bad_frame.validate().unwrap_err().contains("too small"));
        let unlimited = EngineSettings {
            frame_size: 0,
            ..EngineSettings::default()
        };
        assert!(unlimited.validate().is_ok());
        let short_ids = EngineSettings {
            id_size: 16,
            ..EngineSettings::default()
        };
        assert!(short_ids.validate().unwrap_err().contains("32-byte"));
    }
}
