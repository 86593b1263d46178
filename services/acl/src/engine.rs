//! [`AclEngine`]: the access decisions of every mode, over an event store. Follow sets and
//! managed lists live in memory; managed lists are written through to storage markers
//! (`acl:<list>:<key>` → JSON `{reason, added}`) and follow sets are rebuilt from the
//! admins' latest kind 3 events.
//!
//! Several engines (orly-acl replicas, or relays with an in-process ACL) may share one store
//! and converge: every change also rewrites the marker `acl:version` with a value never used
//! before, and [`AclEngine::spawn_refresher_with`] reads that one marker every check interval
//! (`ORLY_ACL_REFRESH_INTERVAL`, 5 s), reloading the lists when it moved, and asks the store
//! for admins' kind 3 events newer than the ones applied. A change made through any engine is
//! enforced by every engine within one check interval.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nostr::{Event, Filter, Kind, PublicKey, Timestamp};
use orly_common::acl::{AccessContext, Acl, Decision};
use orly_common::time::now_secs_i64 as now_secs;
use orly_db::SharedStore;
use parking_lot::RwLock;

use crate::{AclAdmin, AclError, Level, ListEntry, ListKind, Mode};

/// How long a caller may reuse a cacheable decision.
pub const DECISION_CACHE_TTL: Duration = Duration::from_secs(5);
/// Retry interval while the lists cannot be loaded (store unreachable).
const LOAD_RETRY: Duration = Duration::from_secs(2);
/// How often an engine looks for changes made by another one (`ORLY_ACL_REFRESH_INTERVAL`).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest check interval accepted (a busy loop against the store otherwise).
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Rewritten with a fresh value by every change of the shared state.
pub const VERSION_MARKER: &str = "acl:version";
/// The peer relays' identities (`UpdatePeerAdmins`): a JSON array of hex pubkeys.
pub const PEER_ADMINS_MARKER: &str = "acl:peer_admins";
/// Pubkeys followed through `AddFollow`, one marker each: `acl:follow:<hex>`.
pub const FOLLOW_PREFIX: &str = "acl:follow:";

/// The engine's settings (`ORLY_ACL_MODE`, `ORLY_OWNERS`, `ORLY_ADMINS`,
/// `ORLY_FOLLOW_LIST_FREQUENCY`).
#[derive(Debug, Clone)]
pub struct AclConfig {
    pub mode: Mode,
    pub owners: Vec<PublicKey>,
    pub admins: Vec<PublicKey>,
    /// How often follow sets (mode follows) and lists (mode managed) are re-read.
    pub refresh_interval: Duration,
}

impl Default for AclConfig {
    fn default() -> Self {
        Self {
            mode: Mode::None,
            owners: Vec::new(),
            admins: Vec::new(),
            refresh_interval: Duration::from_secs(3600),
        }
    }
}

/// A write decision and whether it may be reused for the same (identity, address, author,
/// kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteDecision {
    pub decision: Decision,
    pub cacheable: bool,
}

#[derive(Default)]
struct State {
    loaded: bool,
    /// Latest follow list per admin/owner: its created_at and the `p` tags.
    follow_lists: HashMap<PublicKey, (Timestamp, HashSet<PublicKey>)>,
    /// Union of `follow_lists` and `extra_follows`.
    followed: HashSet<PublicKey>,
    /// Added with the `AddFollow` RPC (stored under [`FOLLOW_PREFIX`]).
    extra_follows: HashSet<PublicKey>,
    /// Peer relays' identities, treated as admins (`UpdatePeerAdmins`).
    peer_admins: HashSet<PublicKey>,
    lists: HashMap<ListKind, BTreeMap<String, ListEntry>>,
    /// The value of [`VERSION_MARKER`] the shared state was last read at.
    version: Option<Vec<u8>>,
}

impl State {
    fn rebuild_followed(&mut self) {
        let mut all: HashSet<PublicKey> = self.extra_follows.clone();
        for (_, set) in self.follow_lists.values() {
            all.extend(set.iter().copied());
        }
        self.followed = all;
    }

    fn contains(&self, list: ListKind, key: &str) -> bool {
        self.lists.get(&list).is_some_and(|l| l.contains_key(key))
    }

    fn is_empty(&self, list: ListKind) -> bool {
        self.lists.get(&list).is_none_or(|l| l.is_empty())
    }
}

