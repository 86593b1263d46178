//! NIP-98 HTTP authorization: `Authorization: Nostr <base64 kind-27235 event>` bound to the
//! request's full URL and method (and body, when a `payload` tag is present), signed within
//! ±60 s of now. Both base64 alphabets are accepted (NIP-98 uses the standard one, ORLY the
//! URL-safe one).

use base64::Engine;
use nostr::{Event, JsonUtil, Kind, PublicKey, TagKind};
use sha2::{Digest, Sha256};

/// How far `created_at` may be from now.
pub const TIME_WINDOW_SECS: u64 = 60;

/// Why an authorization header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nip98Error {
    #[error("missing Authorization header")]
    Missing,
    #[error("Authorization header is not \"Nostr <base64 event>\"")]
    Malformed,
    #[error("authorization event is not valid JSON: {0}")]
    BadEvent(String),
    #[error("authorization event must be kind 27235")]
    WrongKind,
    #[error("authorization event created_at is outside ±{TIME_WINDOW_SECS}s of now")]
    Expired,
    #[error("authorization u tag {got:?} does not match the request URL {want:?}")]
    WrongUrl { got: String, want: String },
    #[error("authorization method tag does not match {0}")]
    WrongMethod(String),
    #[error("authorization payload tag does not match the body")]
    WrongPayload,
    #[error("authorization event has a bad id or signature")]
    BadSignature,
}

/// What the request looked like: the URL the client must have signed, its method and body.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequestInfo<'a> {
    pub url: &'a str,
    pub method: &'a str,
    pub body: &'a [u8],
}

/// The full URL of a request as ORLY reconstructs it: scheme from `X-Forwarded-Proto`
/// (else `http`), the `Host` header, and the path with its query.
pub fn request_url(headers: &http::HeaderMap, uri: &http::Uri) -> String {
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "http".into());
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("{scheme}://{host}{path}")
}

/// Decodes base64 in either alphabet, padded or not.
fn decode_b64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim();
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

/// Checks an `Authorization` header value against a request at `now` (unix seconds) and
/// returns the signer.
pub fn verify(
    header: Option<&str>,
    req: HttpRequestInfo<'_>,
    now: u64,
) -> Result<PublicKey, Nip98Error> {
    let header = header.map(str::trim).filter(|h| !h.is_empty());
    let Some(header) = header else {
        return Err(Nip98Error::Missing);
    };
    let (scheme, b64) = header.split_once(' ').ok_or(Nip98Error::Malformed)?;
    if !scheme.eq_ignore_ascii_case("nostr") {
        return Err(Nip98Error::Malformed);
    }
    let json = decode_b64(b64).ok_or(Nip98Error::Malformed)?;
    let json = String::from_utf8(json).map_err(|_| Nip98Error::Malformed)?;
    let event = Event::from_json(&json).map_err(|e| Nip98Error::BadEvent(e.to_string()))?;
    if event.kind != Kind::HttpAuth {
        return Err(Nip98Error::WrongKind);
    }
    if event.created_at.as_secs().abs_diff(now) > TIME_WINDOW_SECS {
        return Err(Nip98Error::Expired);
    }
    let tag = |name: &str| {
        event
            .tags
            .find(TagKind::custom(name))
            .and_then(|t| t.content())
            .map(str::to_string)
    };
    let u = tag("u").unwrap_or_default();
    if u != req.url {
        return Err(Nip98Error::WrongUrl {
            got: u,
            want: req.url.to_string(),
        });
    }
    let method = tag("method").unwrap_or_default();
    if !method.eq_ignore_ascii_case(req.method) {
        return Err(Nip98Error::WrongMethod(req.method.to_string()));
    }
    if let Some(payload) = tag("payload") {
        let digest = hex::encode(Sha256::digest(req.body));
        if !payload.eq_ignore_ascii_case(&digest) {
            return Err(Nip98Error::WrongPayload);
        }
    }
    event.verify().map_err(|_| Nip98Error::BadSignature)?;
    Ok(event.pubkey)
}

