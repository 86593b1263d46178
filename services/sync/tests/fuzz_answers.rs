//! Property tests of the peer-sync clients against hostile peers: a scripted fake peer answers
//! the distributed sync (`/api/sync/current`, `/api/sync/event-ids`) and the cluster sync
//! (`/cluster/latest`, `/cluster/events`) with random bytes, or with valid answers whose parts
//! are replaced by extreme values. Nothing panics, every error carries its NIP-01 prefix,
//! nothing unlisted or unverified is stored, and honest answers are pulled whole. The promises
//! live in `fuzz/harness/peer_sync.rs`, shared with the cargo-fuzz target `peer_sync`
//! (docs/fuzzing.md). Each property runs a bounded number of cases (`PROPTEST_CASES`
//! overrides).

#[path = "../../../fuzz/harness/peer_sync.rs"]
mod harness;

use harness::{fixture, poll, Answer, Protocol, Script};
use nostr::{Event, EventBuilder, JsonUtil, Keys, Kind, SecretKey, Timestamp};
use proptest::prelude::*;
use serde_json::{json, Value};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        // Each case is a few HTTP round trips: keep failures quick to report.
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Distributed), Just(Protocol::Cluster)]
}

/// Keys from a seed (deterministic, so that proptest can shrink).
fn keys(seed: [u8; 32]) -> Keys {
    SecretKey::from_slice(&seed).map_or_else(|_| Keys::generate(), Keys::new)
}

/// A peer's store: events with increasing serials (gaps allowed) and its latest serial.
#[derive(Debug, Clone)]
struct PeerWorld {
    events: Vec<(u64, Event)>,
    latest: u64,
    peer_pubkey: String,
    /// ORLY v0.24 sends events as strings holding the JSON.
    as_strings: bool,
}

fn world() -> impl Strategy<Value = PeerWorld> {
    (
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        prop::collection::vec((1u64..5, 0u64..100_000, ".{0,40}"), 0..10),
        0u64..3,
        any::<bool>(),
    )
        .prop_map(|(seed, peer_seed, specs, extra, as_strings)| {
            let author = keys(seed);
            let now = Timestamp::now().as_secs();
            let mut serial = 0;
            let events = specs
                .into_iter()
                .map(|(gap, age, content)| {
                    serial += gap;
                    let event = EventBuilder::new(Kind::TextNote, content)
                        .custom_created_at(Timestamp::from(now - age))
                        .sign_with_keys(&author)
                        .expect("signed");
                    (serial, event)
                })
                .collect();
            PeerWorld {
                events,
                latest: serial + extra,
                peer_pubkey: keys(peer_seed).public_key().to_hex(),
                as_strings,
            }
        })
}

/// The answers (NIP-11, latest, list, fetch) of an honest peer holding `w`.
fn honest(protocol: Protocol, w: &PeerWorld) -> [Value; 4] {
    let nip11 = json!({ "name": "peer", "pubkey": w.peer_pubkey, "supported_nips": [1, 11] });
    let events: Vec<Value> = w
        .events
        .iter()
        .map(|(_, e)| {
            if w.as_strings {
                Value::String(e.as_json())
            } else {
                serde_json::from_str(&e.as_json()).expect("event JSON")
            }
        })
        .collect();
    match protocol {
        Protocol::Distributed => [
            nip11,
            json!({ "node_id": "peer", "relay_url": "", "serial": w.latest }),
            json!({
                "event_map": w
                    .events
                    .iter()
                    .map(|(s, e)| (e.id.to_hex(), json!(s)))
                    .collect::<serde_json::Map<_, _>>(),
            }),
            json!({ "events": events, "event_map": {} }),
        ],
        Protocol::Cluster => [
            nip11,
            json!({ "serial": w.latest, "timestamp": Timestamp::now().as_secs() }),
            json!({
                "events": w
                    .events
                    .iter()
                    .map(|(s, e)| json!({
                        "serial": s,
                        "id": e.id.to_hex(),
                        "timestamp": e.created_at.as_secs(),
                    }))
                    .collect::<Vec<_>>(),
                "has_more": false,
            }),
            json!({ "events": events }),
        ],
    }
}

fn script(values: &[Value; 4]) -> Script {
    Script {
        nip11: Answer::json(&values[0]),
        latest: Answer::json(&values[1]),
        list: Answer::json(&values[2]),
        fetch: Answer::json(&values[3]),
    }
}

/// Values a hostile peer likes: extremes of every type.
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(null)),
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(u64::MAX)),
        Just(json!(u64::MAX - 1)),
        Just(json!(i64::MIN)),
        Just(json!(1e300)),
        Just(json!(true)),
        Just(json!("")),
        Just(json!("0".repeat(64))),
        Just(json!([])),
        Just(json!({})),
        any::<u64>().prop_map(Value::from),
        (0u64..30).prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
    ]
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// Replaces the `target`-th node of `v` (pre-order, from `*i`) with `with`; hands `with`
/// back when the node is not inside `v`.
fn replace_walk(v: &mut Value, target: usize, i: &mut usize, with: Value) -> Option<Value> {
    if *i == target {
        *v = with;
        return None;
    }
    *i += 1;
    let mut with = Some(with);
    match v {
        Value::Array(a) => {
            for c in a {
                with = replace_walk(c, target, i, with.take()?);
            }
        }
        Value::Object(o) => {
            for c in o.values_mut() {
                with = replace_walk(c, target, i, with.take()?);
            }
        }
        _ => {}
    }
    with
}