/// Access control over a store. Cheap to share (`Arc`); all methods are safe concurrently.
pub struct AclEngine {
    mode: Mode,
    owners: HashSet<PublicKey>,
    admins: HashSet<PublicKey>,
    refresh_interval: Duration,
    store: SharedStore,
    state: RwLock<State>,
    /// Serializes list changes and reloads so storage and memory agree.
    writes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for AclEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclEngine")
            .field("mode", &self.mode)
            .field("owners", &self.owners.len())
            .field("admins", &self.admins.len())
            .finish()
    }
}

impl AclEngine {
    /// An engine that has not loaded anything yet; call [`AclEngine::load`] (or
    /// [`AclEngine::spawn_refresher`]). Until loaded, modes other than `none` fail closed.
    pub fn new(config: AclConfig, store: SharedStore) -> Arc<Self> {
        Arc::new(Self {
            mode: config.mode,
            owners: config.owners.into_iter().collect(),
            admins: config.admins.into_iter().collect(),
            refresh_interval: config.refresh_interval,
            store,
            state: RwLock::new(State {
                loaded: config.mode == Mode::None,
                ..State::default()
            }),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    /// Creates the engine and loads it, failing when the store does not answer.
    pub async fn open(config: AclConfig, store: SharedStore) -> Result<Arc<Self>, AclError> {
        let engine = Self::new(config, store);
        engine.load().await?;
        Ok(engine)
    }

    pub fn mode_value(&self) -> Mode {
        self.mode
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// True once the lists and follow sets are loaded (always in mode `none`).
    pub fn is_loaded(&self) -> bool {
        self.state.read().loaded
    }

    /// Readiness: loaded and the store answers.
    pub async fn ready(&self) -> bool {
        self.is_loaded() && self.store.ping().await.is_ok()
    }

    /// (Re)reads everything the mode needs from storage.
    pub async fn load(&self) -> Result<(), AclError> {
        match self.mode {
            Mode::None => {}
            Mode::Follows => {
                self.reload_shared().await?;
                self.refresh_follows().await?;
            }
            Mode::Managed => self.reload_shared().await?,
        }
        self.state.write().loaded = true;
        Ok(())
    }

    /// Loads in the background (retrying while the store is down), then looks for changes
    /// made elsewhere every [`DEFAULT_CHECK_INTERVAL`] and reloads everything every
    /// `refresh_interval`.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        self.spawn_refresher_with(DEFAULT_CHECK_INTERVAL)
    }

    /// [`AclEngine::spawn_refresher`] with a check interval of `check_every`
    /// ([`AclEngine::check_changes`]: one marker read, plus in mode follows one query for
    /// newer admin follow lists). The full reload every `refresh_interval` also drops what a
    /// check cannot see (a deleted follow list).
    pub fn spawn_refresher_with(
        self: &Arc<Self>,
        check_every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        let check_every = check_every.max(MIN_CHECK_INTERVAL);
        tokio::spawn(async move {
            loop {
                let Some(e) = engine.upgrade() else { return };
                match e.load().await {
                    Ok(()) => break,
                    Err(err) => {
                        tracing::warn!(error = %err, "loading ACL state failed; retrying");
                    }
                }
                drop(e);
                tokio::time::sleep(LOAD_RETRY).await;
            }
            let mut loaded_at = Instant::now();
            let mut failing = false;
            loop {
                tokio::time::sleep(check_every).await;
                let Some(e) = engine.upgrade() else { return };
                if e.mode == Mode::None {
                    return;
                }
                let full = loaded_at.elapsed() >= e.refresh_interval.max(Duration::from_secs(1));
                let result = if full {
                    e.load().await.map(|()| {
                        loaded_at = Instant::now();
                        true
                    })
                } else {
                    e.check_changes().await
                };
                match result {
                    Ok(changed) => {
                        if failing {
                            tracing::info!("ACL state readable again");
                            failing = false;
                        }
                        if changed {
                            tracing::debug!(full, "ACL state reloaded");
                        }
                    }
                    // Decisions go on from memory; said once per outage, not every check.
                    Err(err) if !failing => {
                        tracing::warn!(error = %err, "checking for ACL changes failed; keeping the state in memory");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        })
    }

    /// Looks for changes made through other engines on the same store: reloads the lists
    /// when [`VERSION_MARKER`] moved and, in mode follows, applies admins' follow lists newer
    /// than the ones in memory. True if anything was reloaded or applied.
    pub async fn check_changes(&self) -> Result<bool, AclError> {
        let mut changed = false;
        if self.mode == Mode::None {
            return Ok(false);
        }
        let version = self
            .store
            .get_marker(VERSION_MARKER)
            .await
            .map_err(unavailable)?;
        if version != self.state.read().version {
            self.reload_shared().await?;
            changed = true;
        }
        if self.mode == Mode::Follows {
            changed |= self.apply_newer_follow_lists().await?;
        }
        Ok(changed)
    }

    /// Queries the store for admins' follow lists newer than the applied ones (nothing in
    /// the steady state) and applies them.
    async fn apply_newer_follow_lists(&self) -> Result<bool, AclError> {
        let filters: Vec<Filter> = {
            let st = self.state.read();
            self.list_keepers()
                .into_iter()
                .map(|k| {
                    let f = Filter::new().kind(Kind::ContactList).author(k).limit(1);
                    match st.follow_lists.get(&k) {
                        Some((at, _)) => f.since(Timestamp::from(at.as_secs() + 1)),
                        None => f,
                    }
                })
                .collect()
        };
        if filters.is_empty() {
            return Ok(false);
        }
        let events = self.store.query(&filters).await.map_err(unavailable)?;
        let mut applied = false;
        for e in &events {
            applied |= self.apply_stored_event(e);
        }
        if applied {
            tracing::info!(lists = events.len(), "newer admin follow lists applied");
        }
        Ok(applied)
    }

    /// Writes a fresh [`VERSION_MARKER`] after a change, so other engines reload.
    async fn bump_version(&self) -> Result<(), AclError> {
        let value = format!("{}:{:032x}", now_secs(), rand::random::<u128>());
        self.store
            .set_marker(VERSION_MARKER, value.as_bytes())
            .await
            .map_err(unavailable)
    }

    /// The pubkeys whose follow lists count: owners and admins.
    fn list_keepers(&self) -> Vec<PublicKey> {
        self.owners.union(&self.admins).copied().collect()
    }

    /// Rebuilds the follow sets from the admins' latest kind 3 events, dropping anyone no
    /// longer followed. Returns how many pubkeys are followed.
    pub async fn refresh_follows(&self) -> Result<usize, AclError> {
        let keepers = self.list_keepers();
        let mut fresh: HashMap<PublicKey, (Timestamp, HashSet<PublicKey>)> = HashMap::new();
        if !keepers.is_empty() {
            let filter = Filter::new().kind(Kind::ContactList).authors(keepers);
            let events = self.store.query(&[filter]).await.map_err(unavailable)?;
            for e in events {
                let newer = fresh
                    .get(&e.pubkey)
                    .is_none_or(|(at, _)| e.created_at > *at);
                if newer {
                    fresh.insert(e.pubkey, (e.created_at, follow_set(&e)));
                }
            }
        }
        let mut st = self.state.write();
        // A list applied while the query ran may be newer than what it returned.
        for (admin, (at, set)) in st.follow_lists.drain() {
            if fresh.get(&admin).is_none_or(|(f, _)| at > *f) {
                fresh.insert(admin, (at, set));
            }
        }
        st.follow_lists = fresh;
        st.rebuild_followed();
        Ok(st.followed.len())
    }

    /// Applies a stored event: an admin's newer follow list replaces the old one at once.
    pub fn apply_stored_event(&self, event: &Event) -> bool {
        if self.mode != Mode::Follows || event.kind != Kind::ContactList {
            return false;
        }
        if !self.owners.contains(&event.pubkey) && !self.admins.contains(&event.pubkey) {
            return false;
        }
        let mut st = self.state.write();
        let newer = st
            .follow_lists
            .get(&event.pubkey)
            .is_none_or(|(at, _)| event.created_at >= *at);
        if newer {
            st.follow_lists
                .insert(event.pubkey, (event.created_at, follow_set(event)));
            st.rebuild_followed();
        }
        newer
    }

    /// Every followed pubkey (mode follows).
    pub fn followed_pubkeys(&self) -> Vec<PublicKey> {
        let mut v: Vec<PublicKey> = self.state.read().followed.iter().copied().collect();
        v.sort();
        v
    }

    /// Adds a followed pubkey (the `AddFollow` RPC), stored so every engine on the store
    /// follows it too.
    pub async fn add_follow(&self, pubkey: PublicKey) -> Result<(), AclError> {
        let _guard = self.writes.lock().await;
        if self.state.read().extra_follows.contains(&pubkey) {
            return Ok(());
        }
        self.store
            .set_marker(&format!("{FOLLOW_PREFIX}{}", pubkey.to_hex()), b"{}")
            .await
            .map_err(unavailable)?;
        self.bump_version().await?;
        let mut st = self.state.write();
        st.extra_follows.insert(pubkey);
        st.followed.insert(pubkey);
        Ok(())
    }

    /// Replaces the peer relays' identities, which get the admin level; stored so every
    /// engine on the store agrees. Unchanged sets write nothing.
    pub async fn set_peer_admins(&self, peers: Vec<PublicKey>) -> Result<(), AclError> {
        let peers: HashSet<PublicKey> = peers.into_iter().collect();
        let _guard = self.writes.lock().await;
        if self.state.read().peer_admins == peers {
            return Ok(());
        }
        let mut hex: Vec<String> = peers.iter().map(PublicKey::to_hex).collect();
        hex.sort();
        let value = serde_json::to_vec(&hex).map_err(|e| AclError::Config(e.to_string()))?;
        self.store
            .set_marker(PEER_ADMINS_MARKER, &value)
            .await
            .map_err(unavailable)?;
        self.bump_version().await?;
        self.state.write().peer_admins = peers;
        Ok(())
    }

    /// Rereads everything engines share through the store: the managed lists (mode
    /// managed), the peer admins and the `AddFollow` pubkeys. The version is read first, so a
    /// change landing meanwhile is seen again at the next check.
    async fn reload_shared(&self) -> Result<(), AclError> {
        let _guard = self.writes.lock().await;
        let version = self
            .store
            .get_marker(VERSION_MARKER)
            .await
            .map_err(unavailable)?;
        let lists = if self.mode == Mode::Managed {
            Some(self.read_lists().await?)
        } else {
            None
        };
        let peer_admins: HashSet<PublicKey> = match self
            .store
            .get_marker(PEER_ADMINS_MARKER)
            .await
            .map_err(unavailable)?
        {
            None => HashSet::new(),
            Some(v) => serde_json::from_slice::<Vec<String>>(&v)
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "unreadable {PEER_ADMINS_MARKER}; no peer admins");
                    Vec::new()
                })
                .iter()
                .filter_map(|h| PublicKey::from_hex(h).ok())
                .collect(),
        };
        let follows: HashSet<PublicKey> = self
            .store
            .list_markers(FOLLOW_PREFIX)
            .await
            .map_err(unavailable)?
            .into_iter()
            .filter_map(|(k, _)| PublicKey::from_hex(k.strip_prefix(FOLLOW_PREFIX)?).ok())
            .collect();
        let mut st = self.state.write();
        if let Some(lists) = lists {
            st.lists = lists;
        }
        st.peer_admins = peer_admins;
        st.extra_follows = follows;
        st.rebuild_followed();
        st.version = version;
        Ok(())
    }

    async fn read_lists(&self) -> Result<HashMap<ListKind, BTreeMap<String, ListEntry>>, AclError> {
        let mut lists = HashMap::new();
        for list in ListKind::ALL {
            let prefix = list.marker_prefix();
            let rows = self.store.list_markers(prefix).await.map_err(unavailable)?;
            let mut map = BTreeMap::new();
            for (key, value) in rows {
                let Some(k) = key.strip_prefix(prefix) else {
                    continue;
                };
                let mut entry: ListEntry =
                    serde_json::from_slice(&value).unwrap_or_else(|_| ListEntry {
                        key: String::new(),
                        reason: String::new(),
                        added: 0,
                    });
                entry.key = k.to_string();
                map.insert(k.to_string(), entry);
            }
            lists.insert(list, map);
        }
        Ok(lists)
    }

    /// The access level of a pubkey (or of no identity) from an address.
    pub fn level(&self, pubkey: Option<&PublicKey>, ip: Option<IpAddr>) -> Level {
        let st = self.state.read();
        self.level_in(&st, pubkey, ip)
    }

    fn level_in(&self, st: &State, pubkey: Option<&PublicKey>, ip: Option<IpAddr>) -> Level {
        if let Some(pk) = pubkey {
            if self.owners.contains(pk) {
                return Level::Owner;
            }
            if self.admins.contains(pk) || st.peer_admins.contains(pk) {
                return Level::Admin;
            }
        }
        if self.mode == Mode::Managed {
            if let Some(ip) = ip {
                if st.contains(ListKind::BlockedIps, &ip.to_string()) {
                    return Level::Blocked;
                }
            }
        }
        let Some(pk) = pubkey else {
            return if self.mode == Mode::None {
                Level::Write
            } else {
                Level::Read
            };
        };
        match self.mode {
            Mode::None => Level::Write,
            Mode::Follows => {
                if st.followed.contains(pk) {
                    Level::Write
                } else {
                    Level::Read
                }
            }
            Mode::Managed => {
                let hex = pk.to_hex();
                if st.contains(ListKind::BannedPubkeys, &hex) {
                    Level::Banned
                } else if st.contains(ListKind::AllowedPubkeys, &hex) {
                    Level::Write
                } else {
                    Level::Read
                }
            }
        }
    }

    /// ORLY's `CheckPolicy` for mode managed: banned event → deny; allowed event → allow;
    /// allowed kinds set and the kind not among them → deny; banned author → deny.
    pub fn check_policy(&self, event: &Event) -> Result<(), String> {
        if self.mode != Mode::Managed {
            return Ok(());
        }
        let st = self.state.read();
        let id = event.id.to_hex();
        if st.contains(ListKind::BannedEvents, &id) {
            return Err("blocked: this event is banned from this relay".into());
        }
        if st.contains(ListKind::AllowedEvents, &id) {
            return Ok(());
        }
        if !st.is_empty(ListKind::AllowedKinds)
            && !st.contains(ListKind::AllowedKinds, &event.kind.as_u16().to_string())
        {
            return Err(format!(
                "restricted: kind {} is not accepted by this relay",
                event.kind.as_u16()
            ));
        }
        if st.contains(ListKind::BannedPubkeys, &event.pubkey.to_hex()) {
            return Err("blocked: the author is banned from this relay".into());
        }
        Ok(())
    }

    /// The whole write decision for a verified event from a connection.
    ///
    /// Authenticated admins and owners may publish anything; a blocked address or a banned
    /// authenticated key is refused with `blocked:`. Otherwise the event must pass the
    /// managed policy and its author must have the write level (followed by an admin in
    /// mode follows, allowed in mode managed), else `restricted:`. An explicitly allowed
    /// event passes whoever wrote it.
    pub fn decide_write(&self, authed: &[PublicKey], ip: IpAddr, event: &Event) -> WriteDecision {
        let allow = |cacheable| WriteDecision {
            decision: Decision::Allow,
            cacheable,
        };
        let deny = |reason: String, cacheable| WriteDecision {
            decision: Decision::Deny(reason),
            cacheable,
        };
        if self.mode == Mode::None {
            return allow(true);
        }
        let st = self.state.read();
        if !st.loaded {
            return deny(
                "error: access control is not ready yet, try again".into(),
                false,
            );
        }
        // Event-specific lists make a decision depend on the id, not only the author.
        let cacheable = self.mode != Mode::Managed
            || (st.is_empty(ListKind::BannedEvents) && st.is_empty(ListKind::AllowedEvents));
        let mut authed_admin = false;
        for pk in authed {
            match self.level_in(&st, Some(pk), None) {
                Level::Banned => {
                    return deny(
                        format!("blocked: {} is banned from this relay", pk.to_hex()),
                        cacheable,
                    )
                }
                l if l.is_admin() => authed_admin = true,
                _ => {}
            }
        }
        if authed_admin {
            return allow(cacheable);
        }
        if self.level_in(&st, None, Some(ip)) == Level::Blocked {
            return deny(
                "blocked: your IP address is blocked on this relay".into(),
                cacheable,
            );
        }
        drop(st);
        if let Err(reason) = self.check_policy(event) {
            return deny(reason, cacheable);
        }
        let st = self.state.read();
        if self.mode == Mode::Managed && st.contains(ListKind::AllowedEvents, &event.id.to_hex()) {
            return allow(cacheable);
        }
        let level = self.level_in(&st, Some(&event.pubkey), None);
        if level.can_write() {
            return allow(cacheable);
        }
        let why = match self.mode {
            Mode::Follows => "is not followed by an admin of this relay",
            _ => "is not on the allow list of this relay",
        };
        deny(
            format!(
                "restricted: {} {why}; writing here needs permission",
                event.pubkey.to_hex()
            ),
            cacheable,
        )
    }

    /// The read decision: everyone reads, except blocked addresses and banned identities.
    pub fn decide_read(&self, authed: &[PublicKey], ip: IpAddr) -> Decision {
        if self.mode == Mode::None {
            return Decision::Allow;
        }
        let st = self.state.read();
        if !st.loaded {
            return Decision::Deny("error: access control is not ready yet, try again".into());
        }
        for pk in authed {
            if self.level_in(&st, Some(pk), None) == Level::Banned {
                return Decision::Deny(format!(
                    "blocked: {} is banned from this relay",
                    pk.to_hex()
                ));
            }
        }
        if self.level_in(&st, None, Some(ip)) == Level::Blocked {
            return Decision::Deny("blocked: your IP address is blocked on this relay".into());
        }
        Decision::Allow
    }

    /// Adds an entry to a list (storage first, then memory); the key is normalized.
    pub async fn add_to_list(
        &self,
        list: ListKind,
        key: &str,
        reason: &str,
    ) -> Result<ListEntry, AclError> {
        let key = list.normalize_key(key)?;
        let entry = ListEntry {
            key: key.clone(),
            reason: reason.to_string(),
            added: now_secs(),
        };
        let value = serde_json::json!({"reason": entry.reason, "added": entry.added});
        let _guard = self.writes.lock().await;
        self.store
            .set_marker(
                &format!("{}{key}", list.marker_prefix()),
                value.to_string().as_bytes(),
            )
            .await
            .map_err(unavailable)?;
        if let Some(opp) = list.opposite() {
            self.store
                .delete_marker(&format!("{}{key}", opp.marker_prefix()))
                .await
                .map_err(unavailable)?;
        }
        {
            let mut st = self.state.write();
            st.lists
                .entry(list)
                .or_default()
                .insert(key.clone(), entry.clone());
            if let Some(opp) = list.opposite() {
                if let Some(l) = st.lists.get_mut(&opp) {
                    l.remove(&key);
                }
            }
        }
        // Memory first: this engine enforces what the store holds even if the bump fails
        // (the caller then retries, which bumps again).
        self.bump_version().await?;
        if list == ListKind::BannedEvents {
            // A banned event is also removed from storage (best effort).
            if let Ok(id) = nostr::EventId::from_hex(&key) {
                if let Err(e) = self.store.delete_event(&id).await {
                    tracing::warn!(error = %e, event_id = %key, "could not delete a banned event");
                }
            }
        }
        tracing::info!(list = ?list, key = %key, "ACL list entry added");
        Ok(entry)
    }

    /// Removes an entry (absent is fine).
    pub async fn remove_from_list(&self, list: ListKind, key: &str) -> Result<(), AclError> {
        let key = list.normalize_key(key)?;
        let _guard = self.writes.lock().await;
        self.store
            .delete_marker(&format!("{}{key}", list.marker_prefix()))
            .await
            .map_err(unavailable)?;
        if let Some(l) = self.state.write().lists.get_mut(&list) {
            l.remove(&key);
        }
        self.bump_version().await?;
        tracing::info!(list = ?list, key = %key, "ACL list entry removed");
        Ok(())
    }

    /// A list's entries, sorted by key (kinds numerically).
    pub fn list_entries(&self, list: ListKind) -> Vec<ListEntry> {
        let mut v: Vec<ListEntry> = self
            .state
            .read()
            .lists
            .get(&list)
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default();
        if list == ListKind::AllowedKinds {
            v.sort_by_key(|e| e.key.parse::<u32>().unwrap_or(u32::MAX));
        }
        v
    }
}

fn unavailable(e: orly_db::StoreError) -> AclError {
    AclError::Unavailable(e.to_string())
}

/// The `p` tags of a follow list.
fn follow_set(event: &Event) -> HashSet<PublicKey> {
    event.tags.public_keys().copied().collect()
}

#[async_trait]
impl Acl for AclEngine {
    fn mode(&self) -> &str {
        self.mode.as_str()
    }

    async fn check_write(&self, ctx: &AccessContext<'_>, event: &Event) -> Decision {
        self.decide_write(ctx.authed, ctx.ip, event).decision
    }

    async fn check_read(&self, ctx: &AccessContext<'_>, _filters: &[Filter]) -> Decision {
        self.decide_read(ctx.authed, ctx.ip)
    }

    async fn on_event_stored(&self, event: &Event) {
        if self.apply_stored_event(event) {
            tracing::debug!(admin = %event.pubkey, "follow list of an admin updated");
        }
    }
}

#[async_trait]
impl AclAdmin for AclEngine {
    async fn current_mode(&self) -> Result<Mode, AclError> {
        Ok(self.mode)
    }

    async fn access_level(&self, pubkey: &PublicKey) -> Result<Level, AclError> {
        Ok(self.level(Some(pubkey), None))
    }

    async fn list_add(&self, list: ListKind, key: &str, reason: &str) -> Result<(), AclError> {
        self.add_to_list(list, key, reason).await.map(|_| ())
    }

    async fn list_remove(&self, list: ListKind, key: &str) -> Result<(), AclError> {
        self.remove_from_list(list, key).await
    }

    async fn list(&self, list: ListKind) -> Result<Vec<ListEntry>, AclError> {
        Ok(self.list_entries(list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, Keys, Tag};
    use orly_db::{open_store, StoreConfig, StoreKind};

    async fn store(dir: &tempfile::TempDir) -> SharedStore {
        open_store(&StoreConfig {
            kind: StoreKind::Sqlite,
            data_dir: dir.path().to_path_buf(),
            ..StoreConfig::default()
        })
        .await
        .unwrap()
    }

    fn note(k: &Keys) -> Event {
        EventBuilder::text_note("hi").sign_with_keys(k).unwrap()
    }

    fn follows(k: &Keys, who: &[PublicKey], at: u64) -> Event {
        EventBuilder::new(Kind::ContactList, "")
            .tags(who.iter().map(|p| Tag::public_key(*p)))
            .custom_created_at(Timestamp::from(at))
            .sign_with_keys(k)
            .unwrap()
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn follows_mode_tracks_the_latest_admin_list() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let (admin, a, b) = (Keys::generate(), Keys::generate(), Keys::generate());
        store
            .save_event(&follows(&admin, &[a.public_key()], 100))
            .await
            .unwrap();
        let cfg = AclConfig {
            mode: Mode::Follows,
            admins: vec![admin.public_key()],
            ..AclConfig::default()
        };
        let acl = AclEngine::open(cfg, store.clone()).await.unwrap();
        assert_eq!(
            acl.decide_write(&[], IP, &note(&a)).decision,
            Decision::Allow
        );
        assert_eq!(
            acl.decide_write(&[], IP, &note(&admin)).decision,
            Decision::Allow
        );
        let Decision::Deny(r) = acl.decide_write(&[], IP, &note(&b)).decision else {
            panic!("b may not write")
        };
        assert!(r.starts_with("restricted:"), "{r}");
        assert_eq!(acl.decide_read(&[], IP), Decision::Allow);

        // A newer list applied from the relay replaces the old one; an older one does not.
        let newer = follows(&admin, &[b.public_key()], 200);
        store.save_event(&newer).await.unwrap();
        assert!(acl.apply_stored_event(&newer));
        assert!(!acl.apply_stored_event(&follows(&admin, &[a.public_key()], 150)));
        assert_eq!(acl.followed_pubkeys(), vec![b.public_key()]);
        // A refresh from storage agrees.
        assert_eq!(acl.refresh_follows().await.unwrap(), 1);
        assert_eq!(acl.level(Some(&a.public_key()), None), Level::Read);
        assert_eq!(acl.level(Some(&b.public_key()), None), Level::Write);
        assert_eq!(acl.level(Some(&admin.public_key()), None), Level::Admin);
    }

    #[tokio::test]
    async fn engines_on_one_store_converge_at_the_next_check() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let (owner, a, peer) = (Keys::generate(), Keys::generate(), Keys::generate());
        let cfg = AclConfig {
            mode: Mode::Managed,
            owners: vec![owner.public_key()],
            ..AclConfig::default()
        };
        let one = AclEngine::open(cfg.clone(), store.clone()).await.unwrap();
        let two = AclEngine::open(cfg, store.clone()).await.unwrap();
        // Nothing changed: a check reads one marker and reloads nothing.
        assert!(!two.check_changes().await.unwrap());

        let hex = a.public_key().to_hex();
        one.add_to_list(ListKind::AllowedPubkeys, &hex, "")
            .await
            .unwrap();
        assert!(two.check_changes().await.unwrap());
        assert_eq!(
            two.decide_write(&[], IP, &note(&a)).decision,
            Decision::Allow
        );
        // A ban on one is enforced by the other after its next check, not before.
        one.add_to_list(ListKind::BannedPubkeys, &hex, "spam")
            .await
            .unwrap();
        assert_eq!(
            two.decide_write(&[], IP, &note(&a)).decision,
            Decision::Allow
        );
        assert!(two.check_changes().await.unwrap());
        assert!(matches!(
            two.decide_write(&[], IP, &note(&a)).decision,
            Decision::Deny(r) if r.starts_with("blocked:")
        ));
        assert!(!two.check_changes().await.unwrap());
        // Removals and the peer admins travel the same way.
        one.remove_from_list(ListKind::BannedPubkeys, &hex)
            .await
            .unwrap();
        one.set_peer_admins(vec![peer.public_key()]).await.unwrap();
        assert!(two.check_changes().await.unwrap());
        assert!(two.list_entries(ListKind::BannedPubkeys).is_empty());
        assert_eq!(two.level(Some(&peer.public_key()), None), Level::Admin);
        // A change made on `two` reaches `one` just as well.
        two.add_to_list(ListKind::BlockedIps, "10.0.0.1", "")
            .await
            .unwrap();
        assert!(one.check_changes().await.unwrap());
        assert_eq!(
            one.level(None, Some("10.0.0.1".parse().unwrap())),
            Level::Blocked
        );
    }

    #[tokio::test]
    async fn follow_lists_and_added_follows_reach_every_engine() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let (admin, a, b, c) = (
            Keys::generate(),
            Keys::generate(),
            Keys::generate(),
            Keys::generate(),
        );
        let cfg = AclConfig {
            mode: Mode::Follows,
            admins: vec![admin.public_key()],
            ..AclConfig::default()
        };
        let one = AclEngine::open(cfg.clone(), store.clone()).await.unwrap();
        let two = AclEngine::open(cfg, store.clone()).await.unwrap();
        // A first list, then a newer one, stored by someone else (a relay, another replica).
        store
            .save_event(&follows(&admin, &[a.public_key()], 100))
            .await
            .unwrap();
        assert!(two.check_changes().await.unwrap());
        assert_eq!(two.followed_pubkeys(), vec![a.public_key()]);
        assert!(!two.check_changes().await.unwrap());
        store
            .save_event(&follows(&admin, &[b.public_key()], 200))
            .await
            .unwrap();
        assert!(two.check_changes().await.unwrap());
        assert_eq!(two.followed_pubkeys(), vec![b.public_key()]);
        // AddFollow on one engine: stored, so the other follows too.
        one.add_follow(c.public_key()).await.unwrap();
        assert!(two.check_changes().await.unwrap());
        assert_eq!(two.level(Some(&c.public_key()), None), Level::Write);
    }

    #[tokio::test]
    async fn managed_lists_persist_and_decide() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let (owner, a, b) = (Keys::generate(), Keys::generate(), Keys::generate());
        let cfg = AclConfig {
            mode: Mode::Managed,
            owners: vec![owner.public_key()],
            ..AclConfig::default()
        };
        let acl = AclEngine::open(cfg.clone(), store.clone()).await.unwrap();
        let restricted =
            |d: Decision| matches!(d, Decision::Deny(r) if r.starts_with("restricted:"));
        let blocked = |d: Decision| matches!(d, Decision::Deny(r) if r.starts_with("blocked:"));
        assert!(restricted(acl.decide_write(&[], IP, &note(&a)).decision));
        acl.add_to_list(ListKind::AllowedPubkeys, &a.public_key().to_hex(), "ok")
            .await
            .unwrap();
        assert_eq!(
            acl.decide_write(&[], IP, &note(&a)).decision,
            Decision::Allow
        );
        // Banning moves the key from the allow list to the ban list.
        acl.add_to_list(ListKind::BannedPubkeys, &a.public_key().to_hex(), "spam")
            .await
            .unwrap();
        assert!(blocked(acl.decide_write(&[], IP, &note(&a)).decision));
        assert!(acl.list_entries(ListKind::AllowedPubkeys).is_empty());
        assert!(blocked(acl.decide_read(&[a.public_key()], IP)));
        // Kinds.
        acl.add_to_list(ListKind::AllowedPubkeys, &b.public_key().to_hex(), "")
            .await
            .unwrap();
        acl.add_to_list(ListKind::AllowedKinds, "7", "")
            .await
            .unwrap();
        assert!(restricted(acl.decide_write(&[], IP, &note(&b)).decision));
        // An owner authenticated on the connection may publish anything.
        assert_eq!(
            acl.decide_write(&[owner.public_key()], IP, &note(&b))
                .decision,
            Decision::Allow
        );
        // Blocked addresses.
        acl.add_to_list(ListKind::BlockedIps, "10.1.2.3", "")
            .await
            .unwrap();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(blocked(acl.decide_read(&[], ip)));
        // Event lists make decisions uncacheable; a banned event is refused.
        let e = note(&b);
        acl.add_to_list(ListKind::BannedEvents, &e.id.to_hex(), "")
            .await
            .unwrap();
        let d = acl.decide_write(&[], IP, &e);
        assert!(blocked(d.decision) && !d.cacheable);
        // Invalid keys change nothing.
        assert!(acl
            .add_to_list(ListKind::BannedPubkeys, "nope", "")
            .await
            .is_err());

        // A new engine over the same store sees the same lists.
        let again = AclEngine::open(cfg, store).await.unwrap();
        for list in ListKind::ALL {
            assert_eq!(again.list_entries(list), acl.list_entries(list), "{list:?}");
        }
        assert_eq!(again.level(Some(&a.public_key()), None), Level::Banned);
        assert_eq!(again.level(Some(&owner.public_key()), None), Level::Owner);
    }
}
