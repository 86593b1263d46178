//! The gRPC client side every orly service client shares: one [`GrpcChannel`] that finds the
//! replicas of a service and balances calls over them, with the call deadline, keepalive,
//! token and mTLS settings in one place.
//!
//! An address (`ORLY_GRPC_DB_SERVER`, `ORLY_GRPC_SYNC_NEGENTROPY`, …) is a comma-separated list
//! of `host:port` or `http(s)://host:port`. A host name is resolved to *all* its addresses —
//! what a headless Kubernetes Service returns: one per ready pod — and resolved again every
//! `ORLY_GRPC_RESOLVE_INTERVAL` (default 30 s) and soon after a connection fails, so replicas
//! added by `kubectl scale` or an autoscaler get calls and vanished ones stop getting them.
//! Each address is its own lazy HTTP/2 connection; a call goes to the reachable replica with
//! the fewest calls in flight (round robin among equals), and a replica whose connection
//! failed is passed over for a short backoff. [`GrpcChannel::pinned`] keeps calls on one
//! replica (NIP-77 sessions live in one process).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};
use tonic::body::Body;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tower::ServiceExt;

use crate::security::Security;

/// Default time between two resolutions of a service name.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// A replica whose connection failed gets no calls for this long (unless it is the only one).
const DOWN_BACKOFF: Duration = Duration::from_secs(2);
/// Resolutions triggered by failures are at least this far apart.
const MIN_RESOLVE_GAP: Duration = Duration::from_millis(500);

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("empty {0} address")]
    Empty(&'static str),
    #[error("invalid {service} address {addr:?}: {reason}")]
    Address {
        service: &'static str,
        addr: String,
        reason: String,
    },
    #[error("{0}")]
    Security(#[from] crate::security::SecurityError),
    #[error("DNS resolver: {0}")]
    Resolver(String),
}

/// How a client connects and how long its calls may take.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The service's name in messages (`orly-db`).
    pub service: &'static str,
    /// Deadline of one call (streams: of opening them).
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// HTTP/2 and TCP keepalive: a killed pod sends no RST, so a dead connection is found by
    /// the keepalive within about interval + timeout.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub resolve_interval: Duration,
    pub security: Security,
    /// Name servers to ask instead of the system's (`ORLY_DNS_SERVERS`).
    pub dns_servers: Vec<SocketAddr>,
}

impl ClientOptions {
    /// Defaults for `service` with call deadline `timeout` (0: 10 s), the security settings,
    /// resolve interval and name servers from the environment.
    pub fn from_env(service: &'static str, timeout: Duration) -> Result<Self, ClientError> {
        let resolve_interval = std::env::var(orly_consts::env::GRPC_RESOLVE_INTERVAL)
            .ok()
            .and_then(|v| crate::parse_duration(&v).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_RESOLVE_INTERVAL);
        let dns_servers = match std::env::var(orly_consts::env::DNS_SERVERS) {
            Ok(v) => parse_dns_servers(&v).map_err(|reason| ClientError::Address {
                service: "DNS",
                addr: v.clone(),
                reason,
            })?,
            Err(_) => Vec::new(),
        };
        Ok(Self {
            resolve_interval,
            dns_servers,
            security: Security::from_env()?,
            ..Self::new(service, timeout)
        })
    }

    /// Defaults without reading the environment (no token, no TLS, system resolver).
    pub fn new(service: &'static str, timeout: Duration) -> Self {
        let timeout = if timeout.is_zero() {
            Duration::from_secs(10)
        } else {
            timeout
        };
        Self {
            service,
            timeout,
            connect_timeout: Duration::from_secs(5).min(timeout),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            resolve_interval: DEFAULT_RESOLVE_INTERVAL,
            security: Security::none(),
            dns_servers: Vec::new(),
        }
    }
}

/// `ip:port` list; a bare IP means port 53.
pub fn parse_dns_servers(s: &str) -> Result<Vec<SocketAddr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<SocketAddr>()
                .or_else(|_| p.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| format!("{p:?} is not ip:port"))
        })
        .collect()
}

