//! Trusted proxies: the client's address behind a reverse proxy or an ingress.
//!
//! A connection's TCP peer is the client unless it is one of the configured proxies
//! ([`TrustedProxies`]). When it is, the client is found in the `Forwarded` header (RFC 7239,
//! its `for=` parameters) or, without one, in `X-Forwarded-For`: every header instance in
//! order, each a comma-separated list, read **from the right**. Each proxy appends the address
//! it received the request from, so the entries right of the client were written by proxies
//! and everything left of it may be made up by the client. [`client_ip`] skips the trusted
//! hops from the right and returns the first untrusted one; a malformed entry, `unknown` or an
//! obfuscated identifier (`_hidden`) ends the walk, and then the last trusted hop seen is the
//! answer — never anything left of the entry that could not be read. A chain of trusted hops
//! only (a client inside a trusted network) gives its left-most entry.
//!
//! Entries are split at every `,` (and `Forwarded` parameters at every `;`), quotes or not:
//! no node identifier holds either, and this way a client's unterminated quote cannot swallow
//! the entries the proxies appended after it (such an entry reads as malformed).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use http::header::{HeaderMap, FORWARDED};
use ipnet::IpNet;

/// `X-Forwarded-For` (not among `http`'s standard header names).
const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// A trusted-proxy entry that is neither a CIDR nor an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid trusted proxy {entry:?}: expected a CIDR such as 10.0.0.0/8 or ::1/128, or an IP address")]
pub struct ProxyParseError {
    /// The entry as given (trimmed).
    pub entry: String,
}

/// Which header carries the proxies' chain (`ORLY_TRUSTED_PROXY_HEADER`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyHeader {
    /// `Forwarded` when the request has one, else `X-Forwarded-For`. Behind a proxy that only
    /// writes `X-Forwarded-For` and passes a client's `Forwarded` through, prefer
    /// [`ProxyHeader::XForwardedFor`]: a client could otherwise name any address in its own
    /// `Forwarded` header.
    #[default]
    Auto,
    /// `Forwarded` only.
    Forwarded,
    /// `X-Forwarded-For` only.
    #[value(name = "x-forwarded-for")]
    XForwardedFor,
}

/// The networks whose connections may say who the client is (`X-Forwarded-For`,
/// `Forwarded`). Empty by default: every TCP peer is the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    header: ProxyHeader,
}

impl TrustedProxies {
    /// No trusted proxy: headers are never read.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses a comma-separated list of CIDRs (`10.0.0.0/8, 127.0.0.1/32, ::1/128`); a bare
    /// address is a single host (/32, /128), empty entries are skipped, host bits are dropped
    /// (`10.1.2.3/8` is `10.0.0.0/8`).
    pub fn parse(list: &str) -> Result<Self, ProxyParseError> {
        let mut nets = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let net = IpNet::from_str(entry)
                .or_else(|_| IpAddr::from_str(entry).map(IpNet::from))
                .map_err(|_| ProxyParseError {
                    entry: entry.to_string(),
                })?;
            let net = net.trunc();
            if !nets.contains(&net) {
                nets.push(net);
            }
        }
        Ok(Self {
            nets,
            header: ProxyHeader::Auto,
        })
    }

    /// The same networks, reading the chain from `header` only.
    pub fn with_header(mut self, header: ProxyHeader) -> Self {
        self.header = header;
        self
    }

    pub fn header(&self) -> ProxyHeader {
        self.header
    }

    /// The trusted networks, in the order given.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Is `ip` inside a trusted network? An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what
    /// a dual-stack socket reports for IPv4 peers) also matches as its IPv4 address.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        self.nets
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&canonical))
    }
}

