//! Property tests on stable Rust (issue 17, fuzzing): the NIP-98 header verifier and the
//! NIP-86 JSON-RPC handler take random and mutated input without panicking; a header is
//! accepted only when signed for exactly this request (URL, method, body) and only once;
//! every refusal carries a clear reason (NIP-98) or a NIP-01 prefix (NIP-86); refused calls
//! change nothing. Case counts are bounded so `cargo test` stays fast; docs/fuzzing.md says
//! how to run more, and how to run the cargo-fuzz targets over the same functions.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use nostr::{EventBuilder, JsonUtil, Keys, Kind, Tag, Timestamp};
use orly_acl::fuzz::{self, assert_verified_by, assert_well_formed, MemoryAdmin, NOW, URL};
use orly_acl::nip86::{self, Nip86Request};
use orly_acl::nip98::{self, HttpRequestInfo, Nip98Error, ReplayCache, TIME_WINDOW_SECS};
use proptest::prelude::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// `cases` per property, or `PROPTEST_CASES` when set (longer runs: docs/fuzzing.md).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        // Shrinking re-signs events: keep failures quick to report.
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    }
}

fn b64(alphabet: usize, data: &[u8]) -> String {
    match alphabet % 4 {
        0 => STANDARD.encode(data),
        1 => URL_SAFE.encode(data),
        2 => STANDARD_NO_PAD.encode(data),
        _ => URL_SAFE_NO_PAD.encode(data),
    }
}

fn post(body: &[u8]) -> HttpRequestInfo<'_> {
    HttpRequestInfo {
        url: URL,
        method: "POST",
        body,
    }
}

/// Any JSON value, a few levels deep, with strings that look like keys and ids now and then.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        any::<String>().prop_map(Value::String),
        "[0-9a-f]{64}".prop_map(Value::String),
        "(npub1)?[a-z0-9]{0,70}".prop_map(Value::String),
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Tags as a client might get them wrong: names NIP-98 reads, empty and odd values.
fn tags() -> impl Strategy<Value = Vec<Vec<String>>> {
    let name = prop_oneof![
        Just("u".to_string()),
        Just("method".to_string()),
        Just("payload".to_string()),
        Just("expiration".to_string()),
        any::<String>(),
    ];
    let tag = (name, prop::collection::vec(any::<String>(), 0..3)).prop_map(|(n, mut v)| {
        v.insert(0, n);
        v
    });
    prop::collection::vec(
        prop_oneof![tag, Just(Vec::new()), Just(vec!["u".into(), URL.into()])],
        0..6,
    )
}

/// An event-shaped JSON object with random field values (never validly signed).
fn event_json() -> impl Strategy<Value = Value> {
    (
        prop_oneof!["[0-9a-f]{64}", any::<String>()],
        prop_oneof!["[0-9a-f]{64}", any::<String>()],
        prop_oneof![
            (-(TIME_WINDOW_SECS as i64) * 2..(TIME_WINDOW_SECS as i64) * 2)
                .prop_map(|d| json!(NOW as i64 + d)),
            any::<i64>().prop_map(|v| json!(v)),
            json_value(),
        ],
        prop_oneof![
            Just(json!(27235)),
            any::<i64>().prop_map(|v| json!(v)),
            json_value()
        ],
        tags(),
        any::<String>(),
        prop_oneof!["[0-9a-f]{128}", any::<String>()],
    )
        .prop_map(|(id, pubkey, created_at, kind, tags, content, sig)| {
            json!({
                "id": id, "pubkey": pubkey, "created_at": created_at, "kind": kind,
                "tags": tags, "content": content, "sig": sig,
            })
        })
}

/// A genuinely signed header: URL, method, optional payload tag, at `NOW + offset`.
fn signed(keys: &Keys, method: &str, body: Option<&[u8]>, offset: i64) -> String {
    nip98::authorization_header(keys, URL, method, body, (NOW as i64 + offset) as u64)
}

/// The event JSON inside a header built by [`nip98::authorization_header`].
fn event_of(header: &str) -> String {
    let b64 = header.strip_prefix("Nostr ").unwrap();
    String::from_utf8(URL_SAFE.decode(b64).unwrap()).unwrap()
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(usize, char),
    Delete(usize, usize),
    Insert(usize, char),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<char>()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        (any::<usize>(), 1..16usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<usize>(), any::<char>()).prop_map(|(i, c)| Mutation::Insert(i, c)),
    ]
}

