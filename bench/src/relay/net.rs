//! Sockets for the fan-out and load phases: WebSocket clients bound to one of several
//! loopback source addresses (10,000 connections and more), raw "stalled readers" that
//! never read, the open-file limit, and the relay's side of each socket from /proc/net/tcp.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::MaybeTlsStream;

use super::client::{greeted, Ws};

/// Longest wait for a connection and its handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The relay's address in a `ws://127.0.0.1:PORT` URL.
pub fn relay_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .with_context(|| format!("not a ws:// URL: {url}"))?;
    rest.trim_end_matches('/')
        .parse()
        .with_context(|| format!("not an IP:port URL: {url}"))
}

/// Loopback source addresses `127.0.0.1`, `127.0.0.2`, …: every one is local on Linux
/// (127.0.0.0/8 is on `lo`), and each has its own range of ephemeral ports.
pub fn source_addrs(n: usize) -> Vec<IpAddr> {
    (1..=n.clamp(1, 250))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i as u8)))
        .collect()
}

/// How many source addresses `connections` client sockets need: the ephemeral port range
/// (`/proc/sys/net/ipv4/ip_local_port_range`) used at most half full per address, so
/// TIME_WAIT leftovers of an earlier phase never run it out.
pub fn source_addrs_needed(connections: usize) -> usize {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<usize>().ok());
            Some(it.next()??.abs_diff(it.next()??) + 1)
        })
        .unwrap_or(28_232);
    connections.div_ceil((range / 2).max(1)).max(1)
}

/// A TCP connection from `source` (any free port) to `to`, Nagle off; with `rcvbuf`, the
/// receive buffer is set that small before connecting (so the advertised window stays small).
pub async fn tcp_from(
    source: IpAddr,
    to: SocketAddr,
    rcvbuf: Option<u32>,
) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    // Lets the bind take a port that only TIME_WAIT sockets of an earlier phase still hold.
    socket.set_reuseaddr(true)?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding a client socket to {source}"))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(to))
        .await
        .context("timed out connecting")?
        .with_context(|| format!("connecting to {to} from {source}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Buffers of a subscriber connection: small, so 10,000 of them stay cheap in this process.
fn small_buffers() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
}

/// A WebSocket connection from `source` to the relay at `url`, AUTH greeting consumed.
pub async fn connect_from(url: &str, source: IpAddr) -> anyhow::Result<Ws> {
    let stream = tcp_from(source, relay_addr(url)?, None).await?;
    let (ws, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::client_async_with_config(
            url,
            MaybeTlsStream::Plain(stream),
            Some(small_buffers()),
        ),
    )
    .await
    .context("timed out in the WebSocket handshake")?
    .with_context(|| format!("WebSocket handshake with {url}"))?;
    greeted(ws).await
}

/// A client that completed the WebSocket handshake, sent its REQs and never reads again.
pub struct Stalled {
    /// Held open, never read.
    _stream: TcpStream,
    /// This end's address: the relay's socket has it as its remote address.
    pub local: SocketAddr,
    /// When the last REQ was written.
    pub sent_at: std::time::Instant,
}

/// Opens a stalled reader: a raw TCP socket with a `rcvbuf`-byte receive buffer does the
/// WebSocket handshake (reading only the HTTP answer), writes `reqs` masked REQ frames and
/// is never read again.
pub async fn stalled_reader(
    url: &str,
    source: IpAddr,
    rcvbuf: u32,
    reqs: &[String],
) -> anyhow::Result<Stalled> {
    let to = relay_addr(url)?;
    let mut stream = tcp_from(source, to, Some(rcvbuf)).await?;
    let local = stream.local_addr()?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // The HTTP answer, a byte at a time so nothing past its end is read.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(CONNECT_TIMEOUT, stream.read(&mut byte))
            .await
            .context("timed out in a stalled reader's handshake")??;
        if n == 0 || head.len() > 8192 {
            bail!(
                "bad WebSocket handshake answer: {}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("handshake refused: {}", String::from_utf8_lossy(&head));
    }
    for req in reqs {
        stream.write_all(&masked_text_frame(req.as_bytes())).await?;
    }
    stream.flush().await?;
    Ok(Stalled {
        _stream: stream,
        local,
        sent_at: std::time::Instant::now(),
    })
}

/// A client-to-server WebSocket text frame (FIN, masked, as RFC 6455 requires of clients).
fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    let mask: [u8; 4] = rand::random();
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The state of the relay's end of a connection, from `/proc/net/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelaySide {
    /// Established and owned by the relay process (it still holds the fd).
    Open,
    /// Closed by the relay: past ESTABLISHED (FIN_WAIT1 with unsent data queued behind the
    /// client's closed window, …), orphaned (no owning fd), or gone (reset).
    Closed,
}

/// The relay's end of every connection whose client end is in `clients`, from one read of
/// `/proc/net/tcp` (IPv4; this process's network namespace is the relay's).
pub fn relay_sides(
    relay: SocketAddr,
    clients: &[SocketAddr],
) -> anyhow::Result<HashMap<SocketAddr, RelaySide>> {
    let table = std::fs::read_to_string("/proc/net/tcp").context("reading /proc/net/tcp")?;
    let mut seen: HashMap<SocketAddr, RelaySide> = HashMap::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode …
        if f.len() < 10 {
            continue;
        }
        let (Some(local), Some(remote)) = (parse_addr(f[1]), parse_addr(f[2])) else {
            continue;
        };
        if local != relay {
            continue;
        }
        let established = f[3] == "01";
        let owned = f[9] != "0";
        let side = if established && owned {
            RelaySide::Open
        } else {
            RelaySide::Closed
        };
        seen.insert(remote, side);
    }
    Ok(clients
        .iter()
        .map(|c| (*c, seen.get(c).copied().unwrap_or(RelaySide::Closed)))
        .collect())
}

