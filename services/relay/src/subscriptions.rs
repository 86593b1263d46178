//! Live subscriptions of every connection, and fan-out of new events to them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nostr::filter::MatchEventOptions;
use nostr::{Event, Filter};
use parking_lot::RwLock;
use tokio::sync::{mpsc, Notify};

use crate::message::event_message;

/// One connection's outbound side as the registry sees it.
pub struct ConnHandle {
    subs: RwLock<HashMap<String, Arc<Vec<Filter>>>>,
    tx: mpsc::Sender<String>,
    /// Signalled when the connection must be dropped (its send queue overflowed).
    pub kill: Notify,
}

impl ConnHandle {
    pub fn new(tx: mpsc::Sender<String>) -> Self {
        Self {
            subs: RwLock::new(HashMap::new()),
            tx,
            kill: Notify::new(),
        }
    }

    /// Adds or replaces a subscription; returns the number open afterwards.
    pub fn subscribe(&self, id: &str, filters: Vec<Filter>) -> usize {
        let mut subs = self.subs.write();
        subs.insert(id.to_string(), Arc::new(filters));
        subs.len()
    }

    pub fn unsubscribe(&self, id: &str) -> bool {
        self.subs.write().remove(id).is_some()
    }

    pub fn has(&self, id: &str) -> bool {
        self.subs.read().contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.subs.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.read().is_empty()
    }
}

/// Every connection's subscriptions.
#[derive(Default)]
pub struct Registry {
    conns: RwLock<HashMap<u64, Arc<ConnHandle>>>,
    next_id: AtomicU64,
}

impl Registry {
    pub fn register(&self, handle: Arc<ConnHandle>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns.write().insert(id, handle);
        id
    }

    pub fn unregister(&self, id: u64) {
        self.conns.write().remove(&id);
    }

    pub fn connections(&self) -> usize {
        self.conns.read().len()
    }

    /// Sends `event` to every subscription it matches. A connection whose queue is full is
    /// told to close rather than buffered without bound: a slow reader loses its connection,
    /// not the relay its memory.
    pub fn broadcast(&self, event: &Event) -> usize {
        // Serialized once, and only if some subscription wants the event.
        let mut json: Option<String> = None;
        let conns: Vec<Arc<ConnHandle>> = self.conns.read().values().cloned().collect();
        let mut delivered = 0;
        for conn in conns {
            let matching: Vec<String> = conn
                .subs
                .read()
                .iter()
                .filter(|(_, filters)| {
                    filters
                        .iter()
                        .any(|f| f.match_event(event, MatchEventOptions::default()))
                })
                .map(|(id, _)| id.clone())
                .collect();
            for sub in matching {
                let json = json.get_or_insert_with(|| nostr::JsonUtil::as_json(event));
                match conn.tx.try_send(event_message(&sub, json)) {
                    Ok(()) => delivered += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        metrics::counter!("orly_slow_consumers_dropped_total").increment(1);
                        conn.kill.notify_one();
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        }
        delivered
    }
}
