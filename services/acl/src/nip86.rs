//! NIP-86 relay management: `POST /api/nip86`, `Content-Type: application/nostr+json+rpc`,
//! a JSON-RPC-like body `{"method", "params"}` answered with `{"result"}` or `{"error"}`,
//! authorized by NIP-98 from an owner or admin, in ACL mode `managed`. Works on any
//! [`AclAdmin`], so the lists live wherever the ACL does (in-process or in orly-acl).

use serde_json::{json, Value};

use crate::nip98::{self, HttpRequestInfo, ReplayCache};
use crate::{AclAdmin, AclError, ListEntry, ListKind, Mode};

/// The path the relay serves NIP-86 on.
pub const PATH: &str = "/api/nip86";
/// The content type NIP-86 requests carry (and responses use).
pub const CONTENT_TYPE: &str = "application/nostr+json+rpc";

/// Every method implemented, as `supportedmethods` lists them.
pub const SUPPORTED_METHODS: &[&str] = &[
    "supportedmethods",
    "banpubkey",
    "unbanpubkey",
    "listbannedpubkeys",
    "allowpubkey",
    "unallowpubkey",
    "listallowedpubkeys",
    "banevent",
    "allowevent",
    "listbannedevents",
    "listallowedevents",
    "allowkind",
    "disallowkind",
    "listallowedkinds",
    "blockip",
    "unblockip",
    "listblockedips",
];

/// The parts of an HTTP request NIP-86 looks at.
#[derive(Debug, Clone, Copy)]
pub struct Nip86Request<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub headers: &'a http::HeaderMap,
    pub body: &'a [u8],
}

/// An HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Nip86Response {
    pub status: u16,
    pub body: Value,
}

impl Nip86Response {
    fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({"result": null, "error": message.into()}),
        }
    }

    fn result(result: Value) -> Self {
        Self {
            status: 200,
            body: json!({"result": result, "error": null}),
        }
    }
}

/// Answers one NIP-86 request at `now` (unix seconds), refusing replayed authorizations with
/// the process-wide [`ReplayCache`].
pub async fn handle(admin: &dyn AclAdmin, req: Nip86Request<'_>, now: u64) -> Nip86Response {
    handle_with(admin, req, now, ReplayCache::global()).await
}

/// [`handle`] with its own replay cache. Every refusal's `error` starts with a NIP-01 prefix:
/// `invalid:` (bad request), `auth-required:` (NIP-98 missing, wrong or replayed),
/// `restricted:` (not an admin, wrong mode), `error:` (access control unreachable).
pub async fn handle_with(
    admin: &dyn AclAdmin,
    req: Nip86Request<'_>,
    now: u64,
    replay: &ReplayCache,
) -> Nip86Response {
    if req.method != http::Method::POST {
        return Nip86Response::error(405, "invalid: NIP-86 requests must use POST");
    }
    let content_type = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.to_ascii_lowercase().starts_with(CONTENT_TYPE) {
        return Nip86Response::error(400, format!("invalid: Content-Type must be {CONTENT_TYPE}"));
    }
    let url = nip98::request_url(req.headers, req.uri);
    let auth = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let auth = match nip98::verify(
        auth,
        HttpRequestInfo {
            url: &url,
            method: req.method.as_str(),
            body: req.body,
        },
        now,
    ) {
        Ok(auth) => auth,
        Err(e) => return refused_auth(e),
    };
    let signer = auth.signer;
    match admin.access_level(&signer).await {
        Ok(level) if level.is_admin() => {}
        Ok(_) => {
            return Nip86Response::error(
                403,
                "restricted: only owners and admins may manage this relay",
            )
        }
        Err(e) => return unavailable(e),
    }
    // Claimed only for admins, so strangers' valid signatures never fill the cache.
    if let Err(e) = replay.claim(&auth, now) {
        return refused_auth(e);
    }
    match admin.current_mode().await {
        Ok(Mode::Managed) => {}
        Ok(mode) => {
            return Nip86Response::error(
                400,
                format!(
                    "restricted: relay management needs ACL mode managed; this relay runs \
                     mode {mode}"
                ),
            )
        }
        Err(e) => return unavailable(e),
    }
    let resp = dispatch(admin, req.body).await;
    tracing::info!(by = %signer, status = resp.status, "NIP-86 call");
    resp
}

