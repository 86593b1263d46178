//! Live delivery: one consumer of the store's feed ([`orly_db::EventStore::watch`]) and one
//! index of every open subscription, in the style of strfry's `ActiveMonitors`.
//!
//! Each filter is indexed under its most selective field — its ids, else its authors, else the
//! values of its tag with the fewest values, else its kinds, else "the rest" — so an event is
//! tested only against the filters indexed under its id, its author, its tag values, its kind,
//! and the rest. The feed consumer does the matching and hands each match to the
//! subscription's [`Subscriber`] (the connection's outbox, which never blocks), so neither the
//! OK of an EVENT nor another connection waits for fan-out.
//!
//! A REQ hands over to the feed by serial ([`LiveSub`]): the subscription is registered
//! *buffering* before the stored query starts; the query reports the highest serial its
//! snapshot saw; after EOSE the subscription goes live, flushing what it buffered above that
//! serial. Stored events at or below it are in the stored answer and are never sent again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use nostr::Filter;
use orly_db::{RawEvent, SharedStore};
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;

/// A subscription's key in the index (unique in the process).
pub type SubKey = u64;

/// Live events a subscription may buffer while its stored query runs; past this it is closed
/// (the client asks again) rather than buffered without bound.
pub const HANDOVER_BUFFER: usize = 10_000;

/// The fields of an event that matching reads, parsed once per feed item.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub raw: Arc<RawEvent>,
    /// Single-letter tags with a value: (letter, first value).
    pub tags: Vec<(u8, String)>,
}

#[derive(Deserialize)]
struct TagsOnly {
    #[serde(default)]
    tags: Vec<Vec<String>>,
}

impl LiveEvent {
    /// Reads the tags out of the event's JSON (the other routing fields are on `raw`).
    pub fn new(raw: Arc<RawEvent>) -> Result<Self, serde_json::Error> {
        let parsed: TagsOnly = serde_json::from_str(&raw.json)?;
        let tags = parsed
            .tags
            .into_iter()
            .filter_map(|mut t| {
                if t.len() < 2 || t[0].len() != 1 || !t[0].as_bytes()[0].is_ascii_alphabetic() {
                    return None;
                }
                let letter = t[0].as_bytes()[0];
                Some((letter, t.swap_remove(1)))
            })
            .collect();
        Ok(Self { raw, tags })
    }

    /// Whether a connection authenticated as `authed` may see this event: non-privileged
    /// kinds always; privileged ones (DMs, gift wraps, …) only by their author, a `p`-tagged
    /// recipient, or one of `readers`. The same rule as [`orly_acl::privileged::may_see`].
    pub fn may_see(&self, authed: &[nostr::PublicKey], readers: &[nostr::PublicKey]) -> bool {
        if !orly_acl::privileged::is_privileged(nostr::Kind::from(self.raw.kind)) {
            return true;
        }
        authed.iter().any(|pk| {
            let key = pk.to_bytes();
            key == self.raw.pubkey
                || readers.contains(pk)
                || self
                    .tags
                    .iter()
                    .any(|(l, v)| *l == b'p' && *v == pk.to_hex())
        })
    }
}

/// A filter compiled for matching [`LiveEvent`]s: the semantics of
/// [`nostr::Filter::match_event`] (empty id, author and kind sets match everything; an empty
/// tag set matches nothing), without NIP-50 search, which this relay does not serve.
#[derive(Debug, Clone)]
pub struct LiveFilter {
    ids: Option<HashSet<[u8; 32]>>,
    authors: Option<HashSet<[u8; 32]>>,
    kinds: Option<HashSet<u16>>,
    tags: Vec<(u8, HashSet<String>)>,
    since: Option<u64>,
    until: Option<u64>,
}

/// Where a filter is indexed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Slot {
    Ids,
    Authors,
    Tag(u8),
    Kinds,
    Rest,
}