/// One configured address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
}

impl Target {
    fn ip(&self) -> Option<IpAddr> {
        self.host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    }
}

fn parse_targets(service: &'static str, addrs: &str) -> Result<Vec<Target>, ClientError> {
    let mut out = Vec::new();
    for raw in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let bad = |reason: &str| ClientError::Address {
            service,
            addr: raw.to_string(),
            reason: reason.to_string(),
        };
        let rest = raw
            .strip_prefix("http://")
            .or_else(|| raw.strip_prefix("https://"))
            .unwrap_or(raw);
        if rest.contains("://") {
            return Err(bad("the scheme must be http or https"));
        }
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') {
            return Err(bad("an address has no path"));
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port"))?;
        let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad("no host"));
        }
        let t = Target {
            host: host.to_string(),
            port,
        };
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(ClientError::Empty(service));
    }
    Ok(out)
}

/// One replica: its address and connection.
struct Replica {
    addr: SocketAddr,
    channel: Channel,
    down_until: Mutex<Option<Instant>>,
    in_flight: AtomicUsize,
}

impl Replica {
    fn is_down(&self, now: Instant) -> bool {
        self.down_until.lock().is_some_and(|t| t > now)
    }
}

struct Pool {
    opts: ClientOptions,
    label: String,
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    /// Bumped whenever the replica set changes; also tells waiters the first resolution ran.
    generation: watch::Sender<u64>,
    resolve_now: Arc<Notify>,
    next: AtomicUsize,
}

impl Pool {
    fn replica(&self, addr: SocketAddr, host: &str) -> Result<Arc<Replica>, String> {
        let o = &self.opts;
        let tls = o.security.tls();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(o.connect_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(o.keepalive_interval))
            .http2_keep_alive_interval(o.keepalive_interval)
            .keep_alive_timeout(o.keepalive_timeout)
            .keep_alive_while_idle(true);
        if let Some(files) = tls {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            endpoint = endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&files.ca))
                        .identity(Identity::from_pem(&files.cert, &files.key))
                        .domain_name(host.to_string()),
                )
                .map_err(|e| format!("TLS settings: {e}"))?;
        }
        Ok(Arc::new(Replica {
            addr,
            channel: endpoint.connect_lazy(),
            down_until: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
        }))
    }

    /// Replaces the replica set with `found` (address → host it came from), keeping the
    /// connections of replicas still there.
    fn apply(&self, found: BTreeMap<SocketAddr, String>) {
        let current = self.replicas.read().clone();
        let same =
            current.len() == found.len() && current.iter().all(|r| found.contains_key(&r.addr));
        if same {
            return;
        }
        let mut next = Vec::with_capacity(found.len());
        for (addr, host) in &found {
            match current.iter().find(|r| r.addr == *addr) {
                Some(r) => next.push(r.clone()),
                None => match self.replica(*addr, host) {
                    Ok(r) => next.push(r),
                    Err(e) => {
                        tracing::warn!(service = self.opts.service, %addr, error = %e, "cannot use a replica")
                    }
                },
            }
        }
        let added = next
            .iter()
            .filter(|r| !current.iter().any(|c| c.addr == r.addr))
            .count();
        let removed = current
            .iter()
            .filter(|c| !found.contains_key(&c.addr))
            .count();
        tracing::info!(
            service = self.opts.service,
            address = %self.label,
            replicas = next.len(),
            added,
            removed,
            "replica set changed"
        );
        *self.replicas.write() = Arc::new(next);
        self.generation.send_modify(|g| *g += 1);
    }

    fn mark_down(&self, replica: &Replica) {
        *replica.down_until.lock() = Some(Instant::now() + DOWN_BACKOFF);
        self.resolve_now.notify_one();
    }
}

/// A balanced, discovering channel to one service; cheap to clone. Implements the tower
/// service tonic's generated clients run on.
#[derive(Clone)]
pub struct GrpcChannel {
    pool: Arc<Pool>,
    pinned: Option<SocketAddr>,
}