impl FromStr for TrustedProxies {
    type Err = ProxyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl std::fmt::Display for TrustedProxies {
    /// The list as [`TrustedProxies::parse`] reads it (`10.0.0.0/8,::1/128`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, n) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// One hop of a chain, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Addr(IpAddr),
    /// Malformed, `unknown`, obfuscated, or no `for=`: the walk ends here.
    Opaque,
}

/// The client's address for a request that reached us from `peer`: `peer.ip()` unless `peer`
/// is a trusted proxy, else the right-most untrusted hop of its chain (see the module docs).
pub fn client_ip(headers: &HeaderMap, peer: SocketAddr, trusted: &TrustedProxies) -> IpAddr {
    let mut current = peer.ip();
    if !trusted.is_trusted(current) {
        return current;
    }
    let hops = match trusted.header {
        ProxyHeader::Auto if has_values(headers, FORWARDED.as_str()) => forwarded_hops(headers),
        ProxyHeader::Auto => x_forwarded_for_hops(headers),
        ProxyHeader::Forwarded => forwarded_hops(headers),
        ProxyHeader::XForwardedFor => x_forwarded_for_hops(headers),
    };
    for hop in hops.into_iter().rev() {
        match hop {
            Hop::Addr(ip) if trusted.is_trusted(ip) => current = ip,
            Hop::Addr(ip) => return ip,
            Hop::Opaque => break,
        }
    }
    current
}

/// Does the request carry `name` with something in it?
fn has_values(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
}

/// The comma-separated entries of every instance of `name`, in order. An instance that is not
/// visible ASCII is one malformed entry; a blank instance has none.
fn entries(headers: &HeaderMap, name: &str, mut each: impl FnMut(Option<&str>)) {
    for value in headers.get_all(name) {
        match value.to_str() {
            Ok(text) if text.trim().is_empty() => {}
            Ok(text) => text.split(',').for_each(|e| each(Some(e.trim()))),
            Err(_) => each(None),
        }
    }
}

fn x_forwarded_for_hops(headers: &HeaderMap) -> Vec<Hop> {
    let mut hops = Vec::new();
    entries(headers, X_FORWARDED_FOR, |entry| {
        hops.push(entry.and_then(node).map_or(Hop::Opaque, Hop::Addr));
    });
    hops
}

fn forwarded_hops(headers: &HeaderMap) -> Vec<Hop> {
    let mut hops = Vec::new();
    entries(headers, FORWARDED.as_str(), |element| {
        hops.push(
            element
                .and_then(forwarded_for)
                .map_or(Hop::Opaque, Hop::Addr),
        );
    });
    hops
}

/// The address of a `Forwarded` element's `for=` parameter: `None` when it has none, more
/// than one, or one that is no address, and when any parameter is malformed.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let mut found = None;
    for pair in element.split(';').map(str::trim) {
        let (name, value) = pair.split_once('=')?;
        let (name, value) = (name.trim(), unquote(value.trim())?);
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return None;
        }
        if name.eq_ignore_ascii_case("for") {
            if found.is_some() {
                return None;
            }
            found = Some(node(&value)?);
        }
    }
    found
}