/// The JSON-RPC body handler of an authorized request: parses `{"method", "params"}` and
/// runs the call. Any input gets an answer: a `result`, or an `error` with a NIP-01 prefix.
pub async fn dispatch(admin: &dyn AclAdmin, body: &[u8]) -> Nip86Response {
    let (method, params) = match parse_call(body) {
        Ok(call) => call,
        Err(e) => return Nip86Response::error(400, format!("invalid: {e}")),
    };
    match call(admin, &method, &params).await {
        Ok(result) => {
            tracing::debug!(%method, "NIP-86 call answered");
            Nip86Response::result(result)
        }
        Err(AclError::InvalidArgument(msg)) => Nip86Response::error(200, format!("invalid: {msg}")),
        Err(e) => unavailable(e),
    }
}

fn refused_auth(e: nip98::Nip98Error) -> Nip86Response {
    Nip86Response::error(401, format!("auth-required: NIP-98: {e}"))
}

fn unavailable(e: AclError) -> Nip86Response {
    Nip86Response::error(503, format!("error: {e}"))
}

/// `{"method": "<name>", "params": [...]}`; params may be omitted.
fn parse_call(body: &[u8]) -> Result<(String, Vec<Value>), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("malformed JSON-RPC request: {e}"))?;
    let Some(obj) = v.as_object() else {
        return Err("malformed JSON-RPC request: expected an object".into());
    };
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return Err("malformed JSON-RPC request: \"method\" must be a string".into());
    };
    let params = match obj.get("params") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err("malformed JSON-RPC request: \"params\" must be an array".into()),
    };
    Ok((method.to_string(), params))
}

fn invalid(msg: impl Into<String>) -> AclError {
    AclError::InvalidArgument(msg.into())
}

/// The first param as a string key, normalized for `list`.
fn key_param(list: ListKind, params: &[Value], what: &str) -> Result<String, AclError> {
    let raw = match params.first() {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if list == ListKind::AllowedKinds => n.to_string(),
        _ => return Err(invalid(format!("params[0] must be the {what}"))),
    };
    list.normalize_key(&raw)
}

fn reason_param(params: &[Value]) -> Result<String, AclError> {
    match params.get(1) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid("params[1] must be a reason string")),
    }
}

fn entries(list: Vec<ListEntry>, field: &str) -> Value {
    Value::Array(
        list.into_iter()
            .map(|e| json!({ field: e.key, "reason": e.reason }))
            .collect(),
    )
}

async fn call(admin: &dyn AclAdmin, method: &str, params: &[Value]) -> Result<Value, AclError> {
    use ListKind::*;
    let add = |list: ListKind, what: &'static str| async move {
        let key = key_param(list, params, what)?;
        let reason = reason_param(params)?;
        admin.list_add(list, &key, &reason).await?;
        Ok::<Value, AclError>(Value::Bool(true))
    };
    let remove = |list: ListKind, what: &'static str| async move {
        let key = key_param(list, params, what)?;
        admin.list_remove(list, &key).await?;
        Ok::<Value, AclError>(Value::Bool(true))
    };
    match method {
        "supportedmethods" => Ok(json!(SUPPORTED_METHODS)),
        "banpubkey" => add(BannedPubkeys, "pubkey (hex)").await,
        "unbanpubkey" => remove(BannedPubkeys, "pubkey (hex)").await,
        "listbannedpubkeys" => Ok(entries(admin.list(BannedPubkeys).await?, "pubkey")),
        "allowpubkey" => add(AllowedPubkeys, "pubkey (hex)").await,
        "unallowpubkey" => remove(AllowedPubkeys, "pubkey (hex)").await,
        "listallowedpubkeys" => Ok(entries(admin.list(AllowedPubkeys).await?, "pubkey")),
        "banevent" => add(BannedEvents, "event id (hex)").await,
        "allowevent" => add(AllowedEvents, "event id (hex)").await,
        "listbannedevents" => Ok(entries(admin.list(BannedEvents).await?, "id")),
        "listallowedevents" => Ok(entries(admin.list(AllowedEvents).await?, "id")),
        "allowkind" => {
            key_number(params)?;
            add(AllowedKinds, "kind (number)").await
        }
        "disallowkind" => {
            key_number(params)?;
            remove(AllowedKinds, "kind (number)").await
        }
        "listallowedkinds" => Ok(Value::Array(
            admin
                .list(AllowedKinds)
                .await?
                .into_iter()
                .filter_map(|e| e.key.parse::<u64>().ok())
                .map(Value::from)
                .collect(),
        )),
        "blockip" => add(BlockedIps, "IP address").await,
        "unblockip" => remove(BlockedIps, "IP address").await,
        "listblockedips" => Ok(entries(admin.list(BlockedIps).await?, "ip")),
        other => Err(invalid(format!("unknown method {other:?}"))),
    }
}

