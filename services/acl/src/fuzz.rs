//! Entry points for fuzzers and property tests: [`nip98`] and [`nip86`] take arbitrary bytes,
//! run them through the same functions the relay uses, and panic only when a promise is
//! broken (a forged header accepted, a refusal without a clear reason, bad input that changed
//! the lists). [`MemoryAdmin`] is the in-memory [`AclAdmin`] they run NIP-86 against.
//! The cargo-fuzz targets in the repository's `fuzz/` directory are one-line wrappers.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use base64::Engine;
use nostr::{Keys, PublicKey, SecretKey};
use parking_lot::Mutex;
use serde_json::Value;

use crate::nip86::{self, Nip86Request, Nip86Response};
use crate::nip98::{self, HttpRequestInfo, Nip98Auth, Nip98Error, ReplayCache};
use crate::{AclAdmin, AclError, Level, ListEntry, ListKind, Mode};

/// The URL every fuzzed request is made to.
pub const URL: &str = "http://relay.example/api/nip86";
/// The fixed "now" of fuzzed requests (deterministic runs).
pub const NOW: u64 = 1_700_000_000;

/// The prefixes a NIP-86 `error` may start with (NIP-01's machine-readable prefixes).
pub const NIP01_PREFIXES: &[&str] = &[
    "duplicate:",
    "pow:",
    "blocked:",
    "rate-limited:",
    "invalid:",
    "restricted:",
    "mute:",
    "error:",
    "auth-required:",
];

/// The owner the fuzzed NIP-86 requests are signed by.
pub fn owner_keys() -> Keys {
    // A constant, valid secret key: runs are reproducible.
    let secret = SecretKey::from_slice(&[7u8; 32]).expect("a constant valid secret key");
    Keys::new(secret)
}

/// Panics unless a NIP-98 refusal explains itself.
pub fn assert_clear_refusal(e: &Nip98Error) {
    let msg = e.to_string();
    assert!(
        msg.to_ascii_lowercase().contains("authorization"),
        "NIP-98 refusal without a clear reason: {msg:?} ({e:?})"
    );
}

/// Panics unless `r` is an accepted header signed by `expected` or a clear refusal.
pub fn assert_verified_by(r: &Result<Nip98Auth, Nip98Error>, expected: Option<&PublicKey>) {
    match r {
        Ok(auth) => assert_eq!(
            Some(&auth.signer),
            expected,
            "a header nobody signed for this request was accepted"
        ),
        Err(e) => assert_clear_refusal(e),
    }
}

/// Panics unless a NIP-86 response is a result or an error with a NIP-01 prefix.
pub fn assert_well_formed(r: &Nip86Response) {
    let error = &r.body["error"];
    match error {
        Value::Null => assert_eq!(r.status, 200, "an answer without error must be 200: {r:?}"),
        Value::String(msg) => {
            assert!(
                NIP01_PREFIXES.iter().any(|p| msg.starts_with(p)),
                "NIP-86 error without a NIP-01 prefix: {msg:?}"
            );
            assert!(r.body["result"].is_null(), "an error with a result: {r:?}");
        }
        other => panic!("NIP-86 error is neither null nor a string: {other}"),
    }
}

/// Arbitrary bytes through the NIP-98 verifier: as a header line followed by a body, and as
/// the event JSON inside a well-formed header in both base64 alphabets. Nothing is accepted
/// (nobody signed these bytes for this request) and every refusal says why.
pub fn nip98(data: &[u8]) {
    let (head, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let header = String::from_utf8_lossy(head);
    let req = |body| HttpRequestInfo {
        url: URL,
        method: "POST",
        body,
    };
    assert_verified_by(&nip98::verify(Some(&header), req(body), NOW), None);
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    for encoded in [STANDARD.encode(data), URL_SAFE_NO_PAD.encode(data)] {
        let header = format!("Nostr {encoded}");
        assert_verified_by(&nip98::verify(Some(&header), req(b""), NOW), None);
    }
}

/// Arbitrary bytes as a NIP-86 body: straight into the JSON-RPC body handler, then through
/// the whole handler with a valid owner's header for exactly these bytes. Every answer is
/// well formed, a valid header is never refused, and a refused call changes no list.
pub fn nip86(data: &[u8]) {
    block_on(async {
        let keys = owner_keys();
        let admin = MemoryAdmin::managed(&[keys.public_key()]);
        let before = admin.snapshot();
        let r = nip86::dispatch(&admin, data).await;
        assert_well_formed(&r);
        if !r.body["error"].is_null() {
            assert_eq!(admin.snapshot(), before, "a refused call changed the lists");
        }

        let header = nip98::authorization_header(&keys, URL, "POST", Some(data), NOW);
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::HOST,
            http::HeaderValue::from_static("relay.example"),
        );
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(nip86::CONTENT_TYPE),
        );
        match http::HeaderValue::from_str(&header) {
            Ok(v) => headers.insert(http::header::AUTHORIZATION, v),
            Err(e) => panic!("a built header is not a valid header value: {e}"),
        };
        let uri = http::Uri::from_static("/api/nip86");
        let replay = ReplayCache::new(4);
        let req = Nip86Request {
            method: &http::Method::POST,
            uri: &uri,
            headers: &headers,
            body: data,
        };
        let before = admin.snapshot();
        let r = nip86::handle_with(&admin, req, NOW, &replay).await;
        assert_well_formed(&r);
        assert_ne!(r.status, 401, "a valid owner's header was refused: {r:?}");
        if !r.body["error"].is_null() {
            assert_eq!(admin.snapshot(), before, "a refused call changed the lists");
        }
        // The same header again is a replay.
        let again = nip86::handle_with(&admin, req, NOW, &replay).await;
        assert_eq!(
            again.status, 401,
            "a replayed header was accepted: {again:?}"
        );
        assert_well_formed(&again);
    });
}

