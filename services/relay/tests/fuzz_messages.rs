//! Property tests of the client message parser and filters (`orly::message::parse`,
//! `orly::message::parse_filter`): arbitrary frames and filters never panic and are refused with
//! `invalid: …`, and randomly built valid messages parse to what was built. The promises live
//! in `fuzz/harness/messages.rs`, shared with the cargo-fuzz targets `messages` and `filters`
//! (docs/fuzzing.md). Each property runs a bounded number of cases (`PROPTEST_CASES`
//! overrides).

#[path = "../../../fuzz/harness/messages.rs"]
mod harness;

use std::collections::BTreeSet;
use std::sync::LazyLock;

use nostr::{Alphabet, Keys, Kind, SingleLetterTag, Timestamp};
use orly::message::{parse, ClientMessage, MAX_SUB_ID_LEN};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn config() -> ProptestConfig {
    ProptestConfig {
        // proptest's own default when PROPTEST_CASES is unset.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        ..ProptestConfig::default()
    }
}

/// A few valid public keys (random 32 bytes are a valid key only about half the time).
static AUTHORS: LazyLock<Vec<String>> = LazyLock::new(|| {
    (0..6)
        .map(|_| Keys::generate().public_key().to_hex())
        .collect()
});

const TYPES: &[&str] = &[
    "EVENT",
    "REQ",
    "COUNT",
    "CLOSE",
    "AUTH",
    "NEG-OPEN",
    "NEG-MSG",
    "NEG-CLOSE",
];

/// Any JSON value, a few levels deep, with the keys filters use among the object keys.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::from)),
        ".{0,20}".prop_map(Value::from),
        "[0-9a-f]{64}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 48, 8, |inner| {
        let key = prop_oneof![
            Just("ids".to_string()),
            Just("authors".to_string()),
            Just("kinds".to_string()),
            Just("since".to_string()),
            Just("until".to_string()),
            Just("limit".to_string()),
            Just("search".to_string()),
            "#[a-zA-Z0-9]".prop_map(String::from),
            ".{0,6}".prop_map(String::from),
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A subscription id NIP-01 allows: 1 to 64 characters, any of them.
fn sub_id() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 1..=MAX_SUB_ID_LEN).prop_map(String::from_iter)
}

/// A valid filter as JSON, with what its fields hold.
#[derive(Debug, Clone)]
struct FilterSpec {
    ids: Option<BTreeSet<String>>,
    authors: Option<BTreeSet<String>>,
    kinds: Option<BTreeSet<u16>>,
    since: Option<u64>,
    until: Option<u64>,
    limit: Option<usize>,
    search: Option<String>,
    tags: Vec<(char, BTreeSet<String>)>,
}

impl FilterSpec {
    fn json(&self) -> Value {
        let mut m = Map::new();
        if let Some(ids) = &self.ids {
            m.insert("ids".into(), json!(ids));
        }
        if let Some(a) = &self.authors {
            m.insert("authors".into(), json!(a));
        }
        if let Some(k) = &self.kinds {
            m.insert("kinds".into(), json!(k));
        }
        if let Some(s) = self.since {
            m.insert("since".into(), json!(s));
        }
        if let Some(u) = self.until {
            m.insert("until".into(), json!(u));
        }
        if let Some(l) = self.limit {
            m.insert("limit".into(), json!(l));
        }
        if let Some(s) = &self.search {
            m.insert("search".into(), json!(s));
        }
        for (c, values) in &self.tags {
            m.insert(format!("#{c}"), json!(values));
        }
        Value::Object(m)
    }

