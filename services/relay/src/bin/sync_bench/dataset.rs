//! The catch-up events: signed once on every core, and saved straight into a store.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::StreamExt;
use nostr::{Event, EventBuilder, Keys, Timestamp};
use orly_db::{SaveOutcome, SharedStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Events spread over this many seconds before now (four weeks).
const SPAN_SECS: u64 = 28 * 86_400;
const SEED: u64 = 0x5eed_5ca7;
const WORDS: &[&str] = &[
    "nostr", "relay", "sync", "peer", "cluster", "serial", "catch", "up", "orly", "sqlite",
    "event", "note", "hello", "world", "gm", "zap",
];

/// `n` kind-1 notes by `authors` distinct keys, `created_at` spread over the last four weeks,
/// signed on every core.
pub fn generate(n: usize, authors: usize) -> anyhow::Result<Vec<Event>> {
    let keys: Vec<Keys> = (0..authors.max(1)).map(|_| Keys::generate()).collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let threads = crate::cores();
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let keys = &keys;
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(SEED ^ t as u64);
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(|i| {
                            let mut content = format!("sync bench note {i}:");
                            for _ in 0..rng.gen_range(3..20) {
                                content.push(' ');
                                content.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
                            }
                            EventBuilder::text_note(content)
                                .custom_created_at(Timestamp::from(
                                    now - rng.gen_range(60..SPAN_SECS),
                                ))
                                .sign_with_keys(&keys[rng.gen_range(0..keys.len())])
                                .context("signing an event")
                        })
                        .collect::<anyhow::Result<Vec<Event>>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a signing thread panicked"))??,
            );
        }
        Ok(all)
    })
}

/// Saves every event with `concurrency` saves in flight (the SQLite writer commits them in
/// groups); fails unless each one is stored.
pub async fn fill(store: &SharedStore, events: &[Event], concurrency: usize) -> anyhow::Result<()> {
    let mut saves = futures::stream::iter(events)
        .map(|e| {
            let store = store.clone();
            async move { (e.id, store.save_event(e).await) }
        })
        .buffer_unordered(concurrency);
    while let Some((id, outcome)) = saves.next().await {
        match outcome.with_context(|| format!("saving {id}"))? {
            SaveOutcome::Stored { .. } => {}
            other => anyhow::bail!("event {id} not stored: {other:?}"),
        }
    }
    Ok(())
}