/// Builds a header value for a request (URL-safe base64, like ORLY): for clients and tests.
pub fn authorization_header(
    keys: &nostr::Keys,
    url: &str,
    method: &str,
    body: Option<&[u8]>,
    created_at: u64,
) -> String {
    use base64::engine::general_purpose::URL_SAFE;
    let mut tags = vec![
        nostr::Tag::parse(["u", url]).expect("u tag"),
        nostr::Tag::parse(["method", &method.to_ascii_uppercase()]).expect("method tag"),
    ];
    if let Some(body) = body {
        tags.push(
            nostr::Tag::parse(["payload", &hex::encode(Sha256::digest(body))])
                .expect("payload tag"),
        );
    }
    let event = nostr::EventBuilder::new(Kind::HttpAuth, "")
        .tags(tags)
        .custom_created_at(nostr::Timestamp::from(created_at))
        .sign_with_keys(keys)
        .expect("signing with local keys");
    format!("Nostr {}", URL_SAFE.encode(event.as_json()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use nostr::{EventBuilder, Keys, Tag, Timestamp};

    const URL: &str = "http://relay.example/api/nip86";
    const NOW: u64 = 1_700_000_000;

    fn req(body: &[u8]) -> HttpRequestInfo<'_> {
        HttpRequestInfo {
            url: URL,
            method: "POST",
            body,
        }
    }

    #[test]
    fn a_good_header_names_its_signer_in_both_alphabets() {
        let keys = Keys::generate();
        let body = br#"{"method":"supportedmethods","params":[]}"#;
        let h = authorization_header(&keys, URL, "post", Some(body), NOW);
        assert_eq!(verify(Some(&h), req(body), NOW + 30), Ok(keys.public_key()));
        // The standard alphabet, without payload tag.
        let event = EventBuilder::new(Kind::HttpAuth, "")
            .tags([
                Tag::parse(["u", URL]).unwrap(),
                Tag::parse(["method", "POST"]).unwrap(),
            ])
            .custom_created_at(Timestamp::from(NOW))
            .sign_with_keys(&keys)
            .unwrap();
        let h = format!("Nostr {}", STANDARD.encode(event.as_json()));
        assert_eq!(
            verify(Some(&h), req(b"anything"), NOW),
            Ok(keys.public_key())
        );
    }

    #[test]
    fn every_mismatch_is_refused() {
        let keys = Keys::generate();
        let body = b"{}";
        let good = authorization_header(&keys, URL, "POST", Some(body), NOW);
        assert_eq!(verify(None, req(body), NOW), Err(Nip98Error::Missing));
        assert_eq!(
            verify(Some("Bearer abc"), req(body), NOW),
            Err(Nip98Error::Malformed)
        );
        assert_eq!(
            verify(Some("Nostr !!!"), req(body), NOW),
            Err(Nip98Error::Malformed)
        );
        assert_eq!(
            verify(Some(&good), req(body), NOW + 61),
            Err(Nip98Error::Expired)
        );
        assert_eq!(
            verify(Some(&good), req(body), NOW - 61),
            Err(Nip98Error::Expired)
        );
        assert!(matches!(
            verify(
                Some(&good),
                HttpRequestInfo {
                    url: "http://other.example/api/nip86",
                    ..req(body)
                },
                NOW
            ),
            Err(Nip98Error::WrongUrl { .. })
        ));
        assert!(matches!(
            verify(
                Some(&good),
                HttpRequestInfo {
                    method: "GET",
                    ..req(body)
                },
                NOW
            ),
            Err(Nip98Error::WrongMethod(_))
        ));
        assert_eq!(
            verify(Some(&good), req(b"{ }"), NOW),
            Err(Nip98Error::WrongPayload)
        );
        // Another kind.
        let event = EventBuilder::text_note("x")
            .tags([
                Tag::parse(["u", URL]).unwrap(),
                Tag::parse(["method", "POST"]).unwrap(),
            ])
            .custom_created_at(Timestamp::from(NOW))
            .sign_with_keys(&keys)
            .unwrap();
        let h = format!("Nostr {}", STANDARD.encode(event.as_json()));
        assert_eq!(verify(Some(&h), req(body), NOW), Err(Nip98Error::WrongKind));
        // A tampered event (id no longer matches).
        let json = STANDARD
            .encode(event.as_json().replace("\"kind\":1", "\"kind\":27235"))
            .to_string();
        assert_eq!(
            verify(Some(&format!("Nostr {json}")), req(body), NOW),
            Err(Nip98Error::BadSignature)
        );
    }

    #[test]
    fn the_url_comes_from_forwarded_proto_host_and_path() {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, "relay.example".parse().unwrap());
        let uri: http::Uri = "/api/nip86?x=1".parse().unwrap();
        assert_eq!(
            request_url(&headers, &uri),
            "http://relay.example/api/nip86?x=1"
        );
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(
            request_url(&headers, &uri),
            "https://relay.example/api/nip86?x=1"
        );
    }
}
