//! Checks of a received event's id and signature, cheaper than nostr's own for the same
//! answer. Verification is the largest cost of an EVENT after the store's writes: nostr's
//! `verify_id` builds a `serde_json::Value` tree (a copy of every tag) before hashing, and
//! `verify_signature` parses the author's x-only key (a square root, ~4 µs of the ~36 µs a
//! verification takes on the 2-core benchmark machine) for every event. Here the id's
//! serialization goes into a reused buffer, and parsed keys are kept per author.

use std::cell::RefCell;
use std::collections::HashMap;

use nostr::hashes::sha256::Hash as Sha256Hash;
use nostr::hashes::Hash;
use nostr::secp256k1::{schnorr::Signature, Message, XOnlyPublicKey};
use nostr::Event;
use parking_lot::Mutex;

/// Shards of the key cache (by the key's first byte), so that verifying tasks on different
/// threads seldom wait for each other.
const SHARDS: usize = 16;
/// A serialization buffer larger than this is not kept for the next event.
const KEEP_BUFFER: usize = 64 << 10;

thread_local! {
    static SERIALIZED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether `event.id` is the SHA-256 of its NIP-01 serialization. The same bytes as
/// nostr's `verify_id` (the same `Serialize` impls, written to a buffer instead of a `Value`).
pub fn id_matches(event: &Event) -> bool {
    SERIALIZED.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        let fields = (
            0u8,
            &event.pubkey,
            event.created_at,
            event.kind,
            &event.tags,
            &event.content,
        );
        let ok = serde_json::to_writer(&mut *buf, &fields).is_ok()
            && Sha256Hash::hash(&buf).to_byte_array() == *event.id.as_bytes();
        if buf.capacity() > KEEP_BUFFER {
            *buf = Vec::new();
        }
        ok
    })
}

/// Verifies Schnorr signatures with the authors' parsed keys kept in a bounded cache.
pub struct Verifier {
    shards: Vec<Mutex<HashMap<[u8; 32], XOnlyPublicKey>>>,
    per_shard: usize,
}

impl Verifier {
    /// A verifier keeping the parsed keys of up to about `capacity` authors (a full shard is
    /// emptied and starts over: no bookkeeping per hit, and the bound always holds).
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    /// Whether `event.sig` is its author's signature of `event.id` (BIP-340).
    pub fn signature_ok(&self, event: &Event) -> bool {
        self.verify(event.pubkey.as_bytes(), event.id.to_bytes(), &event.sig)
    }

    /// Whether `sig` is `pubkey`'s signature of `digest` (BIP-340).
    pub fn verify(&self, pubkey: &[u8; 32], digest: [u8; 32], sig: &Signature) -> bool {
        self.key(pubkey).is_some_and(|key| {
            nostr::SECP256K1
                .verify_schnorr(sig, &Message::from_digest(digest), &key)
                .is_ok()
        })
    }

    fn key(&self, pubkey: &[u8; 32]) -> Option<XOnlyPublicKey> {
        let shard = &self.shards[usize::from(pubkey[0]) % SHARDS];
        if let Some(key) = shard.lock().get(pubkey) {
            return Some(*key);
        }
        // Parsed outside the lock; a key that is not on the curve is not kept.
        let key = XOnlyPublicKey::from_slice(pubkey).ok()?;
        let mut keys = shard.lock();
        if keys.len() >= self.per_shard {
            keys.clear();
        }
        keys.insert(*pubkey, key);
        Some(key)
    }

    /// Keys held now.
    pub fn cached(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, JsonUtil, Keys, Kind, Tag};
    use proptest::prelude::*;

    fn signed(keys: &Keys, content: &str, tags: Vec<Tag>) -> Event {
        EventBuilder::new(Kind::TextNote, content)
            .tags(tags)
            .sign_with_keys(keys)
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The streamed id is nostr's, for any content and tags (escapes, unicode, controls).
        #[test]
        fn id_matches_agrees_with_nostr(
            content in "\\PC{0,40}|[\\x00-\\x1f\"\\\\\u{2028}\u{7f}]{0,10}",
            values in proptest::collection::vec("\\PC{0,12}", 0..4),
        ) {
            let keys = Keys::generate();
            let tags = values.iter().map(|v| Tag::parse(["t", v.as_str()]).unwrap()).collect();
            let event = signed(&keys, &content, tags);
            prop_assert!(event.verify_id());
            prop_assert!(id_matches(&event));
            // Any other id fails both ways.
            let mut json: serde_json::Value = serde_json::from_str(&event.as_json()).unwrap();
            json["content"] = serde_json::Value::String(format!("{content}!"));
            let tampered = Event::from_json(json.to_string()).unwrap();
            prop_assert_eq!(id_matches(&tampered), tampered.verify_id());
            prop_assert!(!id_matches(&tampered));
        }
    }

    #[test]
    fn signatures_are_checked_with_cached_and_fresh_keys() {
        let verifier = Verifier::new(64);
        let keys = Keys::generate();
        let event = signed(&keys, "hello", vec![]);
        assert!(verifier.signature_ok(&event));
        assert_eq!(verifier.cached(), 1);
        // The cached key gives the same answers.
        assert!(verifier.signature_ok(&event));
        let other = signed(&keys, "other", vec![]);
        let mut json: serde_json::Value = serde_json::from_str(&event.as_json()).unwrap();
        json["sig"] = serde_json::Value::String(other.sig.to_string());
        let forged = Event::from_json(json.to_string()).unwrap();
        assert!(!verifier.signature_ok(&forged));
        // Another author's key does not verify this author's signature.
        let stranger = signed(&Keys::generate(), "hello", vec![]);
        let mut json: serde_json::Value = serde_json::from_str(&event.as_json()).unwrap();
        json["pubkey"] = serde_json::Value::String(stranger.pubkey.to_hex());
        let swapped = Event::from_json(json.to_string()).unwrap();
        assert!(!verifier.signature_ok(&swapped));
    }

    #[test]
    fn a_key_that_is_not_on_the_curve_fails_and_is_not_kept() {
        let verifier = Verifier::new(64);
        let keys = Keys::generate();
        let event = signed(&keys, "hello", vec![]);
        // Not a field element (larger than p).
        let bad = [0xff; 32];
        assert!(!verifier.verify(&bad, event.id.to_bytes(), &event.sig));
        assert_eq!(verifier.cached(), 0);
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let verifier = Verifier::new(32);
        for _ in 0..300 {
            let event = signed(&Keys::generate(), "x", vec![]);
            assert!(verifier.signature_ok(&event));
        }
        assert!(verifier.cached() <= 32, "{} keys held", verifier.cached());
    }
}