impl LiveFilter {
    pub fn new(f: &Filter) -> Self {
        let nonempty = |n: usize| n > 0;
        Self {
            ids: f
                .ids
                .as_ref()
                .filter(|s| nonempty(s.len()))
                .map(|s| s.iter().map(|i| i.to_bytes()).collect()),
            authors: f
                .authors
                .as_ref()
                .filter(|s| nonempty(s.len()))
                .map(|s| s.iter().map(|p| p.to_bytes()).collect()),
            kinds: f
                .kinds
                .as_ref()
                .filter(|s| nonempty(s.len()))
                .map(|s| s.iter().map(|k| k.as_u16()).collect()),
            tags: f
                .generic_tags
                .iter()
                .map(|(letter, values)| {
                    (
                        letter.as_char() as u8,
                        values.iter().cloned().collect::<HashSet<String>>(),
                    )
                })
                .collect(),
            since: f.since.map(|t| t.as_secs()),
            until: f.until.map(|t| t.as_secs()),
        }
    }

    pub fn matches(&self, e: &LiveEvent) -> bool {
        let raw = &e.raw;
        self.ids.as_ref().is_none_or(|s| s.contains(&raw.id))
            && self
                .authors
                .as_ref()
                .is_none_or(|s| s.contains(&raw.pubkey))
            && self.kinds.as_ref().is_none_or(|s| s.contains(&raw.kind))
            && self.since.is_none_or(|t| raw.created_at >= t)
            && self.until.is_none_or(|t| raw.created_at <= t)
            && self.tags.iter().all(|(letter, values)| {
                e.tags
                    .iter()
                    .any(|(l, v)| l == letter && values.contains(v.as_str()))
            })
    }

    /// The most selective field: the one whose values an event must hit exactly.
    fn slot(&self) -> Slot {
        if self.ids.is_some() {
            Slot::Ids
        } else if self.authors.is_some() {
            Slot::Authors
        } else if let Some((letter, _)) = self
            .tags
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .min_by_key(|(_, v)| v.len())
        {
            Slot::Tag(*letter)
        } else if self.kinds.is_some() {
            Slot::Kinds
        } else {
            Slot::Rest
        }
    }
}

/// Where a subscription's matches go: its connection. Called from the feed consumer, so it
/// must not block.
pub trait Subscriber: Send + Sync + 'static {
    /// Sends `event` on subscription `sub_id`. `false`: the connection is gone or closing.
    fn deliver(&self, sub_id: &str, event: &LiveEvent) -> bool;
}

enum SubState {
    /// The stored query runs; live events wait here.
    Buffering(Vec<LiveEvent>),
    /// Stored events up to `after` were in the stored answer.
    Live { after: u64 },
    /// Buffered more than [`HANDOVER_BUFFER`] events; the connection closes it.
    Overflowed,
}

/// One open subscription (a REQ's filters on one connection).
pub struct LiveSub {
    pub key: SubKey,
    pub sub_id: Arc<str>,
    filters: Vec<LiveFilter>,
    subscriber: Arc<dyn Subscriber>,
    state: Mutex<SubState>,
    /// The last stored serial the feed had dispatched when this subscription was registered:
    /// everything dispatched to it came later.
    registered_after: u64,
}

/// Why a subscription could not go live.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandoverError {
    #[error("error: too many new events while the stored query ran; send the REQ again")]
    Overflowed,
}

impl LiveSub {
    pub fn registered_after(&self) -> u64 {
        self.registered_after
    }

    fn offer(&self, event: &LiveEvent) {
        let mut state = self.state.lock();
        match &mut *state {
            SubState::Buffering(buf) => {
                if buf.len() >= HANDOVER_BUFFER {
                    *state = SubState::Overflowed;
                } else {
                    buf.push(event.clone());
                }
            }
            SubState::Live { after } => {
                // The feed may still carry events the stored answer already had.
                if event.raw.serial == 0 || event.raw.serial > *after {
                    self.subscriber.deliver(&self.sub_id, event);
                }
            }
            SubState::Overflowed => {}
        }
    }

    /// Ends the handover: the stored answer covered serials up to `after`; what was buffered
    /// above it is delivered now (under the lock, so it precedes anything newer).
    pub fn go_live(&self, after: u64) -> Result<(), HandoverError> {
        let mut state = self.state.lock();
        match std::mem::replace(&mut *state, SubState::Live { after }) {
            SubState::Buffering(buf) => {
                for e in buf {
                    if e.raw.serial == 0 || e.raw.serial > after {
                        self.subscriber.deliver(&self.sub_id, &e);
                    }
                }
                Ok(())
            }
            SubState::Live { after: old } => {
                *state = SubState::Live { after: old };
                Ok(())
            }
            SubState::Overflowed => {
                *state = SubState::Overflowed;
                Err(HandoverError::Overflowed)
            }
        }
    }
}