    /// Checks a parsed filter against the spec.
    fn assert_matches(&self, f: &nostr::Filter) {
        let hex = |s: &BTreeSet<String>| s.clone();
        assert_eq!(
            f.ids
                .as_ref()
                .map(|s| s.iter().map(|i| i.to_hex()).collect::<BTreeSet<_>>()),
            self.ids.as_ref().map(hex)
        );
        assert_eq!(
            f.authors
                .as_ref()
                .map(|s| s.iter().map(|a| a.to_hex()).collect::<BTreeSet<_>>()),
            self.authors.as_ref().map(hex)
        );
        assert_eq!(
            f.kinds
                .as_ref()
                .map(|s| s.iter().map(|k| k.as_u16()).collect::<BTreeSet<_>>()),
            self.kinds
        );
        assert_eq!(f.since, self.since.map(Timestamp::from));
        assert_eq!(f.until, self.until.map(Timestamp::from));
        assert_eq!(f.limit, self.limit);
        assert_eq!(f.search, self.search);
        assert_eq!(f.generic_tags.len(), self.tags.len());
        for (c, values) in &self.tags {
            let tag = SingleLetterTag::from_char(*c).unwrap();
            assert_eq!(f.generic_tags.get(&tag), Some(values), "#{c}");
        }
    }
}

