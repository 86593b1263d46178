//! [`GrpcAcl`]: the orly-acl service as an [`Acl`] (and [`AclAdmin`]) for the relay.
//!
//! Decisions the service marks cacheable are reused for their TTL (5 s), keyed by the
//! connection's identities and address plus the author and kind (writes), so a busy author
//! costs one call per TTL. A list change made elsewhere (another relay, another replica) is
//! therefore enforced here within the replicas' check interval plus that TTL (10 s by
//! default); changes made through this client clear its cache at once. Every call has a deadline; when the service is down, writes and
//! reads are refused with `error:` (fail closed) and the lazy channel reconnects by itself.
//! Several orly-acl replicas behind one name are all used: calls are balanced over them and a
//! replica found unreachable is passed over, so losing one refuses nothing.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nostr::{Event, Filter, Kind, PublicKey};
use orly_common::acl::{AccessContext, Acl, Decision};
use orly_common::{CallError, ClientOptions, GrpcChannel};
use orly_proto::orlyacl::v1 as pb;
use parking_lot::{Mutex, RwLock};
use pb::acl_service_client::AclServiceClient;
use tonic::{Code, Request, Response, Status};

use crate::{AclAdmin, AclError, Level, ListEntry, ListKind, Mode};

/// Longest wait for a TCP connection (capped further by the call timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a pubkey's level is reused when deciding whether a follow list matters.
const LEVEL_TTL: Duration = Duration::from_secs(30);
/// How often the service's mode is asked again (for NIP-11 and logs).
const MODE_REFRESH: Duration = Duration::from_secs(30);
/// Cached decisions kept before the cache is cleared.
const MAX_CACHE_ENTRIES: usize = 100_000;
/// What a refused write or read says while the service cannot be reached.
pub const UNAVAILABLE_REASON: &str = "error: access control is unavailable, try again later";

type WriteKey = (Vec<PublicKey>, IpAddr, PublicKey, u16);
type ReadKey = (Vec<PublicKey>, IpAddr);

/// A time-limited decision cache.
struct Cache<K> {
    map: Mutex<HashMap<K, (Instant, Decision)>>,
}

impl<K: std::hash::Hash + Eq> Cache<K> {
    fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &K) -> Option<Decision> {
        let map = self.map.lock();
        match map.get(key) {
            Some((until, d)) if *until > Instant::now() => Some(d.clone()),
            _ => None,
        }
    }

    fn put(&self, key: K, d: Decision, ttl_ms: u32) {
        if ttl_ms == 0 {
            return;
        }
        let now = Instant::now();
        let mut map = self.map.lock();
        if map.len() >= MAX_CACHE_ENTRIES {
            map.retain(|_, (until, _)| *until > now);
            if map.len() >= MAX_CACHE_ENTRIES {
                map.clear();
            }
        }
        map.insert(key, (now + Duration::from_millis(u64::from(ttl_ms)), d));
    }

    fn clear(&self) {
        self.map.lock().clear();
    }
}

/// The orly-acl service over gRPC. Cheap to share.
pub struct GrpcAcl {
    client: AclServiceClient<GrpcChannel>,
    channel: GrpcChannel,
    mode: RwLock<Mode>,
    writes: Cache<WriteKey>,
    reads: Cache<ReadKey>,
    levels: Mutex<HashMap<PublicKey, (Instant, Level)>>,
}

impl std::fmt::Debug for GrpcAcl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcAcl")
            .field("channel", &self.channel)
            .finish()
    }
}

impl GrpcAcl {
    /// A client for orly-acl at `addr` (`host:port` or `http://host:port`); every call must
    /// finish within `timeout`. `mode_hint` is reported by [`Acl::mode`] until the service
    /// has told its own. Does not connect yet; must be called inside a tokio runtime.
    pub fn connect_lazy(
        addr: &str,
        timeout: Duration,
        mode_hint: Mode,
    ) -> Result<Arc<Self>, AclError> {
        let mut opts = ClientOptions::from_env("orly-acl", timeout)
            .map_err(|e| AclError::Config(e.to_string()))?;
        opts.connect_timeout = CONNECT_TIMEOUT.min(opts.timeout);
        Self::with_options(addr, opts, mode_hint)
    }

