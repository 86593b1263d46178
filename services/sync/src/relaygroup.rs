//! Relay groups (orly-sync-relaygroup): an admin publishes the set of relays that sync with
//! each other as an event whose content is `{"relays":["<url>",…]}` — kind 39105 (addressable,
//! any `d`, as ORLY's docs say) or kind 10008 (replaceable, as ORLY's code does). The newest
//! valid config by an authorized publisher is authoritative (ties: the smaller
//! hex(sha256(id)), ORLY's rule, so mixed ORLY/orly groups agree); its relays feed the peer
//! lists of the distributed and negentropy sync.

use nostr::{Event, EventId, Filter, Kind, PublicKey};
use orly_db::SharedStore;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::SyncError;
use crate::http::normalize_http_url;

pub const KIND_RELAY_GROUP: u16 = 39105;
/// ORLY's code uses this kind for the same config.
pub const KIND_RELAY_GROUP_ORLY: u16 = 10008;
/// Most relays one config may list.
pub const MAX_RELAYS: usize = 1000;
/// Most recent configs considered when looking for the authoritative one.
const CANDIDATES: usize = 100;

pub fn is_relay_group_kind(kind: Kind) -> bool {
    let k = kind.as_u16();
    k == KIND_RELAY_GROUP || k == KIND_RELAY_GROUP_ORLY
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Content {
    relays: Vec<String>,
}

/// The relays of a config event (normalised http(s) URLs, duplicates dropped), or why its
/// content is bad.
pub fn parse_config(event: &Event) -> Result<Vec<String>, String> {
    let content: Content = serde_json::from_str(&event.content)
        .map_err(|e| format!("relay group content is not {{\"relays\":[…]}}: {e}"))?;
    if content.relays.len() > MAX_RELAYS {
        return Err(format!("relay group lists more than {MAX_RELAYS} relays"));
    }
    let mut relays: Vec<String> = Vec::new();
    for r in &content.relays {
        let r = normalize_http_url(r)?;
        if !relays.contains(&r) {
            relays.push(r);
        }
    }
    Ok(relays)
}

/// The authoritative config: its relays and the event it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthoritativeConfig {
    pub relays: Vec<String>,
    pub source_event_id: EventId,
    pub source_timestamp: i64,
}

/// ORLY's tie-break key: hex(sha256(id bytes)).
fn tie_key(id: &EventId) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// Relay group configs in one store.
#[derive(Clone)]
pub struct RelayGroup {
    store: SharedStore,
    admins: Vec<PublicKey>,
}

impl std::fmt::Debug for RelayGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayGroup")
            .field("admins", &self.admins.len())
            .finish()
    }
}

