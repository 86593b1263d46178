//! The benchmark's events: generated and signed once (on every core), reused by every mode.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use nostr::{Event, EventBuilder, EventId, JsonUtil, Keys, Kind, Tag, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Events spread over this many seconds before now (four weeks).
const SPAN_SECS: u64 = 28 * 86_400;
/// A fixed seed, so runs differ only in keys and timestamps.
const SEED: u64 = 0x0b1e_5eed;
/// Share of kind-7 reactions; the rest are kind-1 notes.
const REACTION_SHARE: f64 = 0.1;
const WORDS: &[&str] = &[
    "nostr",
    "relay",
    "note",
    "hello",
    "world",
    "bitcoin",
    "lightning",
    "zap",
    "orly",
    "sqlite",
    "postgres",
    "grpc",
    "event",
    "filter",
    "signature",
    "pubkey",
    "coffee",
    "morning",
    "gm",
    "pv",
];

/// Signed events ready to send, plus what the queries need to pick realistic values.
pub struct Dataset {
    /// `["EVENT",{...}]` messages, one per event.
    pub messages: Vec<String>,
    /// Hex ids of all events (all are stored: they are unique and valid).
    pub ids: Vec<String>,
    /// Hex pubkeys of the authors; the `p` tags point at them too.
    pub authors: Vec<String>,
    /// The oldest and newest created_at.
    pub oldest: u64,
    pub newest: u64,
}

/// What one event will be, decided up front so signing needs no shared RNG.
struct Spec {
    author: usize,
    kind: Kind,
    created_at: u64,
    p: usize,
    content: String,
    target: Option<EventId>,
}

/// Generates `n` events from `authors` authors and signs them on `threads` threads.
pub fn generate(n: usize, authors: usize, threads: usize) -> anyhow::Result<Dataset> {
    let started = Instant::now();
    let keys: Vec<Keys> = (0..authors.max(1)).map(|_| Keys::generate()).collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut rng = StdRng::seed_from_u64(SEED);
    let specs: Vec<Spec> = (0..n).map(|i| spec(i, &mut rng, keys.len(), now)).collect();

    let chunk = n.div_ceil(threads.max(1)).max(1);
    let events: Vec<Event> = std::thread::scope(|s| {
        let handles: Vec<_> = specs
            .chunks(chunk)
            .map(|part| s.spawn(|| sign_all(part, &keys)))
            .collect();
        let mut all = Vec::with_capacity(n);
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a signing thread panicked"))??,
            );
        }
        anyhow::Ok(all)
    })?;

    let data = Dataset {
        messages: events
            .iter()
            .map(|e| format!(r#"["EVENT",{}]"#, e.as_json()))
            .collect(),
        ids: events.iter().map(|e| e.id.to_hex()).collect(),
        authors: keys.iter().map(|k| k.public_key().to_hex()).collect(),
        oldest: events
            .iter()
            .map(|e| e.created_at.as_secs())
            .min()
            .unwrap_or(now),
        newest: events
            .iter()
            .map(|e| e.created_at.as_secs())
            .max()
            .unwrap_or(now),
    };
    eprintln!(
        "signed {n} events from {} authors on {threads} threads in {:.1} s",
        keys.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(data)
}

fn spec(i: usize, rng: &mut StdRng, authors: usize, now: u64) -> Spec {
    let reaction = rng.gen_bool(REACTION_SHARE);
    let words = rng.gen_range(3..30);
    let mut content = format!("bench note {i}:");
    for _ in 0..words {
        content.push(' ');
        content.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    Spec {
        author: rng.gen_range(0..authors),
        kind: if reaction {
            Kind::Reaction
        } else {
            Kind::TextNote
        },
        created_at: now - rng.gen_range(60..SPAN_SECS),
        p: rng.gen_range(0..authors),
        content: if reaction { "+".into() } else { content },
        target: reaction.then(|| EventId::from_byte_array(rng.gen())),
    }
}

fn sign_all(specs: &[Spec], keys: &[Keys]) -> anyhow::Result<Vec<Event>> {
    specs
        .iter()
        .map(|s| {
            let mut tags = vec![Tag::public_key(keys[s.p].public_key())];
            if let Some(target) = s.target {
                tags.push(Tag::event(target));
            }
            EventBuilder::new(s.kind, s.content.as_str())
                .tags(tags)
                .custom_created_at(Timestamp::from(s.created_at))
                .sign_with_keys(&keys[s.author])
                .context("signing an event")
        })
        .collect()
}