    /// [`GrpcAcl::connect_lazy`] with every client option given (name servers, resolve
    /// interval, security) instead of read from the environment.
    pub fn with_options(
        addr: &str,
        opts: ClientOptions,
        mode_hint: Mode,
    ) -> Result<Arc<Self>, AclError> {
        let channel =
            GrpcChannel::connect_lazy(addr, opts).map_err(|e| AclError::Config(e.to_string()))?;
        let acl = Arc::new(Self {
            client: AclServiceClient::new(channel.clone()),
            channel,
            mode: RwLock::new(mode_hint),
            writes: Cache::new(),
            reads: Cache::new(),
            levels: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&acl);
        tokio::spawn(async move {
            loop {
                let Some(acl) = weak.upgrade() else { return };
                let wait = match acl.fetch_mode().await {
                    Ok(_) => MODE_REFRESH,
                    Err(_) => Duration::from_secs(2),
                };
                drop(acl);
                tokio::time::sleep(wait).await;
            }
        });
        Ok(acl)
    }

    pub fn addr(&self) -> &str {
        self.channel.address()
    }

    /// The channel (replicas).
    pub fn channel(&self) -> &GrpcChannel {
        &self.channel
    }

    /// Forgets every cached decision (after a list changed).
    pub fn clear_cache(&self) {
        self.writes.clear();
        self.reads.clear();
        self.levels.lock().clear();
    }

    /// One call under the deadline; a replica found unreachable is passed over for another.
    async fn unary<Q, R, F, Fut>(&self, msg: Q, call: F) -> Result<R, AclError>
    where
        Q: Clone,
        F: Fn(AclServiceClient<GrpcChannel>, Request<Q>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        self.channel
            .call("orly-acl call", || {
                call(self.client.clone(), self.channel.request(msg.clone()))
            })
            .await
            .map_err(|e| match e {
                CallError::Status(s) if s.code() == Code::InvalidArgument => {
                    AclError::InvalidArgument(s.message().to_string())
                }
                e => AclError::Unavailable(self.channel.describe(&e)),
            })
    }

    async fn fetch_mode(&self) -> Result<Mode, AclError> {
        let resp = self
            .unary(pb::Empty {}, |mut c, r| async move { c.get_mode(r).await })
            .await?;
        let mode: Mode = resp.mode.parse().map_err(AclError::Unavailable)?;
        *self.mode.write() = mode;
        Ok(mode)
    }

    async fn level_of(&self, pubkey: &PublicKey) -> Result<Level, AclError> {
        if let Some((until, level)) = self.levels.lock().get(pubkey) {
            if *until > Instant::now() {
                return Ok(*level);
            }
        }
        let resp = self
            .unary(
                pb::AccessLevelRequest {
                    pubkey: pubkey.to_bytes().to_vec(),
                    address: String::new(),
                },
                |mut c, r| async move { c.get_access_level(r).await },
            )
            .await?;
        let level: Level = resp.level.parse().map_err(AclError::Unavailable)?;
        self.levels
            .lock()
            .insert(*pubkey, (Instant::now() + LEVEL_TTL, level));
        Ok(level)
    }

    fn unavailable(&self, what: &'static str, e: &AclError) -> Decision {
        metrics::counter!("orly_acl_unavailable_total", "op" => what).increment(1);
        tracing::warn!(error = %e, addr = %self.addr(), "{what} check failed; refusing");
        Decision::Deny(UNAVAILABLE_REASON.into())
    }
}

fn authed_bytes(authed: &[PublicKey]) -> Vec<Vec<u8>> {
    authed.iter().map(|p| p.to_bytes().to_vec()).collect()
}

fn to_decision(d: &pb::Decision) -> Decision {
    if d.allowed {
        Decision::Allow
    } else if d.reason.is_empty() {
        Decision::Deny("restricted: not allowed".into())
    } else {
        Decision::Deny(d.reason.clone())
    }
}

#[async_trait]
impl Acl for GrpcAcl {
    fn mode(&self) -> &str {
        let mode = *self.mode.read();
        mode.as_str()
    }