fn mutate(text: &str, m: &Mutation) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return text.to_string();
    }
    match *m {
        Mutation::Replace(i, c) => {
            let i = i % chars.len();
            chars[i] = c;
        }
        Mutation::Delete(i, n) => {
            let i = i % chars.len();
            let end = (i + n).min(chars.len());
            chars.drain(i..end);
        }
        Mutation::Insert(i, c) => chars.insert(i % (chars.len() + 1), c),
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_header_string_is_refused_with_a_reason(header in any::<String>(), body in any::<Vec<u8>>()) {
        assert_verified_by(&nip98::verify(Some(&header), post(&body), NOW), None);
        let prefixed = format!("Nostr {header}");
        assert_verified_by(&nip98::verify(Some(&prefixed), post(&body), NOW), None);
    }

    #[test]
    fn any_bytes_in_either_alphabet_are_refused_with_a_reason(
        data in any::<Vec<u8>>(),
        alphabet in 0..4usize,
        scheme in prop_oneof![Just("Nostr"), Just("nostr"), Just("NOSTR"), Just("Bearer")],
    ) {
        let header = format!("{scheme} {}", b64(alphabet, &data));
        assert_verified_by(&nip98::verify(Some(&header), post(b""), NOW), None);
    }

    #[test]
    fn event_shaped_json_is_refused_with_a_reason(event in event_json(), alphabet in 0..4usize) {
        let header = format!("Nostr {}", b64(alphabet, event.to_string().as_bytes()));
        assert_verified_by(&nip98::verify(Some(&header), post(b""), NOW), None);
    }

    #[test]
    fn the_fuzz_entry_point_for_nip98_takes_any_bytes(data in any::<Vec<u8>>()) {
        fuzz::nip98(&data);
    }

    #[test]
    fn nip86_bodies_of_any_shape_get_a_prefixed_answer_and_change_nothing_when_refused(
        body in prop_oneof![
            json_value().prop_map(|v| v.to_string().into_bytes()),
            (
                prop_oneof![
                    prop::sample::select(nip86::SUPPORTED_METHODS.to_vec()).prop_map(String::from),
                    any::<String>(),
                ],
                prop::collection::vec(json_value(), 0..4),
            )
                .prop_map(|(m, p)| json!({"method": m, "params": p}).to_string().into_bytes()),
            any::<Vec<u8>>(),
        ],
    ) {
        let admin = MemoryAdmin::managed(&[]);
        let before = admin.snapshot();
        let r = block_on(nip86::dispatch(&admin, &body));
        assert_well_formed(&r);
        if !r.body["error"].is_null() {
            prop_assert_eq!(admin.snapshot(), before);
        }
    }
}