impl std::fmt::Debug for GrpcChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcChannel")
            .field("service", &self.pool.opts.service)
            .field("address", &self.pool.label)
            .field("pinned", &self.pinned)
            .finish()
    }
}

impl GrpcChannel {
    /// A channel to `addrs` (see the module docs). Does not connect yet; host names are
    /// resolved in the background. Must be called inside a tokio runtime.
    pub fn connect_lazy(addrs: &str, opts: ClientOptions) -> Result<Self, ClientError> {
        let targets = parse_targets(opts.service, addrs)?;
        let pool = Arc::new(Pool {
            label: addrs.trim().to_string(),
            replicas: RwLock::new(Arc::new(Vec::new())),
            generation: watch::channel(0).0,
            resolve_now: Arc::new(Notify::new()),
            next: AtomicUsize::new(0),
            opts,
        });
        let (fixed, names): (Vec<Target>, Vec<Target>) =
            targets.into_iter().partition(|t| t.ip().is_some());
        let mut found = BTreeMap::new();
        for t in &fixed {
            if let Some(ip) = t.ip() {
                found.insert(SocketAddr::new(ip, t.port), t.host.clone());
            }
        }
        if names.is_empty() {
            pool.apply(found);
        } else {
            let resolver = resolver(&pool.opts.dns_servers)?;
            tokio::spawn(resolve_loop(Arc::downgrade(&pool), resolver, names, found));
        }
        Ok(Self { pool, pinned: None })
    }

    /// The configured address, for messages.
    pub fn address(&self) -> &str {
        &self.pool.label
    }

    pub fn service(&self) -> &'static str {
        self.pool.opts.service
    }

    /// The call deadline.
    pub fn timeout(&self) -> Duration {
        self.pool.opts.timeout
    }

    /// The replicas known now, sorted.
    pub fn replicas(&self) -> Vec<SocketAddr> {
        self.pool.replicas.read().iter().map(|r| r.addr).collect()
    }

    /// Changes whenever the replica set does.
    pub fn watch_replicas(&self) -> watch::Receiver<u64> {
        self.pool.generation.subscribe()
    }

    /// A channel whose every call goes to `replica` (and fails once it is gone).
    pub fn pinned(&self, replica: SocketAddr) -> GrpcChannel {
        GrpcChannel {
            pool: self.pool.clone(),
            pinned: Some(replica),
        }
    }

    /// The replica this channel is pinned to, if any.
    pub fn pinned_to(&self) -> Option<SocketAddr> {
        self.pinned
    }

    /// The replica the next call would go to (for spreading sessions that stay pinned);
    /// waits for the first resolution up to the connect timeout.
    pub async fn pick(&self) -> Result<SocketAddr, Status> {
        self.choose().await.map(|r| r.addr)
    }

    async fn choose(&self) -> Result<Arc<Replica>, Status> {
        let deadline = Instant::now() + self.pool.opts.connect_timeout;
        let mut changes = self.pool.generation.subscribe();
        loop {
            let replicas = self.pool.replicas.read().clone();
            if let Some(addr) = self.pinned {
                return replicas
                    .iter()
                    .find(|r| r.addr == addr)
                    .cloned()
                    .ok_or_else(|| {
                        Status::unavailable(format!(
                            "{} replica {addr} is gone (no longer among the addresses of {})",
                            self.pool.opts.service, self.pool.label
                        ))
                    });
            }
            if !replicas.is_empty() {
                let now = Instant::now();
                let up: Vec<&Arc<Replica>> = replicas.iter().filter(|r| !r.is_down(now)).collect();
                let pool: Vec<&Arc<Replica>> = if up.is_empty() {
                    replicas.iter().collect()
                } else {
                    up
                };
                let start = self.pool.next.fetch_add(1, Ordering::Relaxed);
                let n = pool.len();
                let best = (0..n)
                    .map(|i| pool[(start + i) % n])
                    .min_by_key(|r| r.in_flight.load(Ordering::Relaxed))
                    .cloned();
                if let Some(r) = best {
                    return Ok(r);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, changes.changed()).await.is_err() {
                return Err(Status::unavailable(format!(
                    "{} at {}: no address found",
                    self.pool.opts.service, self.pool.label
                )));
            }
        }
    }

    /// Whether a failed call is worth trying again on another replica.
    fn can_retry(&self) -> bool {
        self.pinned.is_none() && self.pool.replicas.read().len() > 1
    }

    /// Calls `f` (which builds and sends one request) under the deadline; an `UNAVAILABLE`
    /// answer (the replica could not be reached) is retried on the other replicas. Only for
    /// calls that are safe to repeat — every orly RPC but the NIP-77 session ones is.
    pub async fn call<T, F, Fut>(&self, what: &'static str, mut f: F) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let tries = if self.can_retry() {
            self.pool.replicas.read().len().min(3)
        } else {
            1
        };
        let mut last = None;
        for _ in 0..tries {
            match self.once(what, f()).await {
                Err(CallError::Status(s)) if s.code() == Code::Unavailable => last = Some(s),
                other => return other,
            }
        }
        Err(CallError::Status(last.unwrap_or_else(|| {
            Status::unavailable("no replica answered")
        })))
    }

    /// One attempt under the deadline, no retry (for calls that must not repeat).
    pub async fn once<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.pool.opts.timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(CallError::Status(s)),
            Err(_) => Err(CallError::Timeout {
                what,
                after: self.pool.opts.timeout,
            }),
        }
    }

    /// A request carrying the call deadline (sent as `grpc-timeout`, so the server gives up
    /// when the client has).
    pub fn request<M>(&self, msg: M) -> tonic::Request<M> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.pool.opts.timeout);
        r
    }

    /// A readable message for a failed call: service, address, code, message and cause.
    pub fn describe(&self, e: &CallError) -> String {
        match e {
            CallError::Status(s) => {
                let mut msg = format!(
                    "{} at {}: {:?}: {}",
                    self.pool.opts.service,
                    self.pool.label,
                    s.code(),
                    s.message()
                );
                if let Some(src) = std::error::Error::source(s) {
                    msg.push_str(&format!(" ({src})"));
                }
                msg
            }
            CallError::Timeout { what, after } => format!(
                "{} at {}: {what} timed out after {after:?}",
                self.pool.opts.service, self.pool.label
            ),
        }
    }
}