/// Kinds are JSON numbers in NIP-86.
fn key_number(params: &[Value]) -> Result<(), AclError> {
    match params.first() {
        Some(Value::Number(_)) => Ok(()),
        _ => Err(invalid("params[0] must be the kind (number)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::{assert_well_formed, MemoryAdmin};
    use nostr::{EventBuilder, JsonUtil, Keys, Kind, Tag, Timestamp};

    const NOW: u64 = 1_700_000_000;

    fn headers(auth: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::HOST, "relay.example".parse().unwrap());
        h.insert(http::header::CONTENT_TYPE, CONTENT_TYPE.parse().unwrap());
        if let Some(a) = auth {
            h.insert(http::header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    async fn post(
        admin: &MemoryAdmin,
        replay: &ReplayCache,
        auth: Option<&str>,
        body: &str,
    ) -> Nip86Response {
        let uri: http::Uri = PATH.parse().unwrap();
        let headers = headers(auth);
        let r = handle_with(
            admin,
            Nip86Request {
                method: &http::Method::POST,
                uri: &uri,
                headers: &headers,
                body: body.as_bytes(),
            },
            NOW,
            replay,
        )
        .await;
        assert_well_formed(&r);
        r
    }

    fn error(r: &Nip86Response) -> &str {
        r.body["error"].as_str().unwrap_or("")
    }

    #[tokio::test]
    async fn a_header_is_good_for_one_call_and_its_own_body() {
        let owner = Keys::generate();
        let admin = MemoryAdmin::managed(&[owner.public_key()]);
        let replay = ReplayCache::new(100);
        let url = "http://relay.example/api/nip86";
        let target = Keys::generate().public_key().to_hex();
        let body = format!(r#"{{"method":"banpubkey","params":["{target}"]}}"#);
        let good = nip98::authorization_header(&owner, url, "POST", Some(body.as_bytes()), NOW);
        let r = post(&admin, &replay, Some(&good), &body).await;
        assert_eq!((r.status, &r.body["result"]), (200, &json!(true)), "{r:?}");

        // The same header once more: a replay.
        let r = post(&admin, &replay, Some(&good), &body).await;
        assert_eq!(r.status, 401, "{r:?}");
        assert!(
            error(&r).starts_with("auth-required:") && error(&r).contains("used before"),
            "{r:?}"
        );

        // Signed without a payload tag: the body is not covered, refused.
        let bare = EventBuilder::new(Kind::HttpAuth, "")
            .tags([
                Tag::parse(["u", url]).unwrap(),
                Tag::parse(["method", "POST"]).unwrap(),
            ])
            .custom_created_at(Timestamp::from(NOW))
            .sign_with_keys(&owner)
            .unwrap();
        use base64::Engine;
        let bare = format!(
            "Nostr {}",
            base64::engine::general_purpose::STANDARD.encode(bare.as_json())
        );
        let unban = format!(r#"{{"method":"unbanpubkey","params":["{target}"]}}"#);
        let r = post(&admin, &replay, Some(&bare), &unban).await;
        assert_eq!(r.status, 401, "{r:?}");
        assert!(error(&r).contains("no payload tag"), "{r:?}");

        // Signed for another body.
        let other = nip98::authorization_header(&owner, url, "POST", Some(body.as_bytes()), NOW);
        let r = post(&admin, &replay, Some(&other), &unban).await;
        assert_eq!(r.status, 401, "{r:?}");
        assert!(error(&r).contains("payload tag does not match"), "{r:?}");
        // Nothing of that reached the lists: the key is still banned.
        assert_eq!(admin.snapshot().len(), 1);

        // A stranger's valid header is refused without being remembered.
        let stranger = Keys::generate();
        let h = nip98::authorization_header(&stranger, url, "POST", Some(unban.as_bytes()), NOW);
        let r = post(&admin, &replay, Some(&h), &unban).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert!(error(&r).starts_with("restricted:"), "{r:?}");
        assert_eq!(replay.len(), 1);
    }

    #[test]
    fn calls_are_parsed_strictly() {
        assert_eq!(
            parse_call(br#"{"method":"banpubkey","params":["ab"]}"#).unwrap(),
            ("banpubkey".to_string(), vec![json!("ab")])
        );
        assert_eq!(
            parse_call(br#"{"method":"supportedmethods"}"#).unwrap().1,
            Vec::<Value>::new()
        );
        assert!(parse_call(b"{").is_err());
        assert!(parse_call(b"[]").is_err());
        assert!(parse_call(br#"{"method":1}"#).is_err());
        assert!(parse_call(br#"{"method":"x","params":{}}"#).is_err());
    }
}
