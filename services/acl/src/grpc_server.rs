//! The gRPC face of the engine: `orlyacl.v1.ACLService` delegating to an [`AclEngine`],
//! plus [`serve`], which adds `grpc.health.v1` (SERVING once the lists are loaded and the
//! store answers). Malformed keys are refused with `INVALID_ARGUMENT`, storage failures
//! with `UNAVAILABLE`.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use nostr::{Event, PublicKey};
use orly_proto::orlyacl::v1 as pb;
use pb::acl_service_server::{AclService, AclServiceServer};
use tonic::{Request, Response, Status};

use crate::engine::DECISION_CACHE_TTL;
use crate::{AclEngine, AclError, ListEntry, ListKind};

type GrpcResult<T> = Result<Response<T>, Status>;

/// `orlyacl.v1.ACLService` over a shared engine.
#[derive(Clone)]
pub struct AclGrpcService {
    engine: Arc<AclEngine>,
}

impl AclGrpcService {
    pub fn new(engine: Arc<AclEngine>) -> Self {
        Self { engine }
    }

    pub fn into_server(self) -> AclServiceServer<Self> {
        AclServiceServer::new(self)
    }
}

/// Serves the engine on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<AclEngine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let probe = engine.clone();
    let ready: orly_common::ReadinessCheck = Arc::new(move || {
        let engine = probe.clone();
        Box::pin(async move { engine.ready().await })
    });
    orly_common::serve_grpc(
        listener,
        AclGrpcService::new(engine).into_server(),
        ready,
        shutdown,
    )
    .await
}

fn acl_status(e: AclError) -> Status {
    match e {
        AclError::InvalidArgument(m) => Status::invalid_argument(m),
        AclError::Unavailable(m) => Status::unavailable(m),
        AclError::Config(m) => Status::internal(m),
    }
}

/// An optional pubkey: empty bytes mean none.
fn opt_pubkey(bytes: &[u8]) -> Result<Option<PublicKey>, Status> {
    if bytes.is_empty() {
        return Ok(None);
    }
    PublicKey::from_slice(bytes)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("invalid pubkey: {e}")))
}

fn pubkeys(list: &[Vec<u8>]) -> Result<Vec<PublicKey>, Status> {
    list.iter()
        .map(|b| {
            PublicKey::from_slice(b)
                .map_err(|e| Status::invalid_argument(format!("invalid pubkey: {e}")))
        })
        .collect()
}

/// An optional address: empty means none.
fn opt_ip(s: &str) -> Result<Option<IpAddr>, Status> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.trim()
        .parse()
        .map(Some)
        .map_err(|_| Status::invalid_argument(format!("invalid address {s:?}")))
}

fn ip_or_unspecified(s: &str) -> Result<IpAddr, Status> {
    Ok(opt_ip(s)?.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)))
}