/// A failed call.
#[derive(Debug)]
pub enum CallError {
    Status(Status),
    Timeout { what: &'static str, after: Duration },
}

impl CallError {
    /// The gRPC status code (`DEADLINE_EXCEEDED` for a local timeout).
    pub fn code(&self) -> Code {
        match self {
            CallError::Status(s) => s.code(),
            CallError::Timeout { .. } => Code::DeadlineExceeded,
        }
    }

    /// The server's message (empty for a timeout).
    pub fn message(&self) -> &str {
        match self {
            CallError::Status(s) => s.message(),
            CallError::Timeout { .. } => "",
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Status(s) => write!(f, "{:?}: {}", s.code(), s.message()),
            CallError::Timeout { what, after } => write!(f, "{what} timed out after {after:?}"),
        }
    }
}

impl std::error::Error for CallError {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Request<Body>> for GrpcChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The replica is chosen per call; each replica's channel applies its own backpressure.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let replica = this.choose().await.map_err(|s| Box::new(s) as BoxError)?;
            if let Some(bearer) = this.pool.opts.security.bearer() {
                if let Ok(v) = http::HeaderValue::from_str(&bearer) {
                    req.headers_mut().insert(http::header::AUTHORIZATION, v);
                }
            }
            replica.in_flight.fetch_add(1, Ordering::Relaxed);
            let result = replica.channel.clone().oneshot(req).await;
            replica.in_flight.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(resp) => {
                    *replica.down_until.lock() = None;
                    Ok(resp)
                }
                Err(e) => {
                    tracing::debug!(service = this.pool.opts.service, replica = %replica.addr, error = %e, "replica unreachable");
                    this.pool.mark_down(&replica);
                    Err(e.into())
                }
            }
        })
    }
}

