//! NIP-98 HTTP authorization: `Authorization: Nostr <base64 kind-27235 event>` bound to the
//! request's full URL, method and — for every request with a body — the body (`payload` tag,
//! required), signed within ±60 s of now, and usable once ([`ReplayCache`]). Both base64
//! alphabets are accepted (NIP-98 uses the standard one, ORLY the URL-safe one).

use std::collections::{BTreeSet, HashMap};
use std::sync::LazyLock;

use base64::Engine;
use nostr::{Event, EventId, JsonUtil, Kind, PublicKey, Tag, TagKind};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// How far `created_at` may be from now.
pub const TIME_WINDOW_SECS: u64 = 60;
/// Authorizations the process-wide [`ReplayCache`] remembers at most (about 10 MB).
pub const REPLAY_CACHE_CAPACITY: usize = 100_000;

/// Why an authorization header was refused. Each message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nip98Error {
    #[error("missing Authorization header")]
    Missing,
    #[error("Authorization header is not \"Nostr <base64 event>\"")]
    Malformed,
    #[error("authorization event is not valid JSON: {0}")]
    BadEvent(String),
    #[error("authorization event must be kind 27235")]
    WrongKind,
    #[error("authorization event created_at is outside ±{TIME_WINDOW_SECS}s of now")]
    Expired,
    #[error("authorization event has more than one {0:?} tag")]
    DuplicateTag(&'static str),
    #[error("authorization u tag {got:?} does not match the request URL {want:?}")]
    WrongUrl { got: String, want: String },
    #[error("authorization method tag does not match {0}")]
    WrongMethod(String),
    #[error(
        "authorization event has no payload tag; a request with a body must carry one \
         (hex sha256 of the body)"
    )]
    MissingPayload,
    #[error("authorization payload tag does not match the body")]
    WrongPayload,
    #[error("authorization event has a bad id or signature")]
    BadSignature,
    #[error("authorization event {0} was used before; sign a new one for every request")]
    Replayed(String),
    #[error("too many recent authorizations to check for replays; try again in a minute")]
    ReplayCacheFull,
}

/// What the request looked like: the URL the client must have signed, its method and body.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequestInfo<'a> {
    pub url: &'a str,
    pub method: &'a str,
    pub body: &'a [u8],
}

/// A header that passed every check but the replay check: hand it to
/// [`ReplayCache::claim`] once the signer is known to be allowed, so that strangers' valid
/// signatures cannot fill the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "an authorization is usable once: claim it with ReplayCache::claim"]
pub struct Nip98Auth {
    pub signer: PublicKey,
    /// The authorization event's id: what a replay repeats.
    pub id: EventId,
    pub created_at: u64,
}

impl Nip98Auth {
    /// The last second [`verify`] accepts this authorization in.
    pub fn valid_until(&self) -> u64 {
        self.created_at.saturating_add(TIME_WINDOW_SECS)
    }
}

/// The full URL of a request as ORLY reconstructs it: scheme from `X-Forwarded-Proto`
/// (else `http`), the `Host` header, and the path with its query.
pub fn request_url(headers: &http::HeaderMap, uri: &http::Uri) -> String {
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "http".into());
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("{scheme}://{host}{path}")
}

/// Decodes base64 in either alphabet, padded or not.
fn decode_b64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim();
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

/// The content of the only `name` tag; two of them make the event ambiguous.
fn single_tag(event: &Event, name: &'static str) -> Result<Option<String>, Nip98Error> {
    let kind = TagKind::custom(name);
    let mut found = event.tags.iter().filter(|t| t.kind() == kind);
    let first = found.next();
    if found.next().is_some() {
        return Err(Nip98Error::DuplicateTag(name));
    }
    Ok(first.map(|t| t.content().unwrap_or_default().to_string()))
}

