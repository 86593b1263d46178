//! NIP-11 relay information document, listing exactly what this relay does.

use serde_json::{json, Value};

use crate::message::MAX_SUB_ID_LEN;
use crate::state::Relay;

/// NIPs implemented by the relay core.
pub const SUPPORTED_NIPS: &[u16] = &[1, 9, 11, 40, 42, 45, 70];
/// NIP-86 relay management, listed when the ACL runs mode managed.
pub const NIP86: u16 = 86;

pub async fn document(relay: &Relay) -> Value {
    let cfg = &relay.config;
    let l = &cfg.limits;
    let mode = relay.acl.mode();
    let mut nips = SUPPORTED_NIPS.to_vec();
    if relay.negentropy.is_some() {
        nips.push(77);
    }
    if mode == "managed" && relay.acl_admin.is_some() {
        nips.push(NIP86);
    }
    let mut doc = json!({
        "name": cfg.name,
        "description": cfg.description,
        "supported_nips": nips,
        "software": "https://github.com/orly-relay/orly",
        "version": env!("CARGO_PKG_VERSION"),
        "limitation": {
            "max_message_length": l.max_message_size,
            "max_subscriptions": l.max_subscriptions,
            "max_filters": l.max_filters,
            "max_limit": l.max_limit,
            "default_limit": l.default_limit,
            "max_subid_length": MAX_SUB_ID_LEN,
            "max_event_tags": l.max_event_tags,
            "created_at_upper_limit": l.created_at_future_limit.as_secs(),
            "min_pow_difficulty": 0,
            "auth_required": cfg.auth_required,
            "payment_required": false,
            // Writes need a condition met: a permitted key (every mode but none) or AUTH.
            "restricted_writes": mode != "none" || cfg.auth_required || cfg.auth_to_write,
        },
    });
    if let Some(pk) = relay.identity().await {
        doc["pubkey"] = json!(pk.to_hex());
    }
    if let Some(contact) = &cfg.contact {
        doc["contact"] = json!(contact);
    }
    doc
}