fn resolver(dns_servers: &[SocketAddr]) -> Result<TokioResolver, ClientError> {
    let builder = if dns_servers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| ClientError::Resolver(e.to_string()))?
    } else {
        let mut config = ResolverConfig::default();
        for s in dns_servers {
            let mut udp = ConnectionConfig::udp();
            udp.port = s.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = s.port();
            config.add_name_server(NameServerConfig::new(s.ip(), true, vec![udp, tcp]));
        }
        TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
    };
    builder
        .build()
        .map_err(|e| ClientError::Resolver(e.to_string()))
}

/// Resolves `names` now, every resolve interval and soon after a failure, while the pool
/// lives; `fixed` are the addresses given as IPs.
async fn resolve_loop(
    pool: Weak<Pool>,
    resolver: TokioResolver,
    names: Vec<Target>,
    fixed: BTreeMap<SocketAddr, String>,
) {
    let mut last_failure_resolve = Instant::now() - MIN_RESOLVE_GAP;
    loop {
        let Some((interval, service, label)) = pool
            .upgrade()
            .map(|p| (p.opts.resolve_interval, p.opts.service, p.label.clone()))
        else {
            return;
        };
        let mut found = fixed.clone();
        let mut failed = false;
        for t in &names {
            match resolver.lookup_ip(t.host.as_str()).await {
                Ok(ips) => {
                    for ip in ips.iter() {
                        found.insert(SocketAddr::new(ip, t.port), t.host.clone());
                    }
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(service, host = %t.host, error = %e, "cannot resolve a service address");
                }
            }
        }
        let Some(p) = pool.upgrade() else { return };
        // A name that does not resolve right now keeps the replicas it had: a DNS hiccup must
        // not take every replica away.
        if !failed || found.len() > fixed.len() {
            if found.is_empty() {
                tracing::warn!(service, address = %label, "no replica address found");
            }
            p.apply(found);
        } else if p.generation.borrow().eq(&0) {
            // Nothing yet: let waiting calls fail instead of hanging till their deadline.
            p.apply(fixed.clone());
        }
        let wake = p.resolve_now.clone();
        drop(p);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = wake.notified() => {
                let since = last_failure_resolve.elapsed();
                if since < MIN_RESOLVE_GAP {
                    tokio::time::sleep(MIN_RESOLVE_GAP - since).await;
                }
                last_failure_resolve = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_into_targets() {
        let t = parse_targets("x", "a:1, http://b:2 ,https://[::1]:3,a:1").unwrap();
        assert_eq!(
            t,
            vec![
                Target {
                    host: "a".into(),
                    port: 1
                },
                Target {
                    host: "b".into(),
                    port: 2
                },
                Target {
                    host: "[::1]".into(),
                    port: 3
                },
            ]
        );
        assert_eq!(t[2].ip(), Some("::1".parse().unwrap()));
        for bad in ["", " , ", "a", "a:x", "ftp://a:1", "a:1/path", ":1"] {
            assert!(parse_targets("x", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dns_servers_parse() {
        assert_eq!(
            parse_dns_servers("127.0.0.1:5353, 10.0.0.1").unwrap(),
            vec![
                "127.0.0.1:5353".parse().unwrap(),
                "10.0.0.1:53".parse().unwrap()
            ]
        );
        assert!(parse_dns_servers("nope").is_err());
    }

    #[tokio::test]
    async fn ip_targets_need_no_resolution_and_pinned_channels_fail_once_their_replica_is_gone() {
        let ch = GrpcChannel::connect_lazy(
            "127.0.0.1:1,127.0.0.2:1",
            ClientOptions::new("test", Duration::from_millis(200)),
        )
        .unwrap();
        assert_eq!(ch.replicas().len(), 2);
        let a = ch.pick().await.unwrap();
        let b = ch.pick().await.unwrap();
        assert_ne!(a, b, "round robin over idle replicas");
        let gone = ch.pinned("127.0.0.3:1".parse().unwrap());
        assert_eq!(gone.pick().await.unwrap_err().code(), Code::Unavailable);
    }
}