/// Checks an `Authorization` header value against a request at `now` (unix seconds): scheme,
/// base64 (either alphabet), kind 27235, ±60 s, one `u` tag equal to the URL, one `method`
/// tag, a `payload` tag equal to the body's sha256 (required when there is a body, checked
/// when present), then the id and signature. Replays are [`ReplayCache::claim`]'s business.
pub fn verify(
    header: Option<&str>,
    req: HttpRequestInfo<'_>,
    now: u64,
) -> Result<Nip98Auth, Nip98Error> {
    let header = header.map(str::trim).filter(|h| !h.is_empty());
    let Some(header) = header else {
        return Err(Nip98Error::Missing);
    };
    let (scheme, b64) = header.split_once(' ').ok_or(Nip98Error::Malformed)?;
    if !scheme.eq_ignore_ascii_case("nostr") {
        return Err(Nip98Error::Malformed);
    }
    let json = decode_b64(b64).ok_or(Nip98Error::Malformed)?;
    let json = String::from_utf8(json).map_err(|_| Nip98Error::Malformed)?;
    let event = Event::from_json(&json).map_err(|e| Nip98Error::BadEvent(e.to_string()))?;
    if event.kind != Kind::HttpAuth {
        return Err(Nip98Error::WrongKind);
    }
    let created_at = event.created_at.as_secs();
    if created_at.abs_diff(now) > TIME_WINDOW_SECS {
        return Err(Nip98Error::Expired);
    }
    let u = single_tag(&event, "u")?.unwrap_or_default();
    if u != req.url {
        return Err(Nip98Error::WrongUrl {
            got: u,
            want: req.url.to_string(),
        });
    }
    let method = single_tag(&event, "method")?.unwrap_or_default();
    if !method.eq_ignore_ascii_case(req.method) {
        return Err(Nip98Error::WrongMethod(req.method.to_string()));
    }
    match single_tag(&event, "payload")? {
        // NIP-98 lets servers require it; without it a body could be swapped under a
        // captured header.
        None if !req.body.is_empty() => return Err(Nip98Error::MissingPayload),
        None => {}
        Some(payload) => {
            let digest = hex::encode(Sha256::digest(req.body));
            if !payload.eq_ignore_ascii_case(&digest) {
                return Err(Nip98Error::WrongPayload);
            }
        }
    }
    event.verify().map_err(|_| Nip98Error::BadSignature)?;
    Ok(Nip98Auth {
        signer: event.pubkey,
        id: event.id,
        created_at,
    })
}

#[derive(Default)]
struct Seen {
    until: HashMap<EventId, u64>,
    /// The same entries ordered by expiry, so expired ones go first.
    by_expiry: BTreeSet<(u64, EventId)>,
}

/// The authorization events accepted recently, each kept until it could no longer pass
/// [`verify`] (`created_at` + 60 s): a header seen before is refused. Bounded: when full of
/// unexpired entries, new authorizations are refused (fail closed) rather than letting an
/// old one be forgotten and replayed. Per process: replicas do not share it.
pub struct ReplayCache {
    capacity: usize,
    seen: Mutex<Seen>,
}

impl std::fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

static GLOBAL: LazyLock<ReplayCache> = LazyLock::new(|| ReplayCache::new(REPLAY_CACHE_CAPACITY));

impl ReplayCache {
    /// A cache holding at most `capacity` unexpired authorizations (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            seen: Mutex::new(Seen::default()),
        }
    }

    /// The process-wide cache every NIP-98 endpoint of this process shares.
    pub fn global() -> &'static ReplayCache {
        &GLOBAL
    }

    /// Entries held (expired ones may linger until the next claim).
    pub fn len(&self) -> usize {
        self.seen.lock().until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Uses `auth` up at `now`: refused if it was claimed before, if it is no longer valid,
    /// or if the cache is full of unexpired authorizations.
    pub fn claim(&self, auth: &Nip98Auth, now: u64) -> Result<(), Nip98Error> {
        if auth.valid_until() < now || auth.created_at > now.saturating_add(TIME_WINDOW_SECS) {
            return Err(Nip98Error::Expired);
        }
        let mut seen = self.seen.lock();
        while let Some(&(until, id)) = seen.by_expiry.first() {
            if until >= now {
                break;
            }
            seen.by_expiry.pop_first();
            seen.until.remove(&id);
        }
        if seen.until.contains_key(&auth.id) {
            return Err(Nip98Error::Replayed(auth.id.to_hex()));
        }
        if seen.until.len() >= self.capacity {
            tracing::warn!(
                capacity = self.capacity,
                "NIP-98 replay cache full; refusing new authorizations"
            );
            return Err(Nip98Error::ReplayCacheFull);
        }
        let until = auth.valid_until();
        seen.until.insert(auth.id, until);
        seen.by_expiry.insert((until, auth.id));
        Ok(())
    }
}

/// [`verify`], then [`ReplayCache::claim`]: for callers that allow every valid signer.
pub fn verify_once(
    header: Option<&str>,
    req: HttpRequestInfo<'_>,
    now: u64,
    replay: &ReplayCache,
) -> Result<PublicKey, Nip98Error> {
    let auth = verify(header, req, now)?;
    replay.claim(&auth, now)?;
    Ok(auth.signer)
}