type Bucket = HashSet<(SubKey, u32)>;

#[derive(Default)]
struct Index {
    subs: HashMap<SubKey, Arc<LiveSub>>,
    ids: HashMap<[u8; 32], Bucket>,
    authors: HashMap<[u8; 32], Bucket>,
    tags: HashMap<u8, HashMap<String, Bucket>>,
    kinds: HashMap<u16, Bucket>,
    rest: Bucket,
}

fn add_to<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Bucket>, k: K, entry: (SubKey, u32)) {
    map.entry(k).or_default().insert(entry);
}

fn remove_from<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Bucket>, k: &K, entry: (SubKey, u32)) {
    if let Some(b) = map.get_mut(k) {
        b.remove(&entry);
        if b.is_empty() {
            map.remove(k);
        }
    }
}

impl Index {
    fn place(&mut self, key: SubKey, i: u32, f: &LiveFilter, add: bool) {
        let entry = (key, i);
        match f.slot() {
            Slot::Ids => {
                for id in f.ids.iter().flatten() {
                    if add {
                        add_to(&mut self.ids, *id, entry);
                    } else {
                        remove_from(&mut self.ids, id, entry);
                    }
                }
            }
            Slot::Authors => {
                for a in f.authors.iter().flatten() {
                    if add {
                        add_to(&mut self.authors, *a, entry);
                    } else {
                        remove_from(&mut self.authors, a, entry);
                    }
                }
            }
            Slot::Tag(letter) => {
                let values = f
                    .tags
                    .iter()
                    .filter(|(l, v)| *l == letter && !v.is_empty())
                    .min_by_key(|(_, v)| v.len())
                    .map(|(_, v)| v);
                let by_value = self.tags.entry(letter).or_default();
                for v in values.into_iter().flatten() {
                    if add {
                        by_value.entry(v.clone()).or_default().insert(entry);
                    } else {
                        remove_from(by_value, v, entry);
                    }
                }
                if by_value.is_empty() {
                    self.tags.remove(&letter);
                }
            }
            Slot::Kinds => {
                for k in f.kinds.iter().flatten() {
                    if add {
                        add_to(&mut self.kinds, *k, entry);
                    } else {
                        remove_from(&mut self.kinds, k, entry);
                    }
                }
            }
            Slot::Rest => {
                if add {
                    self.rest.insert(entry);
                } else {
                    self.rest.remove(&entry);
                }
            }
        }
    }

    /// The subscriptions `e` matches, each once.
    fn matching(&self, e: &LiveEvent) -> Vec<Arc<LiveSub>> {
        let mut seen: HashSet<SubKey> = HashSet::new();
        let mut out = Vec::new();
        let mut check = |bucket: &Bucket| {
            for (key, i) in bucket {
                if seen.contains(key) {
                    continue;
                }
                let Some(sub) = self.subs.get(key) else {
                    continue;
                };
                if sub.filters[*i as usize].matches(e) {
                    seen.insert(*key);
                    out.push(sub.clone());
                }
            }
        };
        if let Some(b) = self.ids.get(&e.raw.id) {
            check(b);
        }
        if let Some(b) = self.authors.get(&e.raw.pubkey) {
            check(b);
        }
        for (letter, value) in &e.tags {
            if let Some(b) = self.tags.get(letter).and_then(|m| m.get(value.as_str())) {
                check(b);
            }
        }
        if let Some(b) = self.kinds.get(&e.raw.kind) {
            check(b);
        }
        check(&self.rest);
        out
    }
}

/// Something else the feed consumer serves: stored events of the kinds it wants, after they
/// were stored (the special kinds' side effects, [`crate::sync::SideEffects`]).
pub trait FeedTap: Send + Sync + 'static {
    fn wants(&self, kind: u16) -> bool;
    /// Called from the feed consumer: must not block (spawn the work).
    fn stored(&self, event: Arc<RawEvent>);
}

/// Every open subscription of the process, and the feed position.
pub struct LiveIndex {
    index: RwLock<Index>,
    next: AtomicU64,
    /// The last stored serial dispatched (set after its dispatch).
    position: AtomicU64,
    /// The serial the feed consumer started after (`None` until it has started): a REQ waits
    /// for it, so its handover serial is never below the feed's start.
    started: tokio::sync::watch::Sender<Option<u64>>,
}

