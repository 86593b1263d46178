//! Property tests of the NIP-77 message handler (the in-process `NegentropyEngine` through
//! `NegentropyHandler`, as the relay calls it for NEG-OPEN / NEG-MSG / NEG-CLOSE): arbitrary and
//! mutated messages never panic and are refused with a NIP-01 prefix (`invalid: `, `blocked: `,
//! `closed: `, never our own `error: `), a session that failed is gone, and a valid client
//! reconciles to exactly the difference of the two sets. The promises live in
//! `fuzz/harness/negentropy.rs`, shared with the cargo-fuzz target `negentropy`
//! (docs/fuzzing.md). Each property runs a bounded number of cases (`PROPTEST_CASES`
//! overrides).

#[path = "../../../fuzz/harness/negentropy.rs"]
mod harness;

use std::collections::BTreeSet;

use harness::{fixture, initial_message, session, V1};
use nostr::{EventId, Filter, Timestamp};
use orly_sync_negentropy::{reconcile_as_client, NegError};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        ..ProptestConfig::default()
    }
}

/// A preset filter of the fixture (index), the widest (refused: too many records) included.
fn preset() -> impl Strategy<Value = usize> {
    0..fixture().filters.len()
}

/// Bytes that start like a V1 message more often than chance would.
fn message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<u8>(), 0..600).prop_map(|mut m| {
            if let Some(b) = m.first_mut() {
                *b = V1;
            }
            m
        }),
        (0x60u8..=0x6f, prop::collection::vec(any::<u8>(), 0..16)).prop_map(|(v, mut m)| {
            m.insert(0, v);
            m
        }),
    ]
}

/// A filter as JSON: mostly shapes a client sends, some arbitrary.
fn filter_json() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (
            any::<u16>(),
            prop::option::of(0u64..4_000_000_000),
            prop::option::of(0usize..500)
        )
            .prop_map(|(k, since, limit)| {
                let mut f = serde_json::json!({ "kinds": [k] });
                if let Some(s) = since {
                    f["since"] = s.into();
                }
                if let Some(l) = limit {
                    f["limit"] = l.into();
                }
                f.to_string().into_bytes()
            }),
        Just(br#"{"search":"fuzz"}"#.to_vec()),
        Just(br##"{"#e":["x"],"#p":[""]}"##.to_vec()),
        Just(br#"{"until":0}"#.to_vec()),
        Just(br#"{"limit":0}"#.to_vec()),
        "\\{[ -~]{0,40}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary bytes through the cargo-fuzz entry point.
    #[test]
    fn arbitrary_sessions_never_panic(data in prop::collection::vec(any::<u8>(), 0..700)) {
        harness::negentropy(&data);
    }

    /// Arbitrary NEG-OPEN and NEG-MSG messages on each preset filter.
    #[test]
    fn garbage_messages_are_refused_with_a_prefix(
        f in preset(),
        open in message(),
        msgs in prop::collection::vec(message(), 0..4),
    ) {
        let _ = session(&fixture().filters[f].clone(), &open, &msgs);
    }

    /// JSON filters as a client writes them, with a valid initial message.
    #[test]
    fn client_filters_open_or_are_refused(json in filter_json(), bits in any::<u64>()) {
        let mut data = json;
        data.retain(|b| *b != b'\n');
        data.push(b'\n');
        let msg = initial_message(&[], 0);
        data.extend((msg.len() as u16).to_be_bytes());
        data.extend(&msg);
        data.extend(8u16.to_be_bytes());
        data.extend(bits.to_be_bytes());
        harness::negentropy(&data);
    }

    /// A valid initial message with some bytes flipped, cut short or extended, then the
    /// session's own replies echoed back mutated.
    #[test]
    fn mutated_valid_messages_are_answered_or_refused(
        f in preset(),
        pick in any::<u64>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        cut in any::<prop::sample::Index>(),
        tail in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let fx = fixture();
        let filter: Filter = fx.filters[f].clone();
        let client = subset(&fx.records(&filter), pick);
        let mut open = initial_message(&client, 0);
        for (at, x) in &flips {
            let i = at.index(open.len());
            open[i] ^= x;
        }
        if tail.is_empty() {
            open.truncate(1 + cut.index(open.len()));
        } else {
            open.extend(&tail);
        }
        let answers = session(&filter, &open, &[]);
        if let Some(Ok(reply)) = answers.first() {
            let mut echo = reply.message.clone();
            for (at, x) in &flips {
                let i = at.index(echo.len());
                echo[i] ^= x;
            }
            let _ = session(&filter, &open, &[echo, reply.message.clone()]);
        }
    }

    /// A valid client holding part of the set (and some ids the store lacks) learns exactly
    /// what it has and needs, in as many rounds as it takes (frames as small as allowed).
    #[test]
    fn valid_clients_reconcile_to_the_set_difference(
        f in 1..fixture().filters.len(),
        pick in any::<u64>(),
        foreign in prop::collection::btree_set((0u64..200, any::<[u8; 32]>()), 0..20),
        frame in prop_oneof![Just(0u64), Just(4096u64)],
    ) {
        let fx = fixture();
        let filter = fx.filters[f].clone();
        let ours: BTreeSet<(Timestamp, EventId)> = fx.records(&filter).into_iter().collect();
        let mut client: BTreeSet<(Timestamp, EventId)> =
            subset(&ours.iter().copied().collect::<Vec<_>>(), pick).into_iter().collect();
        for (t, id) in &foreign {
            client.insert((Timestamp::from(harness::BASE + t), EventId::from_byte_array(*id)));
        }
        let items: Vec<_> = client.iter().copied().collect();
        let conn = harness::connection_id();
        let outcome = fx
            .rt
            .block_on(reconcile_as_client(fx.engine.as_ref(), &conn, "r", &filter, &items, frame))
            .unwrap_or_else(|e| panic!("filter {f}: {}", e.reason()));
        let ids = |s: &BTreeSet<(Timestamp, EventId)>| s.iter().map(|(_, id)| *id).collect::<BTreeSet<_>>();
        prop_assert_eq!(outcome.have, ids(&client.difference(&ours).copied().collect()));
        prop_assert_eq!(outcome.need, ids(&ours.difference(&client).copied().collect()));
    }
}

/// The records of `all` whose index's bit is set in `pick` (bits repeat every 64 records).
fn subset(all: &[(Timestamp, EventId)], pick: u64) -> Vec<(Timestamp, EventId)> {
    all.iter()
        .enumerate()
        .filter(|(i, _)| pick & (1 << (i % 64)) != 0)
        .map(|(_, r)| *r)
        .collect()
}

#[test]
fn the_fixture_covers_refusals_and_multi_round_sets() {
    let fx = fixture();
    // The widest filter is over the cap: blocked, and the session is not opened.
    let open = initial_message(&[], 0);
    let answers = session(&fx.filters[0], &open, std::slice::from_ref(&open));
    assert!(
        matches!(&answers[0], Err(NegError::Blocked(_))),
        "{answers:?}"
    );
    assert!(
        fx.records(&fx.filters[1]).len() > 256,
        "kind 1 needs several frames"
    );
    assert_eq!(fx.records(&fx.filters[5]).len(), 16);
    // Another V1.x version: our version byte alone.
    let answers = session(&fx.filters[1], &[0x62, 0x00], &[]);
    assert_eq!(answers[0].as_ref().unwrap().message, vec![V1]);
}
