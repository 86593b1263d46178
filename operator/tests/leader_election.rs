//! Leader election against the fake API server: of two instances one holds the Lease, the
//! other takes over only after the holder stops renewing and the Lease expires.

mod common;

use std::time::{Duration, Instant};

use common::FakeApi;
use k8s_openapi::api::coordination::v1::Lease;
use orly_operator::leader::{elect, Election, LeaseConfig};

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        name: "orly-operator".into(),
        namespace: "ns".into(),
        identity: identity.into(),
        duration_secs: 2,
        grace_secs: 1,
    }
}

async fn wait_leader(election: &mut Election, within: Duration) -> bool {
    tokio::time::timeout(within, election.is_leader.wait_for(|l| *l))
        .await
        .is_ok_and(|r| r.is_ok())
}

fn holder(fake: &FakeApi) -> Option<String> {
    fake.get::<Lease>("ns", "orly-operator")
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_leads_and_the_other_takes_over_only_after_expiry() {
    let fake = FakeApi::new();
    let mut a = elect(fake.client(), &config("a")).await.expect("a joins");
    assert!(
        wait_leader(&mut a, Duration::from_secs(10)).await,
        "a leads"
    );
    let mut b = elect(fake.client(), &config("b")).await.expect("b joins");

    // Across more than one Lease duration a keeps renewing, so b never leads.
    assert!(
        !wait_leader(&mut b, Duration::from_secs(4)).await,
        "b must not lead while a renews"
    );
    assert!(*a.is_leader.borrow());
    assert_eq!(holder(&fake).as_deref(), Some("a"));

    // a crashes: no release, the Lease just stops being renewed.
    a.task.abort();
    let lease = fake
        .get::<Lease>("ns", "orly-operator")
        .unwrap()
        .spec
        .unwrap();
    let renewed = lease.renew_time.expect("renewTime set").0;
    let crashed = Instant::now();
    assert!(
        wait_leader(&mut b, Duration::from_secs(20)).await,
        "b takes over"
    );
    let now = k8s_openapi::jiff::Timestamp::now();
    let expiry = renewed + k8s_openapi::jiff::SignedDuration::from_secs(2);
    assert!(
        now >= expiry,
        "b led at {now}, before a's Lease expired at {expiry}"
    );
    assert_eq!(holder(&fake).as_deref(), Some("b"));
    eprintln!("takeover {:?} after the holder stopped", crashed.elapsed());
    b.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_leader_releases_the_lease() {
    let fake = FakeApi::new();
    let mut a = elect(fake.client(), &config("a")).await.expect("a joins");
    assert!(wait_leader(&mut a, Duration::from_secs(10)).await);
    let mut b = elect(fake.client(), &config("b")).await.expect("b joins");
    // Dropping the receiver is the graceful shutdown path: the Lease is released at once.
    let Election { is_leader, task } = a;
    drop(is_leader);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("a stops")
        .expect("a's task")
        .expect("a released");
    assert!(
        wait_leader(&mut b, Duration::from_secs(10)).await,
        "b leads after release"
    );
    b.task.abort();
}
