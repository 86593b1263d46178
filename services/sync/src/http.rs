//! HTTP on both sides of the peer protocols: the requests the relay forwards to a service
//! ([`HttpRequest`] / [`HttpResponse`], the shapes of `orlysync.common.v1`), the NIP-98 check of
//! a forwarded request, and [`PeerHttp`], the client that calls peers' endpoints with a NIP-98
//! header signed by the relay identity key.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nostr::Keys;
use orly_acl::nip98;
use orly_proto::orlysync::common::v1 as pb;
use serde::de::DeserializeOwned;

use crate::error::SyncError;

/// An HTTP request as the relay forwards it (header names lowercase).
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub query_string: String,
    pub remote_addr: String,
}

/// The answer a service gives to a forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A JSON body.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        Self {
            status,
            headers: BTreeMap::from([("content-type".into(), "application/json".into())]),
            body,
        }
    }

    /// A plain-text body (ORLY answers errors this way).
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        Self {
            status,
            headers: BTreeMap::from([("content-type".into(), "text/plain; charset=utf-8".into())]),
            body: text.into().into_bytes(),
        }
    }
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The full URL the client addressed, as NIP-98 binds it: scheme (`X-Forwarded-Proto`,
    /// else http), `Host`, path and query.
    pub fn full_url(&self) -> String {
        let scheme = self
            .header("x-forwarded-proto")
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "http".into());
        let host = self.header("host").unwrap_or_default();
        if self.query_string.is_empty() {
            format!("{scheme}://{host}{}", self.path)
        } else {
            format!("{scheme}://{host}{}?{}", self.path, self.query_string)
        }
    }

    /// Checks the request's NIP-98 header at `now` (a body must be covered by its `payload`
    /// tag) and returns the authorization: claim it against replays
    /// ([`nip98::ReplayCache::claim`]) once its signer is known to be a peer.
    pub fn nip98_signer(&self, now: u64) -> Result<nip98::Nip98Auth, nip98::Nip98Error> {
        let url = self.full_url();
        nip98::verify(
            self.header("authorization"),
            nip98::HttpRequestInfo {
                url: &url,
                method: &self.method,
                body: &self.body,
            },
            now,
        )
    }

    /// The value of one query parameter (no percent-decoding: the sync parameters are numbers
    /// and hex).
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query_string
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

impl From<pb::HttpRequest> for HttpRequest {
    fn from(r: pb::HttpRequest) -> Self {
        Self {
            method: r.method,
            path: r.path,
            headers: r
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            body: r.body,
            query_string: r.query_string,
            remote_addr: r.remote_addr,
        }
    }
}

impl From<HttpRequest> for pb::HttpRequest {
    fn from(r: HttpRequest) -> Self {
        Self {
            method: r.method,
            path: r.path,
            headers: r.headers.into_iter().collect(),
            body: r.body,
            query_string: r.query_string,
            remote_addr: r.remote_addr,
        }
    }
}

impl From<pb::HttpResponse> for HttpResponse {
    fn from(r: pb::HttpResponse) -> Self {
        Self {
            status: u16::try_from(r.status_code).unwrap_or(500),
            headers: r.headers.into_iter().collect(),
            body: r.body,
        }
    }
}

impl From<HttpResponse> for pb::HttpResponse {
    fn from(r: HttpResponse) -> Self {
        Self {
            status_code: i32::from(r.status),
            headers: r.headers.into_iter().collect(),
            body: r.body,
        }
    }
}

/// The base HTTP URL of a peer relay: `ws`→`http`, `wss`→`https`, no trailing `/`, host
/// required. ORLY lists peers as http(s) URLs; both forms are accepted.
pub fn normalize_http_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("peer URL {url:?} has no scheme"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "http",
        "https" | "wss" => "https",
        other => return Err(format!("peer URL {url:?} has unsupported scheme {other:?}")),
    };
    let rest = rest.trim_end_matches('/');
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) || rest.contains(['?', '#']) {
        return Err(format!("peer URL {url:?} has no valid host"));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// The WebSocket URL of a peer relay (`http`→`ws`, `https`→`wss`).
pub fn to_ws_url(http_url: &str) -> String {
    if let Some(rest) = http_url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = http_url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        http_url.to_string()
    }
}

/// A comma-separated URL list, normalised with [`normalize_http_url`], duplicates dropped.
pub fn parse_url_list(s: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for u in s.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let u = normalize_http_url(u)?;
        if !out.contains(&u) {
            out.push(u);
        }
    }
    Ok(out)
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Calls peers' HTTP endpoints: every request has a deadline and a response-size cap, and the
/// sync requests carry a NIP-98 header (`u` exact, `method`, `payload`) signed by our identity.
#[derive(Clone)]
pub struct PeerHttp {
    client: HttpsClient,
    timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for PeerHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerHttp")
            .field("timeout", &self.timeout)
            .field("max_body", &self.max_body)
            .finish()
    }
}