/// `0100007F:1F90` (address bytes in host order, port in hex) → `127.0.0.1:8080`.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints the network-order u32 as a host (little-endian) integer.
    let ip = Ipv4Addr::from(ip.to_le_bytes());
    Some(SocketAddr::new(IpAddr::V4(ip), port))
}

/// Makes sure this process may open `needed` files, raising its soft limit (up to the hard
/// one) with `prlimit` if it is lower. Children inherit the raised limit, so the relay gets
/// it too. Returns a note for the report.
pub fn ensure_open_files(needed: u64) -> anyhow::Result<String> {
    let (soft, hard) = open_files_limit()?;
    if soft >= needed {
        return Ok(format!("open files: limit {soft} (need about {needed})"));
    }
    if hard < needed {
        bail!(
            "this run needs about {needed} open files per process but the hard limit is {hard} \
             (soft {soft}); raise it (ulimit -Hn as root, or LimitNOFILE=) or use fewer \
             --load-connections / --stalled"
        );
    }
    // std has no setrlimit and the workspace forbids unsafe code: util-linux's prlimit sets
    // it on this process from outside.
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status();
    let (now, _) = open_files_limit()?;
    match status {
        Ok(s) if s.success() && now >= needed => Ok(format!(
            "open files: soft limit raised from {soft} to {now} (need about {needed})"
        )),
        Ok(s) => bail!(
            "need about {needed} open files, the soft limit is {soft} and `prlimit` could not \
             raise it ({s}); run `ulimit -n {hard}` before orly-bench"
        ),
        Err(e) => bail!(
            "need about {needed} open files, the soft limit is {soft} and `prlimit` (util-linux) \
             could not be run ({e}); run `ulimit -n {hard}` before orly-bench"
        ),
    }
}

/// This process's open-files limit (soft, hard) from `/proc/self/limits`.
fn open_files_limit() -> anyhow::Result<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-files line in /proc/self/limits")?;
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| match w {
            "unlimited" => Some(u64::MAX),
            w => w.parse().ok(),
        })
        .collect();
    match nums[..] {
        [soft, hard, ..] => Ok((soft, hard)),
        _ => bail!("cannot read the open-files limit from {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_addresses() {
        assert_eq!(
            parse_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_addr("0500007F:0050"),
            Some("127.0.0.5:80".parse().unwrap())
        );
    }

    #[test]
    fn frames_are_masked() {
        let f = masked_text_frame(b"hi");
        assert_eq!(f[0], 0x81);
        assert_eq!(f[1], 0x82);
        assert_eq!(f[6] ^ f[2], b'h');
        assert_eq!(f[7] ^ f[3], b'i');
        let long = masked_text_frame(&[b'x'; 300]);
        assert_eq!((long[1], long[2], long[3]), (0x80 | 126, 1, 44));
    }

    #[test]
    fn urls_and_limits() {
        assert_eq!(
            relay_addr("ws://127.0.0.1:3334").unwrap(),
            "127.0.0.1:3334".parse().unwrap()
        );
        assert_eq!(source_addrs(3)[2], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        assert!(source_addrs_needed(1) >= 1);
        let (soft, hard) = open_files_limit().unwrap();
        assert!(soft <= hard);
    }
}