impl Default for LiveIndex {
    fn default() -> Self {
        Self {
            index: RwLock::new(Index::default()),
            next: AtomicU64::new(1),
            position: AtomicU64::new(0),
            started: tokio::sync::watch::channel(None).0,
        }
    }
}

impl LiveIndex {
    /// Registers a subscription, buffering until [`LiveSub::go_live`].
    pub fn subscribe(
        &self,
        sub_id: &str,
        filters: &[Filter],
        subscriber: Arc<dyn Subscriber>,
    ) -> Arc<LiveSub> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let mut index = self.index.write();
        let sub = Arc::new(LiveSub {
            registered_after: self.position.load(Ordering::SeqCst),
            key,
            sub_id: sub_id.into(),
            filters: filters.iter().map(LiveFilter::new).collect(),
            subscriber,
            state: Mutex::new(SubState::Buffering(Vec::new())),
        });
        for (i, f) in sub.filters.iter().enumerate() {
            index.place(key, i as u32, f, true);
        }
        index.subs.insert(key, sub.clone());
        metrics::gauge!("orly_subscriptions").increment(1.0);
        sub
    }

    pub fn unsubscribe(&self, key: SubKey) {
        let mut index = self.index.write();
        if let Some(sub) = index.subs.remove(&key) {
            for (i, f) in sub.filters.iter().enumerate() {
                index.place(key, i as u32, f, false);
            }
            metrics::gauge!("orly_subscriptions").decrement(1.0);
        }
    }

    /// Open subscriptions.
    pub fn len(&self) -> usize {
        self.index.read().subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands `event` to every subscription it matches; the number matched.
    pub fn dispatch(&self, event: &LiveEvent) -> usize {
        let subs = self.index.read().matching(event);
        for s in &subs {
            s.offer(event);
        }
        subs.len()
    }

    fn note_dispatched(&self, raw: &RawEvent) {
        if raw.serial != 0 {
            self.position.store(raw.serial, Ordering::SeqCst);
        }
    }

    /// Waits until the feed consumer runs (see [`LiveIndex::started`]).
    pub async fn wait_started(&self) -> u64 {
        let mut rx = self.started.subscribe();
        let started = match rx.wait_for(|s| s.is_some()).await {
            Ok(s) => s.unwrap_or(0),
            Err(_) => 0,
        };
        started
    }

    /// Consumes the store's feed for as long as the relay runs: from the store's latest
    /// serial when it first answers, then every stored and ephemeral event in feed order.
    pub async fn run_feed(self: Arc<Self>, store: SharedStore, tap: Option<Arc<dyn FeedTap>>) {
        let mut delay = std::time::Duration::from_millis(100);
        let after = loop {
            match store.latest_serial().await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, "store unavailable; live feed not started yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
            }
        };
        let mut feed = store.watch(after);
        self.position.store(after, Ordering::SeqCst);
        self.started.send_replace(Some(after));
        tracing::info!(after, "live feed running");
        while let Some(raw) = feed.next().await {
            if let Some(tap) = &tap {
                if raw.serial != 0 && tap.wants(raw.kind) {
                    tap.stored(raw.clone());
                }
            }
            if self.is_empty() {
                self.note_dispatched(&raw);
                continue;
            }
            let started = std::time::Instant::now();
            let raw_ref = raw.clone();
            match LiveEvent::new(raw) {
                Ok(e) => {
                    let n = self.dispatch(&e);
                    metrics::histogram!("orly_fanout_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("orly_fanout_deliveries_total").increment(n as u64);
                }
                Err(e) => tracing::warn!(error = %e, "feed event with unreadable tags skipped"),
            }
            self.note_dispatched(&raw_ref);
        }
        tracing::warn!("the store's feed ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, JsonUtil, Keys, Kind, Tag, Timestamp};
    use proptest::prelude::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<(String, u64, [u8; 32])>>);

    impl Subscriber for Collect {
        fn deliver(&self, sub_id: &str, e: &LiveEvent) -> bool {
            self.0
                .lock()
                .push((sub_id.to_string(), e.raw.serial, e.raw.id));
            true
        }
    }

    fn keys(n: usize) -> Vec<Keys> {
        (0..n).map(|_| Keys::generate()).collect()
    }

    fn event(
        k: &Keys,
        kind: u16,
        at: u64,
        tags: Vec<Tag>,
        serial: u64,
    ) -> (nostr::Event, LiveEvent) {
        let ev = EventBuilder::new(Kind::from(kind), "x")
            .tags(tags)
            .custom_created_at(Timestamp::from(at))
            .sign_with_keys(k)
            .unwrap();
        let raw = Arc::new(RawEvent::new(serial, &ev, ev.as_json()));
        (ev, LiveEvent::new(raw).unwrap())
    }

    #[test]
    fn handover_drops_what_the_stored_answer_had_and_keeps_order() {
        let idx = LiveIndex::default();
        let out = Arc::new(Collect::default());
        let k = Keys::generate();
        let sub = idx.subscribe("s", &[Filter::new().kind(Kind::from(1))], out.clone());
        let evs: Vec<_> = (1..=5)
            .map(|s| event(&k, 1, 100 + s, vec![], s).1)
            .collect();
        for e in &evs[..3] {
            idx.dispatch(e);
        }
        assert!(out.0.lock().is_empty(), "nothing live before EOSE");
        sub.go_live(2).unwrap();
        // The feed repeats serial 2 (the consumer was behind): not sent again.
        idx.dispatch(&evs[1]);
        idx.dispatch(&evs[3]);
        idx.dispatch(&evs[4]);
        let got: Vec<u64> = out.0.lock().iter().map(|(_, s, _)| *s).collect();
        assert_eq!(got, vec![3, 4, 5]);
        idx.unsubscribe(sub.key);
        idx.dispatch(&event(&k, 1, 200, vec![], 6).1);
        assert_eq!(out.0.lock().len(), 3);
        assert!(idx.is_empty());
    }

    #[test]
    fn a_handover_buffer_that_overflows_closes_the_subscription() {
        let idx = LiveIndex::default();
        let out = Arc::new(Collect::default());
        let k = Keys::generate();
        let sub = idx.subscribe("s", &[Filter::new()], out.clone());
        let (_, e) = event(&k, 1, 1, vec![], 1);
        for _ in 0..=HANDOVER_BUFFER {
            idx.dispatch(&e);
        }
        assert_eq!(sub.go_live(0), Err(HandoverError::Overflowed));
        assert!(out.0.lock().is_empty());
    }

    #[test]
    fn ephemeral_events_pass_any_handover_serial() {
        let idx = LiveIndex::default();
        let out = Arc::new(Collect::default());
        let k = Keys::generate();
        let sub = idx.subscribe("s", &[Filter::new()], out.clone());
        idx.dispatch(&event(&k, 20001, 1, vec![], 0).1);
        sub.go_live(50).unwrap();
        idx.dispatch(&event(&k, 20001, 2, vec![], 0).1);
        assert_eq!(out.0.lock().len(), 2);
    }

    #[test]
    fn privileged_events_reach_only_their_parties() {
        let (a, b, c) = (Keys::generate(), Keys::generate(), Keys::generate());
        let (_, dm) = event(&a, 4, 1, vec![Tag::public_key(b.public_key())], 1);
        assert!(dm.may_see(&[a.public_key()], &[]));
        assert!(dm.may_see(&[b.public_key()], &[]));
        assert!(!dm.may_see(&[c.public_key()], &[]));
        assert!(!dm.may_see(&[], &[]));
        assert!(dm.may_see(&[c.public_key()], &[c.public_key()]));
        let (_, note) = event(&a, 1, 1, vec![], 2);
        assert!(note.may_see(&[], &[]));
    }

    /// A small world of keys, kinds, times and tag values, so random filters and events meet.
    struct World {
        keys: Vec<Keys>,
    }

    const KINDS: &[u16] = &[0, 1, 4, 7, 20001, 30023];
    const VALUES: &[&str] = &["a", "b", "c", "d"];
    const LETTERS: &[char] = &['e', 'p', 't', 'd', 'P'];

    fn arb_tags(world_keys: usize) -> impl Strategy<Value = Vec<(usize, usize, bool)>> {
        // (letter index, value index, value is a pubkey of the world)
        proptest::collection::vec(
            (
                0..LETTERS.len(),
                0..world_keys.max(VALUES.len()),
                any::<bool>(),
            ),
            0..4,
        )
    }

    fn tag_value(w: &World, v: usize, pk: bool) -> String {
        if pk {
            w.keys[v % w.keys.len()].public_key().to_hex()
        } else {
            VALUES[v % VALUES.len()].to_string()
        }
    }

    #[derive(Debug, Clone)]
    struct FilterSpec {
        ids: Option<Vec<usize>>,
        authors: Option<Vec<usize>>,
        kinds: Option<Vec<usize>>,
        tags: Vec<(usize, Vec<(usize, bool)>)>,
        since: Option<u64>,
        until: Option<u64>,
    }

    fn arb_filter() -> impl Strategy<Value = FilterSpec> {
        let set = |n: usize| proptest::option::weighted(0.3, proptest::collection::vec(0..n, 0..3));
        (
            set(12),
            set(4),
            set(KINDS.len()),
            proptest::collection::vec(
                (
                    0..LETTERS.len(),
                    proptest::collection::vec((0..4usize, any::<bool>()), 0..3),
                ),
                0..2,
            ),
            proptest::option::weighted(0.3, 0u64..20),
            proptest::option::weighted(0.3, 0u64..20),
        )
            .prop_map(|(ids, authors, kinds, tags, since, until)| FilterSpec {
                ids,
                authors,
                kinds,
                tags,
                since,
                until,
            })
    }

    fn build_filter(w: &World, events: &[nostr::Event], s: &FilterSpec) -> Filter {
        let mut f = Filter::new();
        if let Some(ids) = &s.ids {
            f.ids = Some(
                ids.iter()
                    .filter_map(|i| events.get(*i).map(|e| e.id))
                    .collect(),
            );
        }
        if let Some(a) = &s.authors {
            f.authors = Some(
                a.iter()
                    .map(|i| w.keys[*i % w.keys.len()].public_key())
                    .collect(),
            );
        }
        if let Some(k) = &s.kinds {
            f.kinds = Some(k.iter().map(|i| Kind::from(KINDS[*i])).collect());
        }
        for (letter, values) in &s.tags {
            let letter = nostr::SingleLetterTag::from_char(LETTERS[*letter]).unwrap();
            let values: std::collections::BTreeSet<String> =
                values.iter().map(|(v, pk)| tag_value(w, *v, *pk)).collect();
            f.generic_tags.insert(letter, values);
        }
        f.since = s.since.map(Timestamp::from);
        f.until = s.until.map(Timestamp::from);
        f
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// The index delivers exactly what a brute-force match of every filter against every
        /// event (nostr's own `Filter::match_event`) says, once per subscription.
        #[test]
        fn index_agrees_with_brute_force(
            specs in proptest::collection::vec(proptest::collection::vec(arb_filter(), 1..3), 1..12),
            evspecs in proptest::collection::vec((0..4usize, 0..KINDS.len(), 0u64..20, arb_tags(4)), 1..12),
        ) {
            let w = World { keys: keys(4) };
            let events: Vec<(nostr::Event, LiveEvent)> = evspecs
                .iter()
                .enumerate()
                .map(|(i, (k, kind, at, tags))| {
                    let tags = tags
                        .iter()
                        .map(|(l, v, pk)| {
                            Tag::parse([LETTERS[*l].to_string(), tag_value(&w, *v, *pk)]).unwrap()
                        })
                        .collect();
                    event(&w.keys[*k], KINDS[*kind], *at, tags, i as u64 + 1)
                })
                .collect();
            let nostr_events: Vec<nostr::Event> = events.iter().map(|(e, _)| e.clone()).collect();
            let idx = LiveIndex::default();
            let out = Arc::new(Collect::default());
            let mut subs = Vec::new();
            for (n, spec) in specs.iter().enumerate() {
                let filters: Vec<Filter> =
                    spec.iter().map(|s| build_filter(&w, &nostr_events, s)).collect();
                let sub = idx.subscribe(&format!("s{n}"), &filters, out.clone());
                sub.go_live(0).unwrap();
                subs.push((format!("s{n}"), filters));
            }
            for (_, e) in &events {
                idx.dispatch(e);
            }
            let mut want = Vec::new();
            for (ev, live) in &events {
                for (name, filters) in &subs {
                    if filters.iter().any(|f| f.match_event(ev, nostr::filter::MatchEventOptions::default())) {
                        want.push((name.clone(), live.raw.serial, live.raw.id));
                    }
                }
            }
            let mut got = out.0.lock().clone();
            got.sort();
            want.sort();
            prop_assert_eq!(got, want);
        }
    }
}