/// A token, or a quoted-string without its quotes and escapes.
fn unquote(value: &str) -> Option<String> {
    let Some(inner) = value.strip_prefix('"') else {
        return (!value.is_empty() && value.bytes().all(is_tchar_or_node)).then(|| value.into());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// RFC 7230 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Token characters plus what unquoted nodes carry in the wild (`[`, `]`, `:`).
fn is_tchar_or_node(b: u8) -> bool {
    is_tchar(b) || b"[]:".contains(&b)
}

/// A node (RFC 7239 section 6): an IPv4 or IPv6 address, IPv6 in brackets, either with a port
/// (`1.2.3.4:80`, `[::1]:443`, `[::1]:_port`). `unknown`, obfuscated names and anything else
/// are `None`.
fn node(s: &str) -> Option<IpAddr> {
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip = Ipv6Addr::from_str(ip).ok()?;
        return match after {
            "" => Some(IpAddr::V6(ip)),
            _ => after
                .strip_prefix(':')
                .filter(|p| is_port(p))
                .map(|_| IpAddr::V6(ip)),
        };
    }
    if let Ok(ip) = IpAddr::from_str(s) {
        return Some(ip);
    }
    let (ip, port) = s.rsplit_once(':')?;
    let ip = Ipv4Addr::from_str(ip).ok()?;
    is_port(port).then_some(IpAddr::V4(ip))
}

/// A port (0 to 65535 in digits) or an obfuscated one (`_` and token characters).
fn is_port(p: &str) -> bool {
    let digits = p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok();
    let obfuscated = p.len() > 1
        && p.starts_with('_')
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    digits || obfuscated
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn trusted(list: &str) -> TrustedProxies {
        TrustedProxies::parse(list).unwrap()
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40_000)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    const LAN: &str = "10.0.0.0/8, 127.0.0.1/32, ::1/128";

    #[test]
    fn parses_cidr_lists_and_names_the_bad_entry() {
        let t = trusted(" 10.0.0.0/8, 127.0.0.1/32 ,::1/128, 192.168.1.7, fd00::/8,");
        assert_eq!(
            t.to_string(),
            "10.0.0.0/8,127.0.0.1/32,::1/128,192.168.1.7/32,fd00::/8"
        );
        assert_eq!(trusted("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert!(trusted("").is_empty());
        assert_eq!(trusted(""), TrustedProxies::none());
        assert_eq!(
            "10.0.0.0/8".parse::<TrustedProxies>().unwrap().nets().len(),
            1
        );
        for bad in [
            "10.0.0.0/33",
            "example.com",
            "10.0.0.0/8/1",
            "::1/129",
            "1.2.3",
        ] {
            let e = TrustedProxies::parse(&format!("127.0.0.1/32, {bad}")).unwrap_err();
            assert_eq!(e.entry, bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn matches_ipv4_ipv6_and_mapped_addresses() {
        let t = trusted(LAN);
        assert!(t.is_trusted(ip("10.200.3.4")));
        assert!(t.is_trusted(ip("127.0.0.1")));
        assert!(!t.is_trusted(ip("127.0.0.2")));
        assert!(t.is_trusted(ip("::1")));
        assert!(!t.is_trusted(ip("::2")));
        assert!(t.is_trusted(ip("::ffff:10.1.1.1")));
        assert!(!t.is_trusted(ip("11.0.0.1")));
        assert!(!TrustedProxies::none().is_trusted(ip("127.0.0.1")));
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert_eq!(
            client_ip(&h, peer("203.0.113.9"), &trusted(LAN)),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(&h, peer("10.0.0.1"), &TrustedProxies::none()),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn a_trusted_peer_without_headers_is_the_client() {
        let t = trusted(LAN);
        assert_eq!(
            client_ip(&HeaderMap::new(), peer("10.0.0.1"), &t),
            ip("10.0.0.1")
        );
        for empty in ["", "  "] {
            let h = headers(&[("x-forwarded-for", empty), ("forwarded", empty)]);
            assert_eq!(client_ip(&h, peer("10.0.0.1"), &t), ip("10.0.0.1"));
        }
    }

    #[test]
    fn several_trusted_hops_are_skipped_from_the_right() {
        let t = trusted(LAN);
        // client -> 10.0.0.3 -> 10.0.0.2 -> (peer) 10.0.0.1
        let h = headers(&[("x-forwarded-for", "198.51.100.7, 10.0.0.3, 10.0.0.2")]);
        assert_eq!(client_ip(&h, peer("10.0.0.1"), &t), ip("198.51.100.7"));
        // The same chain over several header instances.
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-for", "10.0.0.3,10.0.0.2"),
        ]);
        assert_eq!(client_ip(&h, peer("10.0.0.1"), &t), ip("198.51.100.7"));
        // Only trusted hops: the left-most one is the client (inside the trusted networks).
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.0.0.2")]);
        assert_eq!(client_ip(&h, peer("127.0.0.1"), &t), ip("10.9.9.9"));
    }

    #[test]
    fn spoofed_left_most_entries_are_ignored() {
        let t = trusted(LAN);
        // The client sent "X-Forwarded-For: 127.0.0.1, 6.6.6.6"; the ingress appended its peer.
        let h = headers(&[("x-forwarded-for", "127.0.0.1, 6.6.6.6, 198.51.100.7")]);
        assert_eq!(client_ip(&h, peer("10.0.0.1"), &t), ip("198.51.100.7"));
        let h = headers(&[(
            "forwarded",
            "for=10.0.0.5, for=6.6.6.6;proto=https, for=198.51.100.7;by=10.0.0.1",
        )]);
        assert_eq!(client_ip(&h, peer("10.0.0.1"), &t), ip("198.51.100.7"));
    }

    #[test]
    fn forwarded_with_ipv6_and_ports() {
        let t = trusted(LAN);
        let h = headers(&[(
            "forwarded",
            r#"for="[2001:db8:cafe::17]:4711";proto=https, For="[::1]:8443""#,
        )]);
        assert_eq!(client_ip(&h, peer("::1"), &t), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", r#"for="192.0.2.60:8080";by="[::1]""#)]);
        assert_eq!(client_ip(&h, peer("127.0.0.1"), &t), ip("192.0.2.60"));
        let h = headers(&[("forwarded", "for=192.0.2.43")]);
        assert_eq!(client_ip(&h, peer("127.0.0.1"), &t), ip("192.0.2.43"));
        let h = headers(&[("forwarded", r#"for="[2001:db8::1]""#)]);
        assert_eq!(client_ip(&h, peer("127.0.0.1"), &t), ip("2001:db8::1"));
        let h = headers(&[("forwarded", r#"for="[2001:db8::1]:_hidden""#)]);
        assert_eq!(client_ip(&h, peer("127.0.0.1"), &t), ip("2001:db8::1"));
        // X-Forwarded-For with ports and brackets, as some proxies write it.
        let h = headers(&[("x-forwarded-for", "[2001:db8::2]:5000, 192.0.2.9:1234")]);
        assert_eq!(client_ip(&h, peer("127.0.0.1"), &t), ip("192.0.2.9"));
        let t6 = trusted("192.0.2.9/32, 127.0.0.1");
        assert_eq!(client_ip(&h, peer("127.0.0.1"), &t6), ip("2001:db8::2"));
    }

    #[test]
    fn forwarded_wins_over_x_forwarded_for_unless_told_otherwise() {
        let h = headers(&[
            ("forwarded", "for=192.0.2.1"),
            ("x-forwarded-for", "192.0.2.2"),
        ]);
        let t = trusted(LAN);
        assert_eq!(client_ip(&h, peer("10.0.0.1"), &t), ip("192.0.2.1"));
        let xff = t.clone().with_header(ProxyHeader::XForwardedFor);
        assert_eq!(client_ip(&h, peer("10.0.0.1"), &xff), ip("192.0.2.2"));
        let fwd = t.with_header(ProxyHeader::Forwarded);
        let only_xff = headers(&[("x-forwarded-for", "192.0.2.2")]);
        assert_eq!(client_ip(&only_xff, peer("10.0.0.1"), &fwd), ip("10.0.0.1"));
    }

    #[test]
    fn malformed_entries_stop_the_walk_at_the_last_trusted_hop() {
        let t = trusted(LAN);
        let p = peer("10.0.0.1");
        for (name, value, want) in [
            // Nothing beyond a malformed entry is believed.
            ("x-forwarded-for", "6.6.6.6, garbage, 10.0.0.2", "10.0.0.2"),
            ("x-forwarded-for", "6.6.6.6, , 10.0.0.2", "10.0.0.2"),
            ("x-forwarded-for", "6.6.6.6, 1.2.3.4:99999", "10.0.0.1"),
            ("x-forwarded-for", "6.6.6.6, fe80::1%eth0", "10.0.0.1"),
            (
                "forwarded",
                "for=6.6.6.6, for=unknown, for=10.0.0.2",
                "10.0.0.2",
            ),
            ("forwarded", "for=6.6.6.6, for=_hidden", "10.0.0.1"),
            ("forwarded", "for=6.6.6.6, proto=https", "10.0.0.1"),
            (
                "forwarded",
                "for=6.6.6.6, for=1.1.1.1;for=2.2.2.2",
                "10.0.0.1",
            ),
            ("forwarded", "for=6.6.6.6, for", "10.0.0.1"),
            ("forwarded", r#"for=6.6.6.6, for="198.51.100.1"#, "10.0.0.1"),
            ("forwarded", r#"for=6.6.6.6, for="1.1.1.1"x"#, "10.0.0.1"),
            ("forwarded", "for=6.6.6.6, for=[2001:db8::1]x", "10.0.0.1"),
            ("forwarded", "for=6.6.6.6, b@d=1;for=1.1.1.1", "10.0.0.1"),
            // An unterminated quote on the left cannot swallow the proxies' entries.
            (
                "forwarded",
                r#"for="6.6.6.6, for=198.51.100.1"#,
                "198.51.100.1",
            ),
        ] {
            let h = headers(&[(name, value)]);
            assert_eq!(client_ip(&h, p, &t), ip(want), "{name}: {value}");
        }
        // A header value that is not ASCII is one malformed entry.
        let mut h = headers(&[("x-forwarded-for", "6.6.6.6")]);
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"1.2.3.4\xff").unwrap(),
        );
        assert_eq!(client_ip(&h, p, &t), ip("10.0.0.1"));
    }

    #[test]
    fn quoted_strings_unescape() {
        assert_eq!(unquote(r#""a\"b""#).as_deref(), Some("a\"b"));
        assert_eq!(unquote(r#""a"b""#), None);
        assert_eq!(unquote(r#""ab\""#), None);
        assert_eq!(unquote(""), None);
        let t = trusted(LAN);
        let h = headers(&[("forwarded", r#"for="\1\9\2.0.2.1""#)]);
        assert_eq!(client_ip(&h, peer("10.0.0.1"), &t), ip("192.0.2.1"));
    }

    /// Every address written in `text`, with or without brackets and ports, as [`node`] reads
    /// them: a superset of what `client_ip` may return from the headers.
    fn addresses_in(values: &[String]) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for v in values {
            // Escapes inside quoted strings vanish when they are read.
            for text in [v.clone(), v.replace('\\', "")] {
                for piece in text.split([',', ';', '=', '"', ' ']) {
                    if let Some(ip) = node(piece.trim()) {
                        out.push(ip);
                    }
                }
            }
        }
        out
    }

    fn header_value() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("for=".to_string()),
            Just("For=".to_string()),
            Just(", ".to_string()),
            Just(",".to_string()),
            Just(";".to_string()),
            Just("\"".to_string()),
            Just("\\".to_string()),
            Just("unknown".to_string()),
            Just("_hidden".to_string()),
            Just("proto=https".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just(":".to_string()),
            Just("10.0.0.7".to_string()),
            Just("::1".to_string()),
            (0u8..=255, 0u8..=255).prop_map(|(a, b)| format!("{a}.{b}.0.1")),
            any::<u16>().prop_map(|p| p.to_string()),
            any::<[u16; 8]>().prop_map(|s| Ipv6Addr::from(s).to_string()),
            "[ -~]{0,12}",
        ];
        prop::collection::vec(piece, 0..12).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        ))]

        /// Nothing panics, and the answer is the peer or an address written in the headers.
        #[test]
        fn answers_the_peer_or_an_address_from_the_headers(
            forwarded in prop::collection::vec(header_value(), 0..3),
            xff in prop::collection::vec(header_value(), 0..3),
            raw in prop::collection::vec(any::<u8>(), 0..24),
            peer_trusted in any::<bool>(),
            mode in 0u8..3,
        ) {
            let mut h = HeaderMap::new();
            for v in &forwarded {
                h.append(FORWARDED, HeaderValue::from_str(v).unwrap());
            }
            for v in &xff {
                h.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
            }
            if let Ok(v) = HeaderValue::from_bytes(&raw) {
                h.append(X_FORWARDED_FOR, v);
            }
            let t = trusted("10.0.0.0/8, ::1/128, 127.0.0.0/8").with_header(match mode {
                0 => ProxyHeader::Auto,
                1 => ProxyHeader::Forwarded,
                _ => ProxyHeader::XForwardedFor,
            });
            let p = if peer_trusted { peer("10.0.0.1") } else { peer("198.51.100.1") };
            let got = client_ip(&h, p, &t);
            if !peer_trusted {
                prop_assert_eq!(got, p.ip());
            } else if got != p.ip() {
                let mut all: Vec<String> = forwarded.clone();
                all.extend(xff.iter().cloned());
                all.push(String::from_utf8_lossy(&raw).into_owned());
                prop_assert!(addresses_in(&all).contains(&got), "{got} not in {all:?}");
            }
        }
    }
}