/// Runs a future that needs no I/O (the [`MemoryAdmin`] never waits) to completion.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|rt| rt.block_on(f))
}

/// Managed lists in memory, with the engine's rules (a key is banned or allowed, not both;
/// keys normalized): what NIP-86 runs against in fuzzing and tests.
#[derive(Debug, Default)]
pub struct MemoryAdmin {
    mode: Mode,
    owners: HashSet<PublicKey>,
    lists: Mutex<BTreeMap<(u8, String), ListEntry>>,
}

fn list_index(list: ListKind) -> u8 {
    ListKind::ALL.iter().position(|l| *l == list).unwrap_or(0) as u8
}

impl MemoryAdmin {
    /// Mode `managed` with these owners.
    pub fn managed(owners: &[PublicKey]) -> Self {
        Self::with_mode(Mode::Managed, owners)
    }

    pub fn with_mode(mode: Mode, owners: &[PublicKey]) -> Self {
        Self {
            mode,
            owners: owners.iter().copied().collect(),
            lists: Mutex::new(BTreeMap::new()),
        }
    }

    /// Every entry of every list, for before/after comparisons.
    pub fn snapshot(&self) -> Vec<(ListKind, String, String)> {
        self.lists
            .lock()
            .iter()
            .map(|((l, k), e)| (ListKind::ALL[*l as usize], k.clone(), e.reason.clone()))
            .collect()
    }

    fn contains(&self, list: ListKind, key: &str) -> bool {
        self.lists
            .lock()
            .contains_key(&(list_index(list), key.to_string()))
    }
}

#[async_trait]
impl AclAdmin for MemoryAdmin {
    async fn current_mode(&self) -> Result<Mode, AclError> {
        Ok(self.mode)
    }

    async fn access_level(&self, pubkey: &PublicKey) -> Result<Level, AclError> {
        let hex = pubkey.to_hex();
        Ok(if self.owners.contains(pubkey) {
            Level::Owner
        } else if self.contains(ListKind::BannedPubkeys, &hex) {
            Level::Banned
        } else if self.contains(ListKind::AllowedPubkeys, &hex) {
            Level::Write
        } else {
            Level::Read
        })
    }

    async fn list_add(&self, list: ListKind, key: &str, reason: &str) -> Result<(), AclError> {
        let key = list.normalize_key(key)?;
        let mut lists = self.lists.lock();
        if let Some(opp) = list.opposite() {
            lists.remove(&(list_index(opp), key.clone()));
        }
        lists.insert(
            (list_index(list), key.clone()),
            ListEntry {
                key,
                reason: reason.to_string(),
                added: NOW as i64,
            },
        );
        Ok(())
    }

    async fn list_remove(&self, list: ListKind, key: &str) -> Result<(), AclError> {
        let key = list.normalize_key(key)?;
        self.lists.lock().remove(&(list_index(list), key));
        Ok(())
    }

    async fn list(&self, list: ListKind) -> Result<Vec<ListEntry>, AclError> {
        let i = list_index(list);
        Ok(self
            .lists
            .lock()
            .iter()
            .filter(|((l, _), _)| *l == i)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_points_take_any_bytes() {
        for data in [
            &b""[..],
            b"\n",
            b"Nostr \n{}",
            b"Nostr eyJ9\nbody",
            br#"{"method":"banpubkey","params":["00"]}"#,
            br#"{"method":"supportedmethods"}"#,
            br#"{"method":"allowkind","params":[1.5]}"#,
            &[0xff, 0xfe, 0x00, b'\n', 0x80],
        ] {
            nip98(data);
            nip86(data);
        }
    }

    #[test]
    fn a_good_call_through_the_entry_point_changes_the_lists() {
        let admin = MemoryAdmin::managed(&[owner_keys().public_key()]);
        let target = Keys::generate().public_key().to_hex();
        let body = format!(r#"{{"method":"banpubkey","params":["{target}","spam"]}}"#);
        let r = block_on(nip86::dispatch(&admin, body.as_bytes()));
        assert_eq!(r.body["result"], Value::Bool(true), "{r:?}");
        assert_eq!(
            admin.snapshot(),
            vec![(ListKind::BannedPubkeys, target, "spam".to_string())]
        );
    }
}