    async fn check_write(&self, ctx: &AccessContext<'_>, event: &Event) -> Decision {
        let key: WriteKey = (
            ctx.authed.to_vec(),
            ctx.ip,
            event.pubkey,
            event.kind.as_u16(),
        );
        if let Some(d) = self.writes.get(&key) {
            metrics::counter!("orly_acl_cache_total", "op" => "write", "result" => "hit")
                .increment(1);
            return d;
        }
        metrics::counter!("orly_acl_cache_total", "op" => "write", "result" => "miss").increment(1);
        let msg = pb::WriteCheckRequest {
            event: Some(event.into()),
            authed_pubkeys: authed_bytes(ctx.authed),
            address: ctx.ip.to_string(),
        };
        match self
            .unary(msg, |mut c, r| async move { c.check_write(r).await })
            .await
        {
            Ok(d) => {
                let decision = to_decision(&d);
                self.writes.put(key, decision.clone(), d.cache_ms);
                decision
            }
            Err(e) => self.unavailable("write", &e),
        }
    }

    async fn check_read(&self, ctx: &AccessContext<'_>, filters: &[Filter]) -> Decision {
        let key: ReadKey = (ctx.authed.to_vec(), ctx.ip);
        if let Some(d) = self.reads.get(&key) {
            metrics::counter!("orly_acl_cache_total", "op" => "read", "result" => "hit")
                .increment(1);
            return d;
        }
        metrics::counter!("orly_acl_cache_total", "op" => "read", "result" => "miss").increment(1);
        let msg = pb::ReadCheckRequest {
            filters: filters.iter().map(Into::into).collect(),
            authed_pubkeys: authed_bytes(ctx.authed),
            address: ctx.ip.to_string(),
        };
        match self
            .unary(msg, |mut c, r| async move { c.check_read(r).await })
            .await
        {
            Ok(d) => {
                let decision = to_decision(&d);
                self.reads.put(key, decision.clone(), d.cache_ms);
                decision
            }
            Err(e) => self.unavailable("read", &e),
        }
    }

    async fn on_event_stored(&self, event: &Event) {
        if event.kind != Kind::ContactList || *self.mode.read() != Mode::Follows {
            return;
        }
        match self.level_of(&event.pubkey).await {
            Ok(level) if level.is_admin() => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether a follow list matters");
                return;
            }
        }
        match self
            .unary(pb::Empty {}, |mut c, r| async move {
                c.refresh_follows(r).await
            })
            .await
        {
            Ok(_) => self.clear_cache(),
            Err(e) => tracing::warn!(error = %e, "follow refresh after an admin's list failed"),
        }
    }
}

#[async_trait]
impl AclAdmin for GrpcAcl {
    async fn current_mode(&self) -> Result<Mode, AclError> {
        self.fetch_mode().await
    }

    async fn access_level(&self, pubkey: &PublicKey) -> Result<Level, AclError> {
        self.level_of(pubkey).await
    }

    async fn list_add(&self, list: ListKind, key: &str, reason: &str) -> Result<(), AclError> {
        let key = list.normalize_key(key)?;
        let reason = reason.to_string();
        match list {
            ListKind::BannedPubkeys => {
                let m = pb::BanPubkeyRequest {
                    pubkey: key,
                    reason,
                };
                self.unary(m, |mut c, r| async move { c.ban_pubkey(r).await })
                    .await?;
            }
            ListKind::AllowedPubkeys => {
                let m = pb::BanPubkeyRequest {
                    pubkey: key,
                    reason,
                };
                self.unary(m, |mut c, r| async move { c.allow_pubkey(r).await })
                    .await?;
            }
            ListKind::BannedEvents => {
                let m = pb::BanEventRequest {
                    event_id: key,
                    reason,
                };
                self.unary(m, |mut c, r| async move { c.ban_event(r).await })
                    .await?;
            }
            ListKind::AllowedEvents => {
                let m = pb::BanEventRequest {
                    event_id: key,
                    reason,
                };
                self.unary(m, |mut c, r| async move { c.allow_event(r).await })
                    .await?;
            }
            ListKind::AllowedKinds => {
                let m = pb::AllowKindRequest {
                    kind: key.parse().unwrap_or_default(),
                };
                self.unary(m, |mut c, r| async move { c.allow_kind(r).await })
                    .await?;
            }
            ListKind::BlockedIps => {
                let m = pb::BlockIpRequest { ip: key, reason };
                self.unary(m, |mut c, r| async move { c.block_ip(r).await })
                    .await?;
            }
        }
        self.clear_cache();
        Ok(())
    }