impl RelayGroup {
    pub fn new(store: SharedStore, admins: Vec<PublicKey>) -> Self {
        Self { store, admins }
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// May `pubkey` publish configs?
    pub fn is_authorized(&self, pubkey: &PublicKey) -> bool {
        self.admins.contains(pubkey)
    }

    pub fn authorized_pubkeys(&self) -> &[PublicKey] {
        &self.admins
    }

    /// ValidateRelayGroupEvent: `Err` only for a config kind by an authorized publisher whose
    /// signature or content is bad; anything else is not ours to judge.
    pub fn validate(&self, event: &Event) -> Result<(), String> {
        if !is_relay_group_kind(event.kind) || !self.is_authorized(&event.pubkey) {
            return Ok(());
        }
        if event.verify().is_err() {
            return Err("relay group config has a bad id or signature".into());
        }
        parse_config(event).map(|_| ())
    }

    /// FindAuthoritativeConfig: the newest valid config by an authorized publisher.
    pub async fn find_authoritative(&self) -> Result<Option<AuthoritativeConfig>, SyncError> {
        if self.admins.is_empty() {
            return Ok(None);
        }
        let filter = Filter::new()
            .kinds([
                Kind::from(KIND_RELAY_GROUP),
                Kind::from(KIND_RELAY_GROUP_ORLY),
            ])
            .authors(self.admins.clone())
            .limit(CANDIDATES);
        let events = self.store.query(&[filter]).await?;
        let best = events
            .iter()
            .filter_map(|e| parse_config(e).ok().map(|relays| (e, relays)))
            .min_by(|(a, _), (b, _)| {
                b.created_at
                    .cmp(&a.created_at)
                    .then_with(|| tie_key(&a.id).cmp(&tie_key(&b.id)))
            });
        Ok(best.map(|(e, relays)| AuthoritativeConfig {
            relays,
            source_event_id: e.id,
            source_timestamp: e.created_at.as_secs() as i64,
        }))
    }

    /// GetRelays: the authoritative config's relays (empty without one).
    pub async fn relays(&self) -> Result<Vec<String>, SyncError> {
        let relays = self
            .find_authoritative()
            .await?
            .map(|c| c.relays)
            .unwrap_or_default();
        metrics::gauge!("orly_sync_relaygroup_relays").set(relays.len() as f64);
        Ok(relays)
    }

    /// HandleRelayGroupEvent: a stored config; `Err(Invalid)` if it does not validate.
    pub async fn handle_event(&self, event: &Event) -> Result<(), SyncError> {
        if let Err(reason) = self.validate(event) {
            metrics::counter!("orly_sync_relaygroup_configs_total", "result" => "invalid")
                .increment(1);
            return Err(SyncError::Invalid(reason));
        }
        if is_relay_group_kind(event.kind) && self.is_authorized(&event.pubkey) {
            metrics::counter!("orly_sync_relaygroup_configs_total", "result" => "valid")
                .increment(1);
            tracing::info!(event_id = %event.id, "relay group config received");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, Keys, Tag, Timestamp};

    fn config(keys: &Keys, kind: u16, content: &str, at: u64) -> Event {
        EventBuilder::new(Kind::from(kind), content)
            .tags([Tag::identifier("g")])
            .custom_created_at(Timestamp::from(at))
            .sign_with_keys(keys)
            .unwrap()
    }

    #[tokio::test]
    async fn configs_are_validated_for_authorized_publishers_only() {
        let admin = Keys::generate();
        let other = Keys::generate();
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = std::sync::Arc::new(
            orly_db::sqlite::SqliteStore::open(&dir.path().join("t.db"))
                .await
                .unwrap(),
        );
        let group = RelayGroup::new(store, vec![admin.public_key()]);
        let good = config(
            &admin,
            KIND_RELAY_GROUP,
            r#"{"relays":["wss://a","https://b/"]}"#,
            1,
        );
        assert!(group.validate(&good).is_ok());
        assert_eq!(parse_config(&good).unwrap(), vec!["https://a", "https://b"]);
        for bad in [
            r#"{"relays":"x"}"#,
            "not json",
            r#"{"relays":["ftp://x"]}"#,
            r#"{"relays":[],"x":1}"#,
        ] {
            assert!(
                group
                    .validate(&config(&admin, KIND_RELAY_GROUP_ORLY, bad, 1))
                    .is_err(),
                "{bad}"
            );
            assert!(group
                .validate(&config(&other, KIND_RELAY_GROUP, bad, 1))
                .is_ok());
        }
        assert!(group.validate(&config(&admin, 1, "not json", 1)).is_ok());
    }

    #[tokio::test]
    async fn the_newest_valid_config_is_authoritative() {
        let admin = Keys::generate();
        let other = Keys::generate();
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = std::sync::Arc::new(
            orly_db::sqlite::SqliteStore::open(&dir.path().join("t.db"))
                .await
                .unwrap(),
        );
        let group = RelayGroup::new(store.clone(), vec![admin.public_key()]);
        assert_eq!(group.find_authoritative().await.unwrap(), None);
        let old = config(
            &admin,
            KIND_RELAY_GROUP_ORLY,
            r#"{"relays":["wss://old"]}"#,
            100,
        );
        let new = config(&admin, KIND_RELAY_GROUP, r#"{"relays":["wss://new"]}"#, 200);
        let foreign = config(
            &other,
            KIND_RELAY_GROUP,
            r#"{"relays":["wss://evil"]}"#,
            300,
        );
        for e in [&old, &new, &foreign] {
            store.save_event(e).await.unwrap();
        }
        let best = group.find_authoritative().await.unwrap().unwrap();
        assert_eq!(best.relays, vec!["https://new"]);
        assert_eq!(best.source_event_id, new.id);
        assert_eq!(best.source_timestamp, 200);
    }
}
