//! The errors of the sync services.

use orly_db::StoreError;

/// Why a sync step or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The request or event is malformed or not allowed; nothing was changed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A peer could not be reached, timed out, or answered with an error status.
    #[error("error: peer {peer}: {reason}")]
    Peer { peer: String, reason: String },
    /// A peer answered something that breaks the protocol (bad JSON, ids outside the range,
    /// events that do not verify, oversized pages); nothing of it was stored.
    #[error("invalid: peer {peer} answered garbage: {reason}")]
    Garbage { peer: String, reason: String },
    /// Another replica works on the peer (its lease is held elsewhere).
    #[error("error: {0}")]
    Busy(String),
    /// This replica's lease on the peer lapsed or was taken: its work stopped, its writes were
    /// refused.
    #[error("error: {0}")]
    LeaseLost(#[from] orly_peering::LeaseLost),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sync service could not be reached over gRPC.
    #[error("sync service unavailable: {0}")]
    Unavailable(String),
}

impl SyncError {
    pub fn peer(peer: &str, reason: impl ToString) -> Self {
        Self::Peer {
            peer: peer.to_string(),
            reason: reason.to_string(),
        }
    }

    pub fn garbage(peer: &str, reason: impl ToString) -> Self {
        Self::Garbage {
            peer: peer.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl From<orly_peering::PeerError> for SyncError {
    fn from(e: orly_peering::PeerError) -> Self {
        match e {
            orly_peering::PeerError::Store(e) => Self::Store(e),
            orly_peering::PeerError::Lost(l) => Self::LeaseLost(l),
        }
    }
}

impl From<tonic::Status> for SyncError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::InvalidArgument => Self::Invalid(s.message().to_string()),
            _ => Self::Unavailable(format!("{}: {}", s.code(), s.message())),
        }
    }
}

impl From<SyncError> for tonic::Status {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Invalid(m) => tonic::Status::invalid_argument(m),
            SyncError::Store(e) => tonic::Status::unavailable(e.to_string()),
            e @ (SyncError::Busy(_) | SyncError::LeaseLost(_)) => {
                tonic::Status::aborted(e.to_string())
            }
            other => tonic::Status::unavailable(other.to_string()),
        }
    }
}
