//! Replica discovery against a real DNS server: a name answered with several loopback
//! addresses becomes that many replicas, and the set follows the DNS answers.

use std::time::Duration;

use orly_common::{ClientOptions, GrpcChannel};
use orly_testkit::{loopback, TestDns};

async fn wait_for(ch: &GrpcChannel, n: usize) -> Vec<std::net::SocketAddr> {
    for _ in 0..100 {
        let r = ch.replicas();
        if r.len() == n {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("expected {n} replicas, have {:?}", ch.replicas());
}

#[tokio::test]
async fn a_name_resolves_to_every_replica_and_follows_changes() {
    let dns = TestDns::start().await.unwrap();
    dns.set("db.orly.test", &[loopback(2), loopback(3)]);
    let opts = ClientOptions {
        dns_servers: vec![dns.addr()],
        resolve_interval: Duration::from_millis(200),
        ..ClientOptions::new("orly-db", Duration::from_secs(2))
    };
    let ch = GrpcChannel::connect_lazy("db.orly.test:50051, 127.0.0.9:50051", opts).unwrap();
    let r = wait_for(&ch, 3).await;
    assert!(r.contains(&"127.0.0.2:50051".parse().unwrap()));
    assert!(r.contains(&"127.0.0.9:50051".parse().unwrap()));

    // A replica is added (scaled up), then one goes away.
    let mut changes = ch.watch_replicas();
    dns.set("db.orly.test", &[loopback(2), loopback(3), loopback(4)]);
    tokio::time::timeout(Duration::from_secs(2), changes.changed())
        .await
        .expect("the new replica is seen within a resolve interval")
        .unwrap();
    wait_for(&ch, 4).await;
    dns.set("db.orly.test", &[loopback(4)]);
    let r = wait_for(&ch, 2).await;
    assert_eq!(
        r,
        vec![
            "127.0.0.4:50051".parse().unwrap(),
            "127.0.0.9:50051".parse().unwrap()
        ]
    );
    // Every replica gets picked.
    let mut picked = std::collections::BTreeSet::new();
    for _ in 0..4 {
        picked.insert(ch.pick().await.unwrap());
    }
    assert_eq!(picked.len(), 2);
}

#[tokio::test]
async fn a_name_that_stops_resolving_keeps_its_last_replicas() {
    let dns = TestDns::start().await.unwrap();
    dns.set("acl.orly.test", &[loopback(5)]);
    let opts = ClientOptions {
        dns_servers: vec![dns.addr()],
        resolve_interval: Duration::from_millis(100),
        ..ClientOptions::new("orly-acl", Duration::from_secs(2))
    };
    let ch = GrpcChannel::connect_lazy("acl.orly.test:50052", opts).unwrap();
    wait_for(&ch, 1).await;
    dns.set("acl.orly.test", &[]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ch.replicas(), vec!["127.0.0.5:50052".parse().unwrap()]);
}

#[tokio::test]
async fn an_unknown_name_fails_calls_instead_of_hanging() {
    let dns = TestDns::start().await.unwrap();
    let opts = ClientOptions {
        dns_servers: vec![dns.addr()],
        ..ClientOptions::new("orly-db", Duration::from_millis(500))
    };
    let ch = GrpcChannel::connect_lazy("nowhere.orly.test:50051", opts).unwrap();
    let started = std::time::Instant::now();
    let err = ch.pick().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(5));
}