proptest! {
    // Each case signs events: fewer of them.
    #![proptest_config(config(48))]

    #[test]
    fn a_header_signed_for_the_request_is_accepted_once(
        body in any::<Vec<u8>>(),
        method in prop_oneof![Just("POST"), Just("PUT"), Just("PATCH"), Just("DELETE")],
        offset in -(TIME_WINDOW_SECS as i64)..=(TIME_WINDOW_SECS as i64),
        alphabet in 0..4usize,
    ) {
        let keys = Keys::generate();
        // Re-encoded in any alphabet: the same authorization.
        let header = signed(&keys, method, Some(&body), offset);
        let header = format!("Nostr {}", b64(alphabet, event_of(&header).as_bytes()));
        let req = HttpRequestInfo { url: URL, method, body: &body };
        let replay = ReplayCache::new(8);
        prop_assert_eq!(nip98::verify_once(Some(&header), req, NOW, &replay), Ok(keys.public_key()));
        let again = nip98::verify_once(Some(&header), req, NOW, &replay);
        prop_assert!(matches!(again, Err(Nip98Error::Replayed(_))), "{:?}", again);
    }

    #[test]
    fn a_body_other_than_the_signed_one_is_refused(
        body in prop::collection::vec(any::<u8>(), 1..256),
        flip in any::<usize>(),
        bit in 0..8u8,
    ) {
        let keys = Keys::generate();
        let header = signed(&keys, "POST", Some(&body), 0);
        let mut other = body.clone();
        let i = flip % other.len();
        other[i] ^= 1 << bit;
        prop_assert_eq!(
            nip98::verify(Some(&header), post(&other), NOW),
            Err(Nip98Error::WrongPayload)
        );
        // Signed with no payload tag at all: a body is not covered.
        let bare = signed(&keys, "POST", None, 0);
        prop_assert_eq!(
            nip98::verify(Some(&bare), post(&body), NOW),
            Err(Nip98Error::MissingPayload)
        );
    }

    #[test]
    fn a_mutated_header_is_never_taken_for_someone_else(
        body in any::<Vec<u8>>(),
        mutations in prop::collection::vec(mutation(), 1..4),
        alphabet in 0..4usize,
    ) {
        let keys = Keys::generate();
        let mut json = event_of(&signed(&keys, "POST", Some(&body), 0));
        for m in &mutations {
            json = mutate(&json, m);
        }
        let header = format!("Nostr {}", b64(alphabet, json.as_bytes()));
        // Still accepted only if the mutation left the signed event intact (whitespace).
        assert_verified_by(
            &nip98::verify(Some(&header), post(&body), NOW),
            Some(&keys.public_key()),
        );
    }

    #[test]
    fn validly_signed_events_with_random_tags_are_refused_unless_they_fit(
        tags in tags(),
        offset in -200i64..200,
        body in any::<Vec<u8>>(),
    ) {
        let keys = Keys::generate();
        let event = EventBuilder::new(Kind::HttpAuth, "")
            .tags(tags.into_iter().filter_map(|t| Tag::parse(t).ok()))
            .custom_created_at(Timestamp::from((NOW as i64 + offset) as u64))
            .sign_with_keys(&keys)
            .unwrap();
        let header = format!("Nostr {}", STANDARD.encode(event.as_json()));
        let r = nip98::verify(Some(&header), post(&body), NOW);
        assert_verified_by(&r, Some(&keys.public_key()));
        if r.is_ok() {
            // Accepted: it really names this request.
            let has = |name: &str, value: &str| event.tags.iter().any(|t| {
                t.as_slice().first().map(String::as_str) == Some(name)
                    && t.content().is_some_and(|c| c.eq_ignore_ascii_case(value))
            });
            prop_assert!(has("u", URL) && has("method", "POST"));
            prop_assert!(offset.unsigned_abs() <= TIME_WINDOW_SECS);
            prop_assert!(body.is_empty() || has("payload", &hex::encode(Sha256::digest(&body))));
        }
    }

    #[test]
    fn the_fuzz_entry_point_for_nip86_takes_any_body(
        body in prop_oneof![
            json_value().prop_map(|v| v.to_string().into_bytes()),
            any::<Vec<u8>>(),
        ],
    ) {
        fuzz::nip86(&body);
    }

    #[test]
    fn nip86_requests_of_any_shape_are_answered_and_strangers_change_nothing(
        method in prop_oneof![Just(http::Method::POST), Just(http::Method::GET), Just(http::Method::PUT)],
        content_type in prop_oneof![
            Just(nip86::CONTENT_TYPE.to_string()),
            Just("application/json".to_string()),
            "[ -~]{0,30}",
        ],
        auth in prop_oneof![
            Just(None),
            "[ -~]{0,80}".prop_map(Some),
            Just(Some("stranger".to_string())),
        ],
        body in json_value().prop_map(|v| v.to_string()),
    ) {
        let owner = fuzz::owner_keys();
        let admin = MemoryAdmin::managed(&[owner.public_key()]);
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, http::HeaderValue::from_static("relay.example"));
        if let Ok(v) = http::HeaderValue::from_str(&content_type) {
            headers.insert(http::header::CONTENT_TYPE, v);
        }
        let auth = match auth.as_deref() {
            Some("stranger") => Some(signed(&Keys::generate(), "POST", Some(body.as_bytes()), 0)),
            other => other.map(str::to_string),
        };
        if let Some(v) = auth.and_then(|a| http::HeaderValue::from_str(&a).ok()) {
            headers.insert(http::header::AUTHORIZATION, v);
        }
        let uri = http::Uri::from_static("/api/nip86");
        let replay = ReplayCache::new(8);
        let r = block_on(nip86::handle_with(
            &admin,
            Nip86Request { method: &method, uri: &uri, headers: &headers, body: body.as_bytes() },
            NOW,
            &replay,
        ));
        assert_well_formed(&r);
        // Nobody here is the owner: nothing may change, and the replay cache stays empty.
        prop_assert_ne!(r.status, 200, "{:?}", r);
        prop_assert!(admin.snapshot().is_empty());
        prop_assert!(replay.is_empty());
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}
