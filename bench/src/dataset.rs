//! The benchmarks' events, shared by all three: signed text notes (and, for the relay
//! benchmark, reactions with `e` and `p` tags) generated from a seed, signed on every core,
//! and a helper that saves them straight into a store.

use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::StreamExt;
use nostr::{Event, EventBuilder, EventId, Keys, Kind, Tag, Timestamp};
use orly_db::{SaveOutcome, SharedStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Events spread over this many seconds before now (four weeks) with [`Times::Recent`].
pub const SPAN_SECS: u64 = 28 * 86_400;

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
    "sync",
    "peer",
    "cluster",
    "serial",
    "coffee",
    "morning",
    "gm",
    "pv",
];

/// When the events were created.
#[derive(Debug, Clone, Copy)]
pub enum Times {
    /// At random within the last four weeks.
    Recent,
    /// Event `i` at `base + i × step` seconds: the index order is the time order.
    Steady { base: u64, step: u64 },
}

/// What a corpus looks like; every choice comes from `seed`, so only keys and signatures
/// differ between runs.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Distinct authors (keys).
    pub authors: usize,
    pub seed: u64,
    /// The content starts with this and the event's index.
    pub prefix: &'static str,
    /// Random words appended to a note's content.
    pub words: Range<usize>,
    /// Share of kind-7 reactions (content `+`, an `e` tag to a random id); the rest are
    /// kind-1 notes.
    pub reactions: f64,
    /// A `p` tag naming a random author on every event.
    pub p_tags: bool,
    pub times: Times,
}

impl Shape {
    /// Plain kind-1 notes of `authors` keys within the last four weeks.
    pub fn notes(authors: usize, seed: u64, prefix: &'static str) -> Self {
        Self {
            authors,
            seed,
            prefix,
            words: 0..0,
            reactions: 0.0,
            p_tags: false,
            times: Times::Recent,
        }
    }
}

/// Signed events and the keys that signed them.
pub struct Corpus {
    pub events: Vec<Event>,
    pub keys: Vec<Keys>,
}

/// What one event will be, decided up front so signing needs no shared RNG.
struct Spec {
    author: usize,
    kind: Kind,
    created_at: u64,
    p: Option<usize>,
    content: String,
    target: Option<EventId>,
}

/// The number of threads signing runs on: every core.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// `f(index, item)` for every item, split over every core, in order.
pub fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(usize, &T) -> R + Sync) -> Vec<R> {
    let chunk = items.len().div_ceil(cores()).max(1);
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(i, item)| f(c * chunk + i, item))
                        .collect::<Vec<R>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Generates `n` events of `shape` and signs them on every core.
pub fn generate(n: usize, shape: &Shape) -> anyhow::Result<Corpus> {
    let keys: Vec<Keys> = (0..shape.authors.max(1))
        .map(|_| Keys::generate())
        .collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut rng = StdRng::seed_from_u64(shape.seed);
    let specs: Vec<Spec> = (0..n)
        .map(|i| spec(i, shape, &mut rng, keys.len(), now))
        .collect();
    let events = par_map(&specs, |_, s| sign(s, &keys))
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    Ok(Corpus { events, keys })
}

fn spec(i: usize, shape: &Shape, rng: &mut StdRng, authors: usize, now: u64) -> Spec {
    let reaction = shape.reactions > 0.0 && rng.gen_bool(shape.reactions.min(1.0));
    let mut content = format!("{} {i}", shape.prefix);
    if !shape.words.is_empty() {
        content.push(':');
        for _ in 0..rng.gen_range(shape.words.clone()) {
            content.push(' ');
            content.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
        }
    }
    let created_at = match shape.times {
        Times::Recent => now - rng.gen_range(60..SPAN_SECS),
        Times::Steady { base, step } => base + i as u64 * step,
    };
    Spec {
        author: rng.gen_range(0..authors),
        kind: if reaction {
            Kind::Reaction
        } else {
            Kind::TextNote
        },
        created_at,
        p: shape.p_tags.then(|| rng.gen_range(0..authors)),
        content: if reaction { "+".into() } else { content },
        target: reaction.then(|| EventId::from_byte_array(rng.gen())),
    }
}

fn sign(s: &Spec, keys: &[Keys]) -> anyhow::Result<Event> {
    let mut tags = Vec::new();
    if let Some(p) = s.p {
        tags.push(Tag::public_key(keys[p].public_key()));
    }
    if let Some(target) = s.target {
        tags.push(Tag::event(target));
    }
    EventBuilder::new(s.kind, s.content.as_str())
        .tags(tags)
        .custom_created_at(Timestamp::from(s.created_at))
        .sign_with_keys(&keys[s.author])
        .context("signing an event")
}

/// Events saved between pauses by [`fill`] when asked to pause.
pub const FILL_CHUNK: usize = 25_000;

/// Saves every event with `concurrency` saves in flight (the SQLite writer commits them in
/// groups); fails unless each one is stored. With `pause`, it waits that long after every
/// [`FILL_CHUNK`] events: the store checkpoints its WAL in the background, and under an
/// unbroken stream of writes the WAL never restarts and grows without bound (gigabytes for a
/// million events).
pub async fn fill<'a>(
    store: &SharedStore,
    events: impl IntoIterator<Item = &'a Event>,
    concurrency: usize,
    pause: Option<Duration>,
) -> anyhow::Result<()> {
    let events: Vec<&Event> = events.into_iter().collect();
    let chunk = if pause.is_some() {
        FILL_CHUNK
    } else {
        events.len().max(1)
    };
    for (k, part) in events.chunks(chunk).enumerate() {
        if let (true, Some(p)) = (k > 0, pause) {
            tokio::time::sleep(p).await;
        }
        let mut saves = futures::stream::iter(part.iter().copied())
            .map(|e| {
                let store = store.clone();
                async move { (e.id, store.save_event(e).await) }
            })
            .buffer_unordered(concurrency.max(1));
        while let Some((id, outcome)) = saves.next().await {
            match outcome.with_context(|| format!("saving {id}"))? {
                SaveOutcome::Stored { .. } => {}
                other => anyhow::bail!("event {id} not stored: {other:?}"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_followed() {
        let shape = Shape {
            reactions: 0.5,
            p_tags: true,
            words: 3..5,
            ..Shape::notes(4, 7, "t")
        };
        let c = generate(200, &shape).unwrap();
        assert_eq!(c.events.len(), 200);
        assert_eq!(c.keys.len(), 4);
        let reactions = c.events.iter().filter(|e| e.kind == Kind::Reaction).count();
        assert!((50..150).contains(&reactions), "{reactions}");
        assert!(c.events.iter().all(|e| e.verify().is_ok()));
        let p_tags = |e: &Event| e.tags.iter().filter(|t| t.as_slice()[0] == "p").count();
        // nostr-sdk drops a `p` tag naming the author itself.
        assert!(c.events.iter().all(|e| p_tags(e) <= 1));
        assert!(c.events.iter().filter(|e| p_tags(e) == 1).count() > 100);
        let steady = Shape {
            times: Times::Steady {
                base: 1000,
                step: 26,
            },
            ..Shape::notes(2, 1, "s")
        };
        let c = generate(10, &steady).unwrap();
        let times: Vec<u64> = c.events.iter().map(|e| e.created_at.as_secs()).collect();
        assert_eq!(times, (0..10).map(|i| 1000 + i * 26).collect::<Vec<_>>());
        assert_eq!(c.events[3].content, "s 3");
    }
}