impl PeerHttp {
    /// A client whose requests time out after `timeout` and whose responses may not exceed
    /// `max_body` bytes.
    pub fn new(timeout: Duration, max_body: usize) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Self {
            client,
            timeout,
            max_body,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends one request; returns status and body. `keys` signs a NIP-98 header.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
        keys: Option<&Keys>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), SyncError> {
        let mut req = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(keys) = keys {
            let now = nostr::Timestamp::now().as_secs();
            req = req.header(
                http::header::AUTHORIZATION,
                nip98::authorization_header(keys, url, method, body.as_deref(), now),
            );
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| SyncError::peer(url, format!("bad request URL: {e}")))?;
        let max = self.max_body;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| SyncError::peer(url, format!("request failed: {e}")))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), max)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        SyncError::garbage(url, format!("response larger than {max} bytes"))
                    } else {
                        SyncError::peer(url, format!("reading the response: {e}"))
                    }
                })?
                .to_bytes();
            Ok::<_, SyncError>((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| SyncError::peer(url, format!("no answer within {timeout:?}")))?
    }

    /// A signed JSON exchange: `Err` unless the status is 200 and the body parses as `T`.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        url: &str,
        body: Option<Vec<u8>>,
        keys: &Keys,
        timeout: Duration,
    ) -> Result<T, SyncError> {
        let (status, body) = self
            .send(method, url, &[], body, Some(keys), timeout)
            .await?;
        if status != 200 {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(SyncError::peer(
                url,
                format!("HTTP {status}: {}", text.trim()),
            ));
        }
        serde_json::from_slice(&body).map_err(|e| SyncError::garbage(url, format!("bad JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives one request on a loopback port: its (lowercase) headers and body.
    async fn capture_one() -> (
        String,
        tokio::task::JoinHandle<(BTreeMap<String, String>, Vec<u8>)>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api/sync/current", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let head_end = loop {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed before the headers ended");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let headers: BTreeMap<String, String> = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed before the body ended");
                buf.extend_from_slice(&chunk[..n]);
            }
            let reply = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
            s.write_all(reply.as_bytes()).await.unwrap();
            (headers, buf[head_end..head_end + len].to_vec())
        });
        (url, task)
    }

    #[tokio::test]
    async fn peer_requests_are_signed_for_their_body() {
        let keys = Keys::generate();
        let http = PeerHttp::new(Duration::from_secs(5), 1024);
        for (method, body) in [
            (
                "POST",
                Some(br#"{"node_id":"n","relay_url":"http://r"}"#.to_vec()),
            ),
            ("GET", None),
        ] {
            let (url, server) = capture_one().await;
            let (status, _) = http
                .send(
                    method,
                    &url,
                    &[],
                    body.clone(),
                    Some(&keys),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            assert_eq!(status, 200);
            let (headers, received) = server.await.unwrap();
            // What a receiving orly checks, payload tag required for a body.
            let auth = nip98::verify(
                headers.get("authorization").map(String::as_str),
                nip98::HttpRequestInfo {
                    url: &url,
                    method,
                    body: &received,
                },
                nostr::Timestamp::now().as_secs(),
            )
            .unwrap_or_else(|e| panic!("{method}: {e}"));
            assert_eq!(auth.signer, keys.public_key());
            assert_eq!(received, body.unwrap_or_default());
        }
    }

    #[test]
    fn peer_urls_normalise_to_http() {
        assert_eq!(
            normalize_http_url("wss://a.example/").unwrap(),
            "https://a.example"
        );
        assert_eq!(
            normalize_http_url("ws://127.0.0.1:7").unwrap(),
            "http://127.0.0.1:7"
        );
        assert_eq!(normalize_http_url(" HTTP://h/p/ ").unwrap(), "http://h/p");
        assert!(normalize_http_url("ftp://h").is_err());
        assert!(normalize_http_url("https://").is_err());
        assert!(normalize_http_url("h.example").is_err());
        assert_eq!(to_ws_url("https://a/b"), "wss://a/b");
        assert_eq!(
            parse_url_list("ws://a, http://a/,,https://b").unwrap(),
            vec!["http://a".to_string(), "https://b".to_string()]
        );
    }

    #[test]
    fn forwarded_requests_rebuild_their_url_and_query() {
        let req = HttpRequest {
            method: "GET".into(),
            path: "/cluster/events".into(),
            headers: BTreeMap::from([
                ("host".into(), "r.example:80".into()),
                ("x-forwarded-proto".into(), "https".into()),
            ]),
            query_string: "from=1&to=9&limit".into(),
            ..HttpRequest::default()
        };
        assert_eq!(
            req.full_url(),
            "https://r.example:80/cluster/events?from=1&to=9&limit"
        );
        assert_eq!(req.query("to"), Some("9"));
        assert_eq!(req.query("limit"), Some(""));
        assert_eq!(req.query("x"), None);
    }
}