fn filter_spec() -> impl Strategy<Value = FilterSpec> {
    let set = |s: BoxedStrategy<String>| prop::option::of(prop::collection::btree_set(s, 0..4));
    let letters: Vec<char> = ('a'..='z').chain('A'..='Z').collect();
    (
        set("[0-9a-f]{64}".boxed()),
        set(prop::sample::select(AUTHORS.clone()).boxed()),
        prop::option::of(prop::collection::btree_set(any::<u16>(), 0..5)),
        prop::option::of(0u64..=u32::MAX as u64 * 2),
        prop::option::of(0u64..=u32::MAX as u64 * 2),
        prop::option::of(0usize..100_000),
        prop::option::of(".{0,24}"),
        prop::collection::btree_map(
            prop::sample::select(letters),
            prop::collection::btree_set(".{0,12}", 0..4),
            0..3,
        ),
    )
        .prop_map(
            |(ids, authors, kinds, since, until, limit, search, tags)| FilterSpec {
                ids,
                authors,
                kinds,
                since,
                until,
                limit,
                search,
                tags: tags.into_iter().collect(),
            },
        )
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes as a frame: no panic, every refusal `invalid: …`.
    #[test]
    fn arbitrary_frames_are_parsed_or_refused(data in prop::collection::vec(any::<u8>(), 0..512)) {
        harness::messages(&data);
    }

    /// Arbitrary bytes as a filter.
    #[test]
    fn arbitrary_filters_are_parsed_or_refused(data in prop::collection::vec(any::<u8>(), 0..256)) {
        harness::filters(&data);
    }

    /// JSON arrays that look like client messages, with arbitrary parts.
    #[test]
    fn message_shaped_json_is_parsed_or_refused(
        kind in prop_oneof![prop::sample::select(TYPES).prop_map(Value::from), json_value()],
        rest in prop::collection::vec(json_value(), 0..5),
    ) {
        let mut parts = vec![kind];
        parts.extend(rest);
        let text = Value::Array(parts).to_string();
        let _ = harness::check_message(&text);
    }

    /// Arbitrary JSON objects as filters: parsed (and round-tripping) or refused.
    #[test]
    fn object_shaped_filters_are_parsed_or_refused(v in json_value()) {
        let text = v.to_string();
        harness::filters(text.as_bytes());
    }

    /// A random valid REQ or COUNT parses to its subscription id and filters, each filter to
    /// what it says.
    #[test]
    fn valid_reqs_round_trip(
        count in any::<bool>(),
        sub in sub_id(),
        specs in prop::collection::vec(filter_spec(), 1..5),
    ) {
        let kind = if count { "COUNT" } else { "REQ" };
        let mut parts = vec![json!(kind), json!(sub)];
        parts.extend(specs.iter().map(FilterSpec::json));
        let text = Value::Array(parts).to_string();
        let (got_sub, filters) = match harness::check_message(&text) {
            Ok(ClientMessage::Req { sub_id, filters }) if !count => (sub_id, filters),
            Ok(ClientMessage::Count { sub_id, filters }) if count => (sub_id, filters),
            other => panic!("{text} parsed as {other:?}"),
        };
        prop_assert_eq!(got_sub, sub);
        prop_assert_eq!(filters.len(), specs.len());
        for (raw, spec) in filters.iter().zip(&specs) {
            let f = harness::check_filter(raw).unwrap_or_else(|e| panic!("{}: {e}", raw.get()));
            spec.assert_matches(&f);
        }
    }

    /// NIP-77 messages and CLOSE round-trip too.
    #[test]
    fn valid_close_and_negentropy_messages_round_trip(
        sub in sub_id(),
        spec in filter_spec(),
        payload in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let hex = hex::encode(&payload);
        let open = json!(["NEG-OPEN", sub, spec.json(), hex]).to_string();
        match harness::check_message(&open) {
            Ok(ClientMessage::NegOpen { sub_id, filter, message }) => {
                prop_assert_eq!(&sub_id, &sub);
                prop_assert_eq!(&message, &hex);
                spec.assert_matches(&harness::check_filter(filter).unwrap());
            }
            other => panic!("{open} parsed as {other:?}"),
        }
        let msg = json!(["NEG-MSG", sub, hex]).to_string();
        match harness::check_message(&msg) {
            Ok(ClientMessage::NegMsg { sub_id, message }) => {
                prop_assert_eq!(&sub_id, &sub);
                prop_assert_eq!(&message, &hex);
            }
            other => panic!("{msg} parsed as {other:?}"),
        }
        for (kind, neg) in [("CLOSE", false), ("NEG-CLOSE", true)] {
            let text = json!([kind, sub]).to_string();
            match harness::check_message(&text) {
                Ok(ClientMessage::Close(s)) if !neg => prop_assert_eq!(&s, &sub),
                Ok(ClientMessage::NegClose(s)) if neg => prop_assert_eq!(&s, &sub),
                other => panic!("{text} parsed as {other:?}"),
            }
        }
    }

    /// Bad subscription ids are refused with `invalid: …` and name no subscription; a REQ
    /// without filters or a NIP-77 message of the wrong shape names its (valid) id.
    #[test]
    fn bad_shapes_are_refused_with_the_right_subscription(
        sub in sub_id(),
        long in prop::collection::vec(any::<char>(), MAX_SUB_ID_LEN + 1..MAX_SUB_ID_LEN + 8)
            .prop_map(String::from_iter),
        kind in prop::sample::select(&["REQ", "COUNT", "CLOSE", "NEG-OPEN", "NEG-MSG", "NEG-CLOSE"][..]),
        not_a_string in json_value().prop_filter("not a string", |v| !v.is_string()),
        payload in json_value().prop_filter("not a string", |v| !v.is_string()),
    ) {
        for bad in [json!(""), json!(long), not_a_string] {
            let text = json!([kind, bad, {}]).to_string();
            let e = harness::check_message(&text).expect_err(&text);
            prop_assert!(e.sub_id.is_none(), "{} named {:?}", text, e.sub_id);
        }
        let cases = [
            (json!(["REQ", sub]), false),
            (json!(["COUNT", sub]), false),
            (json!(["NEG-OPEN", sub, {}]), true),
            (json!(["NEG-OPEN", sub, {}, payload.clone()]), true),
            (json!(["NEG-OPEN", sub, {}, "00", "extra"]), true),
            (json!(["NEG-MSG", sub]), true),
            (json!(["NEG-MSG", sub, payload]), true),
        ];
        for (v, neg) in cases {
            let text = v.to_string();
            let e = harness::check_message(&text).expect_err(&text);
            prop_assert_eq!(e.sub_id.as_deref(), Some(sub.as_str()), "{}", text);
            prop_assert_eq!(e.negentropy, neg, "{}", text);
        }
    }
}

#[test]
fn kinds_and_tags_of_every_range_parse() {
    let text = json!(["REQ", "s", {"kinds": [0, 1, 65535], "#e": [], "#Z": ["x"]}]).to_string();
    match parse(&text).unwrap() {
        ClientMessage::Req { filters, .. } => {
            let f = harness::check_filter(filters[0]).unwrap();
            assert!(f.kinds.unwrap().contains(&Kind::from(65535)));
            let z = SingleLetterTag::uppercase(Alphabet::Z);
            assert_eq!(f.generic_tags.get(&z).map(|s| s.len()), Some(1));
        }
        other => panic!("{other:?}"),
    }
}
