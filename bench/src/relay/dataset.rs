//! The relay benchmark's load: the shared corpus (notes and reactions with `p` and `e` tags),
//! as ready-to-send EVENT messages plus what the queries need to pick realistic values.

use std::collections::HashMap;
use std::time::Instant;

use nostr::JsonUtil;

use super::matcher::EventKey;
use crate::dataset::{self, Shape, Times};

/// A fixed seed, so runs differ only in keys and timestamps.
const SEED: u64 = 0x0b1e_5eed;
/// Share of kind-7 reactions; the rest are kind-1 notes.
const REACTION_SHARE: f64 = 0.1;

/// Signed events ready to send.
pub struct Dataset {
    /// `["EVENT",{...}]` messages, one per event.
    pub messages: Vec<String>,
    /// Hex ids of all events (all are stored: they are unique and valid).
    pub ids: Vec<String>,
    /// Hex pubkeys of the authors; the `p` tags point at them too.
    pub authors: Vec<String>,
    /// The authors' keys, in the order of `authors` (the fan-out and load phases sign fresh
    /// events with them).
    pub keys: Vec<nostr::Keys>,
    /// Each event as the client-side matcher sees it, in the order of `messages`.
    pub events: Vec<EventKey>,
    /// The oldest and newest created_at.
    pub oldest: u64,
    pub newest: u64,
}

/// Generates `n` events from `authors` authors, signed on every core.
pub fn generate(n: usize, authors: usize) -> anyhow::Result<Dataset> {
    let started = Instant::now();
    let shape = Shape {
        words: 3..30,
        reactions: REACTION_SHARE,
        p_tags: true,
        times: Times::Recent,
        ..Shape::notes(authors, SEED, "bench note")
    };
    let corpus = dataset::generate(n, &shape)?;
    let times = corpus.events.iter().map(|e| e.created_at.as_secs());
    let data = Dataset {
        messages: corpus
            .events
            .iter()
            .map(|e| format!(r#"["EVENT",{}]"#, e.as_json()))
            .collect(),
        ids: corpus.events.iter().map(|e| e.id.to_hex()).collect(),
        authors: corpus
            .keys
            .iter()
            .map(|k| k.public_key().to_hex())
            .collect(),
        keys: corpus.keys.clone(),
        events: event_keys(&corpus.events, &corpus.keys),
        oldest: times.clone().min().unwrap_or_default(),
        newest: times.max().unwrap_or_default(),
    };
    eprintln!(
        "signed {n} events from {} authors on {} threads in {:.1} s",
        corpus.keys.len(),
        dataset::cores(),
        started.elapsed().as_secs_f64()
    );
    Ok(data)
}

/// The matcher's view of `events`, whose authors and `p` tags are all among `keys`.
pub fn event_keys(events: &[nostr::Event], keys: &[nostr::Keys]) -> Vec<EventKey> {
    let index: HashMap<nostr::PublicKey, u32> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.public_key(), i as u32))
        .collect();
    events
        .iter()
        .map(|e| EventKey {
            author: index[&e.pubkey],
            kind: e.kind.as_u16(),
            p: e.tags
                .public_keys()
                .filter_map(|pk| index.get(pk).copied())
                .collect(),
            created_at: e.created_at.as_secs(),
        })
        .collect()
}
