//! Test support shared by orly's integration tests: [`TestDns`], a real DNS server on a
//! loopback UDP port that answers service names with whatever addresses a test sets (what a
//! headless Kubernetes Service does for its pods), and loopback port helpers.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use parking_lot::RwLock;
use tokio::net::UdpSocket;

/// A DNS server answering A and AAAA queries from a table the test controls. Records have a
/// TTL of 0, so resolvers ask again every time. Stops when dropped.
pub struct TestDns {
    addr: SocketAddr,
    names: Arc<RwLock<HashMap<String, Vec<IpAddr>>>>,
    task: tokio::task::JoinHandle<()>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TestDns {
    /// Starts the server on 127.0.0.1 with an ephemeral port.
    pub async fn start() -> std::io::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let names: Arc<RwLock<HashMap<String, Vec<IpAddr>>>> = Arc::default();
        let table = names.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let Some(reply) = answer(&buf[..n], &table.read()) else {
                    continue;
                };
                let _ = socket.send_to(&reply, from).await;
            }
        });
        Ok(Self { addr, names, task })
    }

    /// Where the server listens (for `ORLY_DNS_SERVERS`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `name` with `ips` from now on (an empty list: the name does not exist).
    pub fn set(&self, name: &str, ips: &[IpAddr]) {
        let mut t = self.names.write();
        if ips.is_empty() {
            t.remove(&key(name));
        } else {
            t.insert(key(name), ips.to_vec());
        }
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(query: &[u8], table: &HashMap<String, Vec<IpAddr>>) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut reply = Message::response(q.metadata.id, q.metadata.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = q.metadata.recursion_desired;
    reply.metadata.message_type = MessageType::Response;
    let mut known = false;
    for question in &q.queries {
        reply.add_query(question.clone());
        let name: &Name = question.name();
        let Some(ips) = table.get(&key(&name.to_ascii())) else {
            continue;
        };
        known = true;
        for ip in ips {
            let rdata = match (question.query_type(), ip) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(name.clone(), 0, rdata));
        }
    }
    if !known {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    reply.to_vec().ok()
}

/// Ports handed to child processes come from below the kernel's ephemeral range (32768 and
/// up on Linux): a port picked there could be taken by any outgoing connection between the
/// pick and the child's bind, and a gRPC or WebSocket client holds its port for as long as it
/// is connected.
const PICK_FROM: u16 = 12_000;
const PICK_TO: u16 = 32_000;

/// Where this process's next pick starts (spread by pid, so concurrent test binaries rarely
/// try the same ports).
static NEXT_PICK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// A TCP port free on every one of `ips` now, outside the ephemeral range (see [`PICK_FROM`]).
fn pick_port(ips: &[IpAddr]) -> u16 {
    use std::sync::atomic::Ordering;
    let span = u32::from(PICK_TO - PICK_FROM);
    let _ = NEXT_PICK.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let n = NEXT_PICK.fetch_add(1, Ordering::SeqCst) % span;
        let p = PICK_FROM + n as u16;
        if ips
            .iter()
            .all(|ip| std::net::TcpListener::bind(SocketAddr::new(*ip, p)).is_ok())
        {
            return p;
        }
    }
    0
}

/// A free TCP port on 127.0.0.1 for a child process to take.
pub fn free_port() -> u16 {
    pick_port(&[IpAddr::V4(Ipv4Addr::LOCALHOST)])
}

/// A free TCP port on `ip` (free now, for a child process to take).
pub fn free_port_on(ip: IpAddr) -> u16 {
    pick_port(&[ip])
}

/// A port free on every one of `ips` at once (replicas behind one name share their port).
pub fn free_port_on_all(ips: &[IpAddr]) -> u16 {
    pick_port(ips)
}

/// `127.0.0.<n>`: loopback addresses beyond 127.0.0.1 are all local on Linux.
pub fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}
