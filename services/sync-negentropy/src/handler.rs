//! The NIP-77 face the relay calls: [`NegentropyHandler`], its reply [`NegReply`] and its error
//! [`NegError`], whose [`reason`](NegError::reason) is the NEG-ERR reason string.

use async_trait::async_trait;
use nostr::Filter;

/// What to send back for a NEG-OPEN or NEG-MSG: the relay hex-encodes `message` into
/// `["NEG-MSG", <subscription id>, <hex>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegReply {
    /// The negentropy message (starts with the protocol version byte).
    pub message: Vec<u8>,
    /// True when the reply holds no ranges, only the version byte: from our side every range
    /// matched (or, for an initial message of an unsupported version, the version we speak).
    /// The relay still sends the NEG-MSG; the client decides when reconciliation is over.
    pub complete: bool,
}

impl NegReply {
    pub(crate) fn new(message: Vec<u8>) -> Self {
        let complete = message.len() <= 1;
        Self { message, complete }
    }
}

/// Why a NEG-OPEN / NEG-MSG failed. The session it named (if any) is closed, as NIP-77 says a
/// NEG-ERR ends the subscription. [`NegError::reason`] is the NEG-ERR reason, prefix included.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegError {
    /// The request is refused by policy: the filter matches more records than the cap, or a
    /// message is larger than allowed.
    #[error("blocked: {0}")]
    Blocked(String),
    /// The session does not exist (never opened, closed, or timed out while idle).
    #[error("closed: {0}")]
    Closed(String),
    /// The request is malformed: not a negentropy message, a bad subscription id or filter.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Our side failed: storage or the negentropy service unreachable, an internal fault.
    #[error("error: {0}")]
    Internal(String),
}

impl NegError {
    /// The NEG-ERR reason string, e.g. `"closed: session timed out after 5m of inactivity"`.
    pub fn reason(&self) -> String {
        self.to_string()
    }

    /// Parses a reason string (as carried in the gRPC `error` field) back into an error; a
    /// string without a known prefix becomes [`NegError::Internal`].
    pub fn from_reason(reason: &str) -> Self {
        let (prefix, rest) = match reason.split_once(':') {
            Some((p, r)) => (p.trim(), r.trim_start().to_string()),
            None => ("", reason.to_string()),
        };
        match prefix {
            "blocked" => Self::Blocked(rest),
            "closed" => Self::Closed(rest),
            "invalid" => Self::Invalid(rest),
            "error" => Self::Internal(rest),
            _ => Self::Internal(reason.to_string()),
        }
    }

    /// The prefix alone (`blocked`, `closed`, `invalid`, `error`), for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Blocked(_) => "blocked",
            Self::Closed(_) => "closed",
            Self::Invalid(_) => "invalid",
            Self::Internal(_) => "error",
        }
    }
}

/// NIP-77 sessions as the relay sees them, keyed by (connection id, subscription id). The relay
/// holds an `Arc<dyn NegentropyHandler>`: the in-process [`NegentropyEngine`](crate::NegentropyEngine)
/// with `ORLY_SYNC_TYPE=local`, the [`GrpcNegentropy`](crate::GrpcNegentropy) client with `grpc`.
///
/// Messages are raw bytes: the relay hex-decodes NEG-OPEN / NEG-MSG payloads (answering
/// malformed hex itself with `NEG-ERR "invalid: …"`) and hex-encodes [`NegReply::message`].
/// Every error is meant for a NEG-ERR carrying the same subscription id; none is fatal to the
/// connection.
#[async_trait]
pub trait NegentropyHandler: Send + Sync + 'static {
    /// NEG-OPEN: builds the set for `filter` and answers `initial_message`. An open session with
    /// the same (connection, subscription) is replaced.
    async fn open(
        &self,
        connection_id: &str,
        subscription_id: &str,
        filter: &Filter,
        initial_message: &[u8],
    ) -> Result<NegReply, NegError>;

    /// NEG-MSG: the next round of an open session.
    async fn message(
        &self,
        connection_id: &str,
        subscription_id: &str,
        message: &[u8],
    ) -> Result<NegReply, NegError>;

    /// NEG-CLOSE: forgets the session (no reply; unknown sessions are ignored).
    async fn close(&self, connection_id: &str, subscription_id: &str);

    /// The connection went away: forgets all of its sessions.
    async fn close_connection(&self, connection_id: &str);
}

/// What a client learnt from a full reconciliation through a handler.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientOutcome {
    /// Ids the client has and the handler's set lacks.
    pub have: std::collections::BTreeSet<nostr::EventId>,
    /// Ids the handler's set has and the client lacks.
    pub need: std::collections::BTreeSet<nostr::EventId>,
    /// Replies received (NEG-OPEN's included).
    pub rounds: u32,
    /// Negentropy bytes sent and received by the client.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Plays a NIP-77 client against `handler`: NEG-OPEN with `items` (the client's set), NEG-MSG
/// until the client's negentropy instance is done, NEG-CLOSE. For tests, benchmarks and tools.
pub async fn reconcile_as_client(
    handler: &dyn NegentropyHandler,
    connection_id: &str,
    subscription_id: &str,
    filter: &Filter,
    items: &[(nostr::Timestamp, nostr::EventId)],
    frame_size: u64,
) -> Result<ClientOutcome, NegError> {
    let internal = |e: negentropy::Error| NegError::Internal(format!("client negentropy: {e}"));
    let storage = crate::set::build_storage(items).map_err(internal)?;
    let mut client = negentropy::Negentropy::owned(storage, frame_size).map_err(internal)?;
    let initial = client.initiate().map_err(internal)?;
    let mut out = ClientOutcome {
        bytes_sent: initial.len() as u64,
        ..ClientOutcome::default()
    };
    let mut reply = handler
        .open(connection_id, subscription_id, filter, &initial)
        .await?;
    let (mut have, mut need) = (Vec::new(), Vec::new());
    loop {
        out.rounds += 1;
        out.bytes_received += reply.message.len() as u64;
        match client
            .reconcile_with_ids(&reply.message, &mut have, &mut need)
            .map_err(internal)?
        {
            Some(next) => {
                out.bytes_sent += next.len() as u64;
                reply = handler
                    .message(connection_id, subscription_id, &next)
                    .await?;
            }
            None => break,
        }
    }
    handler.close(connection_id, subscription_id).await;
    let to_event = |id: negentropy::Id| nostr::EventId::from_byte_array(id.to_bytes());
    out.have = have.into_iter().map(to_event).collect();
    out.need = need.into_iter().map(to_event).collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_prefix() {
        for e in [
            NegError::Blocked("too many records".into()),
            NegError::Closed("session timed out".into()),
            NegError::Invalid("bad message: x".into()),
            NegError::Internal("store down".into()),
        ] {
            assert_eq!(NegError::from_reason(&e.reason()), e);
        }
        assert_eq!(
            NegError::from_reason("weird"),
            NegError::Internal("weird".into())
        );
        assert!(NegReply::new(vec![0x61]).complete);
        assert!(!NegReply::new(vec![0x61, 0]).complete);
    }
}