fn event(e: Option<orly_proto::orlydb::v1::Event>) -> Result<Event, Status> {
    let e = e.ok_or_else(|| Status::invalid_argument("event is required"))?;
    Event::try_from(e).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Decisions this replica made, by operation and outcome (`orly_acl_checks_total`): shows
/// how the relays spread their calls over the replicas.
fn count_check(op: &'static str, d: &orly_common::acl::Decision) {
    let outcome = match d {
        orly_common::acl::Decision::Allow => "allow",
        orly_common::acl::Decision::Deny(_) => "deny",
    };
    metrics::counter!("orly_acl_checks_total", "op" => op, "decision" => outcome).increment(1);
}

fn decision(d: orly_common::acl::Decision, cacheable: bool) -> pb::Decision {
    let cache_ms = if cacheable {
        DECISION_CACHE_TTL.as_millis() as u32
    } else {
        0
    };
    match d {
        orly_common::acl::Decision::Allow => pb::Decision {
            allowed: true,
            reason: String::new(),
            cache_ms,
        },
        orly_common::acl::Decision::Deny(reason) => pb::Decision {
            allowed: false,
            reason,
            cache_ms,
        },
    }
}

impl AclGrpcService {
    async fn add(&self, list: ListKind, key: &str, reason: &str) -> GrpcResult<pb::Empty> {
        self.engine
            .add_to_list(list, key, reason)
            .await
            .map_err(acl_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn remove(&self, list: ListKind, key: &str) -> GrpcResult<pb::Empty> {
        self.engine
            .remove_from_list(list, key)
            .await
            .map_err(acl_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    fn entries(&self, list: ListKind) -> Vec<ListEntry> {
        self.engine.list_entries(list)
    }
}

#[tonic::async_trait]
impl AclService for AclGrpcService {
    async fn ready(&self, _: Request<pb::Empty>) -> GrpcResult<pb::ReadyResponse> {
        Ok(Response::new(pb::ReadyResponse {
            ready: self.engine.ready().await,
        }))
    }

    async fn get_access_level(
        &self,
        req: Request<pb::AccessLevelRequest>,
    ) -> GrpcResult<pb::AccessLevelResponse> {
        let req = req.into_inner();
        let pk = opt_pubkey(&req.pubkey)?;
        let ip = opt_ip(&req.address)?;
        Ok(Response::new(pb::AccessLevelResponse {
            level: self.engine.level(pk.as_ref(), ip).as_str().to_string(),
        }))
    }

    async fn check_policy(
        &self,
        req: Request<pb::PolicyCheckRequest>,
    ) -> GrpcResult<pb::PolicyCheckResponse> {
        let e = event(req.into_inner().event)?;
        Ok(Response::new(match self.engine.check_policy(&e) {
            Ok(()) => pb::PolicyCheckResponse {
                allowed: true,
                error: String::new(),
            },
            Err(error) => pb::PolicyCheckResponse {
                allowed: false,
                error,
            },
        }))
    }

    async fn check_write(&self, req: Request<pb::WriteCheckRequest>) -> GrpcResult<pb::Decision> {
        let req = req.into_inner();
        let e = event(req.event)?;
        let authed = pubkeys(&req.authed_pubkeys)?;
        let ip = ip_or_unspecified(&req.address)?;
        let d = self.engine.decide_write(&authed, ip, &e);
        count_check("write", &d.decision);
        Ok(Response::new(decision(d.decision, d.cacheable)))
    }

    async fn check_read(&self, req: Request<pb::ReadCheckRequest>) -> GrpcResult<pb::Decision> {
        let req = req.into_inner();
        let authed = pubkeys(&req.authed_pubkeys)?;
        let ip = ip_or_unspecified(&req.address)?;
        let d = self.engine.decide_read(&authed, ip);
        count_check("read", &d);
        let cacheable =
            !matches!(&d, orly_common::acl::Decision::Deny(r) if r.starts_with("error:"));
        Ok(Response::new(decision(d, cacheable)))
    }

    async fn get_acl_info(&self, _: Request<pb::Empty>) -> GrpcResult<pb::AclInfoResponse> {
        let mode = self.engine.mode_value();
        Ok(Response::new(pb::AclInfoResponse {
            name: mode.as_str().to_string(),
            description: match mode {
                crate::Mode::None => "open relay: everyone may read and write",
                crate::Mode::Follows => "admins and the pubkeys they follow may write",
                crate::Mode::Managed => "allow and ban lists administered over NIP-86",
            }
            .to_string(),
            documentation: "https://github.com/orly-relay/orly".to_string(),
        }))
    }

    async fn get_mode(&self, _: Request<pb::Empty>) -> GrpcResult<pb::ModeResponse> {
        Ok(Response::new(pb::ModeResponse {
            mode: self.engine.mode_value().as_str().to_string(),
        }))
    }

    async fn get_throttle_delay(
        &self,
        _: Request<pb::ThrottleDelayRequest>,
    ) -> GrpcResult<pb::ThrottleDelayResponse> {
        // Follows throttling is not implemented: no delay.
        Ok(Response::new(pb::ThrottleDelayResponse { delay_ms: 0 }))
    }

    async fn add_follow(&self, req: Request<pb::PubkeyRequest>) -> GrpcResult<pb::Empty> {
        let pk = orly_common::parse_pubkey(&req.into_inner().pubkey)
            .map_err(Status::invalid_argument)?;
        self.engine.add_follow(pk).await.map_err(acl_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_followed_pubkeys(&self, _: Request<pb::Empty>) -> GrpcResult<pb::PubkeyList> {
        Ok(Response::new(pb::PubkeyList {
            pubkeys: self
                .engine
                .followed_pubkeys()
                .iter()
                .map(PublicKey::to_hex)
                .collect(),
        }))
    }

    async fn refresh_follows(&self, _: Request<pb::Empty>) -> GrpcResult<pb::Empty> {
        if self.engine.mode_value() == crate::Mode::Follows {
            self.engine.refresh_follows().await.map_err(acl_status)?;
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn ban_pubkey(&self, req: Request<pb::BanPubkeyRequest>) -> GrpcResult<pb::Empty> {
        let r = req.into_inner();
        self.add(ListKind::BannedPubkeys, &r.pubkey, &r.reason)
            .await
    }

    async fn unban_pubkey(&self, req: Request<pb::PubkeyRequest>) -> GrpcResult<pb::Empty> {
        self.remove(ListKind::BannedPubkeys, &req.into_inner().pubkey)
            .await
    }

    async fn list_banned_pubkeys(&self, _: Request<pb::Empty>) -> GrpcResult<pb::BannedPubkeyList> {
        Ok(Response::new(pubkey_list(
            self.entries(ListKind::BannedPubkeys),
        )))
    }

    async fn allow_pubkey(&self, req: Request<pb::BanPubkeyRequest>) -> GrpcResult<pb::Empty> {
        let r = req.into_inner();
        self.add(ListKind::AllowedPubkeys, &r.pubkey, &r.reason)
            .await
    }

    async fn disallow_pubkey(&self, req: Request<pb::PubkeyRequest>) -> GrpcResult<pb::Empty> {
        self.remove(ListKind::AllowedPubkeys, &req.into_inner().pubkey)
            .await
    }

    async fn list_allowed_pubkeys(
        &self,
        _: Request<pb::Empty>,
    ) -> GrpcResult<pb::BannedPubkeyList> {
        Ok(Response::new(pubkey_list(
            self.entries(ListKind::AllowedPubkeys),
        )))
    }

    async fn ban_event(&self, req: Request<pb::BanEventRequest>) -> GrpcResult<pb::Empty> {
        let r = req.into_inner();
        self.add(ListKind::BannedEvents, &r.event_id, &r.reason)
            .await
    }

    async fn unban_event(&self, req: Request<pb::EventIdRequest>) -> GrpcResult<pb::Empty> {
        self.remove(ListKind::BannedEvents, &req.into_inner().event_id)
            .await
    }

    async fn list_banned_events(&self, _: Request<pb::Empty>) -> GrpcResult<pb::BannedEventList> {
        Ok(Response::new(event_list(
            self.entries(ListKind::BannedEvents),
        )))
    }

    async fn allow_event(&self, req: Request<pb::BanEventRequest>) -> GrpcResult<pb::Empty> {
        let r = req.into_inner();
        self.add(ListKind::AllowedEvents, &r.event_id, &r.reason)
            .await
    }

    async fn disallow_event(&self, req: Request<pb::EventIdRequest>) -> GrpcResult<pb::Empty> {
        self.remove(ListKind::AllowedEvents, &req.into_inner().event_id)
            .await
    }

    async fn list_allowed_events(&self, _: Request<pb::Empty>) -> GrpcResult<pb::BannedEventList> {
        Ok(Response::new(event_list(
            self.entries(ListKind::AllowedEvents),
        )))
    }

    async fn block_ip(&self, req: Request<pb::BlockIpRequest>) -> GrpcResult<pb::Empty> {
        let r = req.into_inner();
        self.add(ListKind::BlockedIps, &r.ip, &r.reason).await
    }

    async fn unblock_ip(&self, req: Request<pb::IpRequest>) -> GrpcResult<pb::Empty> {
        self.remove(ListKind::BlockedIps, &req.into_inner().ip)
            .await
    }

    async fn list_blocked_i_ps(&self, _: Request<pb::Empty>) -> GrpcResult<pb::BlockedIpList> {
        Ok(Response::new(pb::BlockedIpList {
            ips: self
                .entries(ListKind::BlockedIps)
                .into_iter()
                .map(|e| pb::BlockedIp {
                    ip: e.key,
                    reason: e.reason,
                    added: e.added,
                })
                .collect(),
        }))
    }

    async fn allow_kind(&self, req: Request<pb::AllowKindRequest>) -> GrpcResult<pb::Empty> {
        self.add(
            ListKind::AllowedKinds,
            &req.into_inner().kind.to_string(),
            "",
        )
        .await
    }

    async fn disallow_kind(&self, req: Request<pb::AllowKindRequest>) -> GrpcResult<pb::Empty> {
        self.remove(ListKind::AllowedKinds, &req.into_inner().kind.to_string())
            .await
    }

    async fn list_allowed_kinds(&self, _: Request<pb::Empty>) -> GrpcResult<pb::AllowedKindList> {
        Ok(Response::new(pb::AllowedKindList {
            kinds: self
                .entries(ListKind::AllowedKinds)
                .into_iter()
                .filter_map(|e| e.key.parse().ok())
                .collect(),
        }))
    }

    async fn update_peer_admins(
        &self,
        req: Request<pb::UpdatePeerAdminsRequest>,
    ) -> GrpcResult<pb::Empty> {
        let peers = pubkeys(&req.into_inner().peer_pubkeys)?;
        self.engine
            .set_peer_admins(peers)
            .await
            .map_err(acl_status)?;
        Ok(Response::new(pb::Empty {}))
    }
}

fn pubkey_list(entries: Vec<ListEntry>) -> pb::BannedPubkeyList {
    pb::BannedPubkeyList {
        pubkeys: entries
            .into_iter()
            .map(|e| pb::BannedPubkey {
                pubkey: e.key,
                reason: e.reason,
                added: e.added,
            })
            .collect(),
    }
}

fn event_list(entries: Vec<ListEntry>) -> pb::BannedEventList {
    pb::BannedEventList {
        events: entries
            .into_iter()
            .map(|e| pb::BannedEvent {
                event_id: e.key,
                reason: e.reason,
                added: e.added,
            })
            .collect(),
    }
}