/// A mutation of one answer.
#[derive(Debug, Clone)]
enum Mutation {
    /// A node (pre-order index) replaced by a value.
    Replace(prop::sample::Index, Value),
    /// A key added to (or overwritten in) the top-level object.
    Insert(&'static str, Value),
    /// The body replaced by bytes.
    Bytes(Vec<u8>),
    /// The status replaced.
    Status(u16),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let keys = &[
        "has_more",
        "next_from",
        "more",
        "serial",
        "events",
        "event_map",
        "ids",
        "pubkey",
    ][..];
    prop_oneof![
        4 => (any::<prop::sample::Index>(), leaf()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        2 => (prop::sample::select(keys), leaf()).prop_map(|(k, v)| Mutation::Insert(k, v)),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Mutation::Bytes),
        1 => prop::sample::select(&[200u16, 204, 301, 400, 401, 403, 404, 500, 503][..])
            .prop_map(Mutation::Status),
    ]
}

fn mutate(values: &[Value; 4], mutations: &[(usize, Mutation)]) -> Script {
    let mut values = values.clone();
    let mut bytes: [Option<Vec<u8>>; 4] = Default::default();
    let mut status = [200u16; 4];
    for (which, m) in mutations {
        let which = which % 4;
        match m {
            Mutation::Replace(at, v) => {
                let target = at.index(count(&values[which]));
                replace_walk(&mut values[which], target, &mut 0, v.clone());
            }
            Mutation::Insert(k, v) => {
                if let Value::Object(o) = &mut values[which] {
                    o.insert((*k).to_string(), v.clone());
                }
            }
            Mutation::Bytes(b) => bytes[which] = Some(b.clone()),
            Mutation::Status(s) => status[which] = *s,
        }
    }
    let answer = |i: usize| Answer {
        status: status[i],
        body: bytes[i]
            .clone()
            .unwrap_or_else(|| values[i].to_string().into_bytes()),
    };
    Script {
        nip11: answer(0),
        latest: answer(1),
        list: answer(2),
        fetch: answer(3),
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// An honest peer's answers are pulled whole: every event stored, no error.
    #[test]
    fn honest_answers_are_pulled_whole(protocol in protocol(), w in world()) {
        let out = poll(protocol, &script(&honest(protocol, &w)));
        prop_assert!(out.result.is_ok(), "{:?}", out.result);
        prop_assert_eq!(out.stored.len(), w.events.len());
    }

    /// Honest answers with parts replaced: refused with a prefix or pulled, never a panic,
    /// nothing stored that was not listed and verified.
    #[test]
    fn mutated_answers_are_refused_or_pulled(
        protocol in protocol(),
        w in world(),
        mutations in prop::collection::vec((0usize..4, mutation()), 1..4),
    ) {
        let _ = poll(protocol, &mutate(&honest(protocol, &w), &mutations));
    }

    /// Arbitrary bytes through the cargo-fuzz entry point.
    #[test]
    fn arbitrary_answers_are_refused(data in prop::collection::vec(any::<u8>(), 0..256)) {
        harness::peer_sync(&data);
    }
}

proptest! {
    #![proptest_config(config(32))]

    /// A peer whose NIP-11 names our identity is ourselves: never asked for its serial.
    #[test]
    fn a_peer_with_our_identity_is_not_polled(protocol in protocol(), w in world()) {
        let mut values = honest(protocol, &w);
        values[0]["pubkey"] = json!(fixture().pubkey.to_uppercase());
        let out = poll(protocol, &script(&values));
        prop_assert!(out.result.is_ok(), "{:?}", out.result);
        prop_assert!(out.stored.is_empty());
    }
}

/// A distributed peer that announces a huge serial and lists nothing keeps the pull paging;
/// the fake peer's request budget ends it with an error (the harness relies on this).
#[test]
fn an_endless_peer_is_cut_off() {
    let w = PeerWorld {
        events: Vec::new(),
        latest: 1 << 40,
        peer_pubkey: Keys::generate().public_key().to_hex(),
        as_strings: false,
    };
    let out = poll(
        Protocol::Distributed,
        &script(&honest(Protocol::Distributed, &w)),
    );
    assert!(out.result.is_err(), "{:?}", out.result);
    assert!(out.requests.len() > harness::REQUEST_BUDGET);
}

/// Found by fuzzing: a cluster member announcing `u64::MAX` as its latest serial and a listing
/// page with `has_more` panicked the pull with an arithmetic overflow (`to + 1` in
/// `ClusterSource::list`); now the answer is judged without overflowing.
#[test]
fn a_cluster_member_at_the_last_serial_is_refused_not_a_panic() {
    let mut values = honest(
        Protocol::Cluster,
        &PeerWorld {
            events: Vec::new(),
            latest: 0,
            peer_pubkey: Keys::generate().public_key().to_hex(),
            as_strings: false,
        },
    );
    values[1]["serial"] = json!(u64::MAX);
    values[2] = json!({ "events": [], "has_more": true, "next_from": 5 });
    let _ = poll(Protocol::Cluster, &script(&values));
}