/// Builds a header value for a request (URL-safe base64, like ORLY), with a `payload` tag
/// when there is a body: for clients and tests. A random `nonce` tag makes every header
/// distinct: event ids are content hashes, so two identical requests signed in the same
/// second would otherwise share an id, and the second would be refused as a replay.
pub fn authorization_header(
    keys: &nostr::Keys,
    url: &str,
    method: &str,
    body: Option<&[u8]>,
    created_at: u64,
) -> String {
    use base64::engine::general_purpose::URL_SAFE;
    let tag = |name: &str, value: String| Tag::custom(TagKind::custom(name), [value]);
    let mut tags = vec![
        tag("u", url.to_string()),
        tag("method", method.to_ascii_uppercase()),
    ];
    if let Some(body) = body {
        tags.push(tag("payload", hex::encode(Sha256::digest(body))));
    }
    tags.push(tag("nonce", format!("{:032x}", rand::random::<u128>())));
    let event = nostr::EventBuilder::new(Kind::HttpAuth, "")
        .tags(tags)
        .custom_created_at(nostr::Timestamp::from(created_at))
        .sign_with_keys(keys)
        .expect("signing with local keys");
    format!("Nostr {}", URL_SAFE.encode(event.as_json()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use nostr::{EventBuilder, Keys, Tag, Timestamp};

    const URL: &str = "http://relay.example/api/nip86";
    const NOW: u64 = 1_700_000_000;

    fn req(body: &[u8]) -> HttpRequestInfo<'_> {
        HttpRequestInfo {
            url: URL,
            method: "POST",
            body,
        }
    }

    /// A header from `tags`, standard base64.
    fn header_with(keys: &Keys, tags: &[&[&str]], at: u64) -> String {
        let event = EventBuilder::new(Kind::HttpAuth, "")
            .tags(tags.iter().map(|t| Tag::parse(t.iter().copied()).unwrap()))
            .custom_created_at(Timestamp::from(at))
            .sign_with_keys(keys)
            .unwrap();
        format!("Nostr {}", STANDARD.encode(event.as_json()))
    }

    #[test]
    fn a_good_header_names_its_signer_in_both_alphabets() {
        let keys = Keys::generate();
        let body = br#"{"method":"supportedmethods","params":[]}"#;
        let h = authorization_header(&keys, URL, "post", Some(body), NOW);
        let auth = verify(Some(&h), req(body), NOW + 30).unwrap();
        assert_eq!(auth.signer, keys.public_key());
        assert_eq!(auth.created_at, NOW);
        // The standard alphabet; no body needs no payload tag.
        let h = header_with(&keys, &[&["u", URL], &["method", "POST"]], NOW);
        assert_eq!(
            verify(Some(&h), req(b""), NOW).unwrap().signer,
            keys.public_key()
        );
    }

    #[test]
    fn every_mismatch_is_refused() {
        let keys = Keys::generate();
        let body = b"{}";
        let good = authorization_header(&keys, URL, "POST", Some(body), NOW);
        assert_eq!(verify(None, req(body), NOW), Err(Nip98Error::Missing));
        assert_eq!(
            verify(Some("Bearer abc"), req(body), NOW),
            Err(Nip98Error::Malformed)
        );
        assert_eq!(
            verify(Some("Nostr !!!"), req(body), NOW),
            Err(Nip98Error::Malformed)
        );
        assert_eq!(
            verify(Some(&good), req(body), NOW + 61),
            Err(Nip98Error::Expired)
        );
        assert_eq!(
            verify(Some(&good), req(body), NOW - 61),
            Err(Nip98Error::Expired)
        );
        assert!(matches!(
            verify(
                Some(&good),
                HttpRequestInfo {
                    url: "http://other.example/api/nip86",
                    ..req(body)
                },
                NOW
            ),
            Err(Nip98Error::WrongUrl { .. })
        ));
        assert!(matches!(
            verify(
                Some(&good),
                HttpRequestInfo {
                    method: "GET",
                    ..req(body)
                },
                NOW
            ),
            Err(Nip98Error::WrongMethod(_))
        ));
        assert_eq!(
            verify(Some(&good), req(b"{ }"), NOW),
            Err(Nip98Error::WrongPayload)
        );
        // Another kind.
        let event = EventBuilder::text_note("x")
            .tags([
                Tag::parse(["u", URL]).unwrap(),
                Tag::parse(["method", "POST"]).unwrap(),
            ])
            .custom_created_at(Timestamp::from(NOW))
            .sign_with_keys(&keys)
            .unwrap();
        let h = format!("Nostr {}", STANDARD.encode(event.as_json()));
        assert_eq!(verify(Some(&h), req(b""), NOW), Err(Nip98Error::WrongKind));
        // A tampered event (id no longer matches).
        let json = STANDARD
            .encode(event.as_json().replace("\"kind\":1", "\"kind\":27235"))
            .to_string();
        assert_eq!(
            verify(Some(&format!("Nostr {json}")), req(b""), NOW),
            Err(Nip98Error::BadSignature)
        );
    }

    #[test]
    fn a_body_needs_a_matching_payload_tag() {
        let keys = Keys::generate();
        let body = br#"{"method":"banpubkey","params":["ab"]}"#;
        // Signed for the URL and method only: the body could be anything.
        let bare = header_with(&keys, &[&["u", URL], &["method", "POST"]], NOW);
        assert_eq!(
            verify(Some(&bare), req(body), NOW),
            Err(Nip98Error::MissingPayload)
        );
        let other = hex::encode(Sha256::digest(b"{}"));
        let wrong = header_with(
            &keys,
            &[&["u", URL], &["method", "POST"], &["payload", &other]],
            NOW,
        );
        assert_eq!(
            verify(Some(&wrong), req(body), NOW),
            Err(Nip98Error::WrongPayload)
        );
        let digest = hex::encode(Sha256::digest(body)).to_ascii_uppercase();
        let right = header_with(
            &keys,
            &[&["u", URL], &["method", "POST"], &["payload", &digest]],
            NOW,
        );
        assert_eq!(
            verify(Some(&right), req(body), NOW).unwrap().signer,
            keys.public_key()
        );
        // Two payload (or u, method) tags are ambiguous.
        let digest = hex::encode(Sha256::digest(body));
        let twice = header_with(
            &keys,
            &[
                &["u", URL],
                &["method", "POST"],
                &["payload", &digest],
                &["payload", &other],
            ],
            NOW,
        );
        assert_eq!(
            verify(Some(&twice), req(body), NOW),
            Err(Nip98Error::DuplicateTag("payload"))
        );
        let two_urls = header_with(
            &keys,
            &[&["u", URL], &["u", "http://x"], &["method", "POST"]],
            NOW,
        );
        assert_eq!(
            verify(Some(&two_urls), req(b""), NOW),
            Err(Nip98Error::DuplicateTag("u"))
        );
        // Every refusal says what is wrong.
        for e in [Nip98Error::MissingPayload, Nip98Error::WrongPayload] {
            assert!(e.to_string().contains("payload"), "{e}");
        }
    }

    #[test]
    fn an_authorization_is_usable_once() {
        let keys = Keys::generate();
        let cache = ReplayCache::new(10);
        let body = b"{}";
        let h = authorization_header(&keys, URL, "POST", Some(body), NOW);
        assert_eq!(
            verify_once(Some(&h), req(body), NOW, &cache),
            Ok(keys.public_key())
        );
        let again = verify_once(Some(&h), req(body), NOW + 5, &cache).unwrap_err();
        assert!(matches!(again, Nip98Error::Replayed(_)), "{again:?}");
        assert!(again.to_string().contains("used before"), "{again}");
        // The same request signed again (same second) is a new authorization.
        let h2 = authorization_header(&keys, URL, "POST", Some(body), NOW);
        assert_ne!(h, h2);
        assert_eq!(
            verify_once(Some(&h2), req(body), NOW, &cache),
            Ok(keys.public_key())
        );
        // Entries go once they could not pass verify anyway.
        assert_eq!(cache.len(), 2);
        let late = authorization_header(&keys, URL, "POST", Some(body), NOW + 100);
        verify_once(Some(&late), req(body), NOW + 100, &cache).unwrap();
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_full_replay_cache_refuses_instead_of_forgetting() {
        let keys = Keys::generate();
        let cache = ReplayCache::new(2);
        let auth = |at: u64| {
            verify(
                Some(&authorization_header(&keys, URL, "GET", None, at)),
                HttpRequestInfo {
                    url: URL,
                    method: "GET",
                    body: b"",
                },
                at,
            )
            .unwrap()
        };
        let (a, b, c) = (auth(NOW), auth(NOW), auth(NOW));
        cache.claim(&a, NOW).unwrap();
        cache.claim(&b, NOW).unwrap();
        assert_eq!(cache.claim(&c, NOW), Err(Nip98Error::ReplayCacheFull));
        // The remembered ones are still refused, and room comes back as they expire.
        assert!(matches!(cache.claim(&a, NOW), Err(Nip98Error::Replayed(_))));
        let d = auth(NOW + TIME_WINDOW_SECS + 1);
        cache.claim(&d, NOW + TIME_WINDOW_SECS + 1).unwrap();
        assert_eq!(cache.claim(&a, NOW + 200), Err(Nip98Error::Expired));
    }

    #[test]
    fn the_url_comes_from_forwarded_proto_host_and_path() {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, "relay.example".parse().unwrap());
        let uri: http::Uri = "/api/nip86?x=1".parse().unwrap();
        assert_eq!(
            request_url(&headers, &uri),
            "http://relay.example/api/nip86?x=1"
        );
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(
            request_url(&headers, &uri),
            "https://relay.example/api/nip86?x=1"
        );
    }
}