    async fn list_remove(&self, list: ListKind, key: &str) -> Result<(), AclError> {
        let key = list.normalize_key(key)?;
        match list {
            ListKind::BannedPubkeys => {
                let m = pb::PubkeyRequest { pubkey: key };
                self.unary(m, |mut c, r| async move { c.unban_pubkey(r).await })
                    .await?;
            }
            ListKind::AllowedPubkeys => {
                let m = pb::PubkeyRequest { pubkey: key };
                self.unary(m, |mut c, r| async move { c.disallow_pubkey(r).await })
                    .await?;
            }
            ListKind::BannedEvents => {
                let m = pb::EventIdRequest { event_id: key };
                self.unary(m, |mut c, r| async move { c.unban_event(r).await })
                    .await?;
            }
            ListKind::AllowedEvents => {
                let m = pb::EventIdRequest { event_id: key };
                self.unary(m, |mut c, r| async move { c.disallow_event(r).await })
                    .await?;
            }
            ListKind::AllowedKinds => {
                let m = pb::AllowKindRequest {
                    kind: key.parse().unwrap_or_default(),
                };
                self.unary(m, |mut c, r| async move { c.disallow_kind(r).await })
                    .await?;
            }
            ListKind::BlockedIps => {
                let m = pb::IpRequest { ip: key };
                self.unary(m, |mut c, r| async move { c.unblock_ip(r).await })
                    .await?;
            }
        }
        self.clear_cache();
        Ok(())
    }

    async fn list(&self, list: ListKind) -> Result<Vec<ListEntry>, AclError> {
        let e = pb::Empty {};
        let entry = |key: String, reason: String, added: i64| ListEntry { key, reason, added };
        Ok(match list {
            ListKind::BannedPubkeys | ListKind::AllowedPubkeys => {
                let resp = if list == ListKind::BannedPubkeys {
                    self.unary(e, |mut c, r| async move { c.list_banned_pubkeys(r).await })
                        .await?
                } else {
                    self.unary(e, |mut c, r| async move { c.list_allowed_pubkeys(r).await })
                        .await?
                };
                resp.pubkeys
                    .into_iter()
                    .map(|p| entry(p.pubkey, p.reason, p.added))
                    .collect()
            }
            ListKind::BannedEvents | ListKind::AllowedEvents => {
                let resp = if list == ListKind::BannedEvents {
                    self.unary(e, |mut c, r| async move { c.list_banned_events(r).await })
                        .await?
                } else {
                    self.unary(e, |mut c, r| async move { c.list_allowed_events(r).await })
                        .await?
                };
                resp.events
                    .into_iter()
                    .map(|p| entry(p.event_id, p.reason, p.added))
                    .collect()
            }
            ListKind::AllowedKinds => self
                .unary(e, |mut c, r| async move { c.list_allowed_kinds(r).await })
                .await?
                .kinds
                .into_iter()
                .map(|k| entry(k.to_string(), String::new(), 0))
                .collect(),
            ListKind::BlockedIps => self
                .unary(e, |mut c, r| async move { c.list_blocked_i_ps(r).await })
                .await?
                .ips
                .into_iter()
                .map(|p| entry(p.ip, p.reason, p.added))
                .collect(),
        })
    }
}
