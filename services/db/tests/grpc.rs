//! The gRPC server and client end to end: a real server on a loopback socket over a SQLite
//! store, driven by `GrpcStore`, compared with the store itself.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nostr::{EventBuilder, EventId, Filter, JsonUtil, Keys, Kind, Tag, Timestamp};
use orly_db::grpc_client::GrpcStore;
use orly_db::{
    grpc_server, open_store, EventStore, SaveOutcome, SharedStore, StoreConfig, StoreError,
};
use orly_proto::orlydb::v1 as pb;
use pb::database_service_client::DatabaseServiceClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A running server; stops when dropped.
struct Server {
    addr: SocketAddr,
    store: SharedStore,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

async fn sqlite_store(dir: &std::path::Path) -> SharedStore {
    let cfg = StoreConfig {
        data_dir: dir.to_path_buf(),
        ..StoreConfig::default()
    };
    open_store(&cfg).await.expect("open sqlite store")
}

async fn serve_on(listener: TcpListener) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn({
        let store = store.clone();
        async move {
            grpc_server::serve(listener, store, async {
                let _ = rx.await;
            })
            .await
            .expect("grpc server");
        }
    });
    Server {
        addr,
        store,
        stop: Some(tx),
        task,
        _dir: dir,
    }
}

async fn start() -> (Server, GrpcStore) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve_on(listener).await;
    let client = GrpcStore::connect_lazy(&server.addr.to_string(), TIMEOUT).unwrap();
    (server, client)
}

fn note(keys: &Keys, content: &str, created_at: u64) -> nostr::Event {
    EventBuilder::text_note(content)
        .custom_created_at(Timestamp::from(created_at))
        .sign_with_keys(keys)
        .unwrap()
}

fn sorted(mut events: Vec<nostr::Event>) -> Vec<nostr::Event> {
    events.sort_by_key(|e| e.id);
    events
}

fn stored(outcome: SaveOutcome) -> u64 {
    match outcome {
        SaveOutcome::Stored { serial } => serial,
        other => panic!("expected Stored, got {other:?}"),
    }
}

#[tokio::test]
async fn every_method_round_trips_like_the_store() {
    let (server, client) = start().await;
    let store = server.store.clone();
    let alice = Keys::generate();
    let bob = Keys::generate();

    client.ping().await.unwrap();
    assert_eq!(client.latest_serial().await.unwrap(), 0);

    // save: stored, duplicate, rejected (ephemeral), replaceable, deletion
    let n1 = note(&alice, "one", 1_700_000_001);
    let n2 = note(&alice, "two #nostr", 1_700_000_002);
    let n3 = EventBuilder::text_note("three")
        .tag(Tag::parse(["t", "nostr"]).unwrap())
        .tag(Tag::parse(["p", &bob.public_key().to_hex()]).unwrap())
        .custom_created_at(Timestamp::from(1_700_000_003))
        .sign_with_keys(&bob)
        .unwrap();
    let s1 = stored(client.save_event(&n1).await.unwrap());
    let s2 = stored(client.save_event(&n2).await.unwrap());
    let s3 = stored(client.save_event(&n3).await.unwrap());
    assert!(s1 < s2 && s2 < s3);
    assert_eq!(
        client.save_event(&n1).await.unwrap(),
        SaveOutcome::Duplicate
    );
    let ephemeral = EventBuilder::new(Kind::from(20001), "gone")
        .sign_with_keys(&alice)
        .unwrap();
    match client.save_event(&ephemeral).await.unwrap() {
        SaveOutcome::Rejected(msg) => assert!(!msg.is_empty()),
        other => panic!("ephemeral event: {other:?}"),
    }
    let meta_old = EventBuilder::new(Kind::Metadata, r#"{"name":"a"}"#)
        .custom_created_at(Timestamp::from(1_700_000_010))
        .sign_with_keys(&alice)
        .unwrap();
    let meta_new = EventBuilder::new(Kind::Metadata, r#"{"name":"b"}"#)
        .custom_created_at(Timestamp::from(1_700_000_020))
        .sign_with_keys(&alice)
        .unwrap();
    stored(client.save_event(&meta_old).await.unwrap());
    stored(client.save_event(&meta_new).await.unwrap());
    let deletion = EventBuilder::new(Kind::EventDeletion, "")
        .tag(Tag::event(n2.id))
        .custom_created_at(Timestamp::from(1_700_000_030))
        .sign_with_keys(&alice)
        .unwrap();
    stored(client.save_event(&deletion).await.unwrap());

    // queries: the same answers as the store itself
    let filter_sets: Vec<Vec<Filter>> = vec![
        vec![Filter::new()],
        vec![Filter::new().author(alice.public_key())],
        vec![Filter::new().kind(Kind::TextNote).limit(2)],
        vec![Filter::new().hashtag("nostr")],
        vec![Filter::new().pubkey(bob.public_key())],
        vec![Filter::new().kind(Kind::Metadata), Filter::new().id(n3.id)],
        vec![Filter::new()
            .since(Timestamp::from(1_700_000_002))
            .until(Timestamp::from(1_700_000_015))],
        vec![Filter::new().id(n2.id)],
    ];
    for filters in &filter_sets {
        let via_grpc = client.query(filters).await.unwrap();
        let direct = store.query(filters).await.unwrap();
        assert_eq!(via_grpc, direct, "query {filters:?}");
        assert_eq!(
            client.count(filters).await.unwrap(),
            store.count(filters).await.unwrap(),
            "count {filters:?}"
        );
        assert_eq!(
            client.negentropy_items(filters).await.unwrap(),
            store.negentropy_items(filters).await.unwrap(),
            "negentropy {filters:?}"
        );
    }
    let metas = client
        .query(&[Filter::new().kind(Kind::Metadata)])
        .await
        .unwrap();
    assert_eq!(metas.len(), 1);
    assert_eq!(metas[0].id, meta_new.id);
    assert!(client
        .query(&[Filter::new().id(n2.id)])
        .await
        .unwrap()
        .is_empty());

    let ids = [n1.id, n2.id, n3.id, meta_old.id, EventId::all_zeros()];
    assert_eq!(
        sorted(client.fetch_by_ids(&ids).await.unwrap()),
        sorted(store.fetch_by_ids(&ids).await.unwrap())
    );

    // serials
    let latest = client.latest_serial().await.unwrap();
    assert_eq!(latest, store.latest_serial().await.unwrap());
    assert!(latest >= s3);
    assert_eq!(
        client.ids_by_serial_range(0, latest, 100).await.unwrap(),
        store.ids_by_serial_range(0, latest, 100).await.unwrap()
    );
    assert_eq!(
        client.ids_by_serial_range(s2, latest, 1).await.unwrap(),
        store.ids_by_serial_range(s2, latest, 1).await.unwrap()
    );
    let serials = [s1, s2, s3, latest + 100];
    assert_eq!(client.fetch_by_serials(&serials).await.unwrap(), {
        let mut v = store.fetch_by_serials(&serials).await.unwrap();
        v.sort_by_key(|(s, _)| *s);
        v
    });
    assert_eq!(client.serial_by_id(&n1.id).await.unwrap(), Some(s1));
    assert_eq!(
        client.serial_by_id(&n3.id).await.unwrap(),
        store.serial_by_id(&n3.id).await.unwrap()
    );
    assert_eq!(
        client.serial_by_id(&EventId::all_zeros()).await.unwrap(),
        None
    );

    // identity: created once, same both ways
    let secret = client.relay_identity_secret().await.unwrap();
    assert_eq!(secret, store.relay_identity_secret().await.unwrap());
    assert_eq!(secret, client.relay_identity_secret().await.unwrap());

    // markers
    client.set_marker("peer/a", b"1").await.unwrap();
    client.set_marker("peer/b", &[0, 255, 7]).await.unwrap();
    client.set_marker("other", b"x").await.unwrap();
    assert_eq!(
        client.get_marker("peer/b").await.unwrap(),
        Some(vec![0, 255, 7])
    );
    assert_eq!(client.get_marker("missing").await.unwrap(), None);
    let listed = client.list_markers("peer/").await.unwrap();
    assert_eq!(listed, store.list_markers("peer/").await.unwrap());
    assert_eq!(
        listed,
        vec![
            ("peer/a".to_string(), b"1".to_vec()),
            ("peer/b".to_string(), vec![0, 255, 7])
        ]
    );
    client.delete_marker("peer/a").await.unwrap();
    assert_eq!(client.get_marker("peer/a").await.unwrap(), None);
    assert_eq!(store.get_marker("peer/a").await.unwrap(), None);

    // leases
    let a = client
        .acquire_lease("sync", "node-a", 60_000)
        .await
        .unwrap();
    assert!(a.acquired);
    assert_eq!(a.holder, "node-a");
    let b = client
        .acquire_lease("sync", "node-b", 60_000)
        .await
        .unwrap();
    assert!(!b.acquired);
    assert_eq!(b.holder, "node-a");
    client.release_lease("sync", "node-a").await.unwrap();
    let b = client
        .acquire_lease("sync", "node-b", 60_000)
        .await
        .unwrap();
    assert!(b.acquired);
    assert_eq!(b.holder, "node-b");
    assert!(b.remaining_ms > 0);
    // fenced writes and the database clock travel too
    assert!(client
        .set_marker_fenced("peer/x", b"1", "sync", "node-b")
        .await
        .unwrap());
    assert!(!client
        .set_marker_fenced("peer/x", b"2", "sync", "node-a")
        .await
        .unwrap());
    assert_eq!(
        store.get_marker("peer/x").await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert!(client.clock_ms().await.unwrap() > 1_700_000_000_000);

    // deletes
    assert!(client.delete_event(&n1.id).await.unwrap());
    assert!(!client.delete_event(&n1.id).await.unwrap());
    assert!(store.fetch_by_ids(&[n1.id]).await.unwrap().is_empty());
    let now = Timestamp::now().as_secs();
    let expiring = EventBuilder::text_note("soon gone")
        .tag(Tag::expiration(Timestamp::from(now + 1)))
        .sign_with_keys(&bob)
        .unwrap();
    stored(client.save_event(&expiring).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(client.delete_expired().await.unwrap() >= 1);
    assert_eq!(client.delete_expired().await.unwrap(), 0);
}

#[tokio::test]
async fn large_queries_stream_in_batches() {
    let (server, client) = start().await;
    let keys = Keys::generate();
    let body = "x".repeat(2_000);
    // 2,000 events of ~2 KB: ~4.5 MB in all, more than one default-sized gRPC message.
    let mut saves = Vec::new();
    for i in 0..2_000u64 {
        let e = note(&keys, &format!("{i} {body}"), 1_700_000_000 + i);
        saves.push(e);
    }
    for chunk in saves.chunks(100) {
        let futs = chunk.iter().map(|e| server.store.save_event(e));
        for r in futures::future::join_all(futs).await {
            stored(r.unwrap());
        }
    }
    let filters = [Filter::new().author(keys.public_key())];
    let via_grpc = client.query(&filters).await.unwrap();
    assert_eq!(via_grpc.len(), 2_000);
    assert_eq!(via_grpc, server.store.query(&filters).await.unwrap());
    let items = client.negentropy_items(&filters).await.unwrap();
    assert_eq!(items.len(), 2_000);
    assert_eq!(
        items,
        server.store.negentropy_items(&filters).await.unwrap()
    );
    assert_eq!(client.count(&filters).await.unwrap(), 2_000);

    // on the wire: several batches, none above the server's batch size
    let mut raw = DatabaseServiceClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap()
        .max_decoding_message_size(grpc_server::MAX_MESSAGE_SIZE);
    let mut stream = raw
        .query_events(pb::QueryEventsRequest {
            filter: None,
            filters: filters.iter().map(pb::Filter::from).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut sizes = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        sizes.push(batch.events.len());
    }
    assert_eq!(sizes.iter().sum::<usize>(), 2_000);
    assert!(sizes.len() >= 4, "{sizes:?}");
    assert!(
        sizes.iter().all(|n| *n <= grpc_server::EVENTS_PER_BATCH),
        "{sizes:?}"
    );

    // more ids and serials than one request may carry: the client splits them
    let ids: Vec<EventId> = saves.iter().map(|e| e.id).collect();
    assert_eq!(client.fetch_by_ids(&ids).await.unwrap().len(), 2_000);
    let latest = client.latest_serial().await.unwrap();
    let range = client.ids_by_serial_range(0, latest, 20_000).await.unwrap();
    assert_eq!(range.len(), 2_000);
    let serials: Vec<u64> = range.iter().map(|e| e.serial).collect();
    assert_eq!(
        client.fetch_by_serials(&serials).await.unwrap().len(),
        2_000
    );
}

fn invalid(code: tonic::Code, status: tonic::Status) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(!status.message().is_empty());
}

#[tokio::test]
async fn invalid_requests_are_refused() {
    let (server, client) = start().await;
    let keys = Keys::generate();

    // through the trait
    match client.ids_by_serial_range(10, 5, 10).await {
        Err(StoreError::InvalidRequest(m)) => assert!(m.contains("from"), "{m}"),
        other => panic!("from > to: {other:?}"),
    }
    let good = note(&keys, "honest", 1_700_000_000);
    let forged = nostr::Event::new(
        good.id,
        good.pubkey,
        good.created_at,
        good.kind,
        good.tags.clone(),
        "tampered",
        good.sig,
    );
    // ORLY's structured form is serialized by the server, so the server checks its id; our
    // JSON form comes from the (authenticated) relay, which verified it: no second hash.
    let mut structured = DatabaseServiceClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let refused = structured
        .save_event(pb::SaveEventRequest {
            event: Some(pb::Event::from(&forged)),
            json: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("id"), "{}", refused.message());
    assert!(server
        .store
        .fetch_by_ids(&[good.id])
        .await
        .unwrap()
        .is_empty());

    // raw protobuf the trait cannot produce
    let mut raw = DatabaseServiceClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    use tonic::Code::InvalidArgument;
    invalid(
        InvalidArgument,
        raw.fetch_events_by_ids(pb::FetchEventsByIdsRequest {
            ids: vec![vec![1, 2, 3]],
        })
        .await
        .unwrap_err(),
    );
    invalid(
        InvalidArgument,
        raw.fetch_events_by_ids(pb::FetchEventsByIdsRequest {
            ids: vec![vec![7; 32]; 501],
        })
        .await
        .unwrap_err(),
    );
    invalid(
        InvalidArgument,
        raw.fetch_events_by_serial(pb::FetchEventsBySerialRequest {
            serials: (0..501).collect(),
        })
        .await
        .unwrap_err(),
    );
    invalid(
        InvalidArgument,
        raw.get_ids_by_serial_range(pb::SerialRangeRequest {
            from: 0,
            to: 10,
            limit: 10_001,
        })
        .await
        .unwrap_err(),
    );
    invalid(
        InvalidArgument,
        raw.delete_event(pb::DeleteEventRequest { id: vec![] })
            .await
            .unwrap_err(),
    );
    invalid(
        InvalidArgument,
        raw.get_serial_by_id(pb::GetSerialByIdRequest { id: vec![0; 31] })
            .await
            .unwrap_err(),
    );
    let mut tags = std::collections::HashMap::new();
    tags.insert("xy".to_string(), pb::TagSet::default());
    let bad_filter = pb::QueryEventsRequest {
        filter: Some(pb::Filter {
            tags,
            ..Default::default()
        }),
        filters: vec![],
        raw: false,
    };
    invalid(
        InvalidArgument,
        raw.query_events(bad_filter.clone()).await.unwrap_err(),
    );
    invalid(
        InvalidArgument,
        raw.count_events(bad_filter.clone()).await.unwrap_err(),
    );
    invalid(
        InvalidArgument,
        raw.query_negentropy_items(bad_filter).await.unwrap_err(),
    );
    let bad_author = pb::QueryEventsRequest {
        filter: None,
        filters: vec![pb::Filter {
            authors: vec![vec![1; 5]],
            ..Default::default()
        }],
        raw: true,
    };
    invalid(
        InvalidArgument,
        raw.query_events(bad_author).await.unwrap_err(),
    );
    invalid(
        InvalidArgument,
        raw.save_event(pb::SaveEventRequest {
            event: None,
            json: Vec::new(),
        })
        .await
        .unwrap_err(),
    );
    let mut bad_sig = pb::Event::from(&good);
    bad_sig.sig = vec![1, 2];
    invalid(
        InvalidArgument,
        raw.save_event(pb::SaveEventRequest {
            event: Some(bad_sig),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    invalid(
        InvalidArgument,
        raw.set_marker(pb::SetMarkerRequest {
            key: String::new(),
            value: vec![],
        })
        .await
        .unwrap_err(),
    );

    // ORLY's single `filter` field counts as the first filter
    stored(client.save_event(&good).await.unwrap());
    let mut stream = raw
        .query_events(pb::QueryEventsRequest {
            filter: Some(pb::Filter::from(&Filter::new().id(good.id))),
            filters: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let batch = stream.message().await.unwrap().unwrap();
    assert_eq!(batch.events.len(), 1);
    let back = nostr::Event::try_from(batch.events[0].clone()).unwrap();
    assert_eq!(back.as_json(), good.as_json());
    assert!(stream.message().await.unwrap().is_none());
    let ready = raw.ready(pb::Empty {}).await.unwrap().into_inner();
    assert!(ready.ready);
}

#[tokio::test]
async fn health_reports_the_named_service_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let (server, _client) = start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: orly_proto::service_names::DB.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "not SERVING: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(orly_proto::service_names::DB, "orlydb.v1.DatabaseService");
}

#[tokio::test]
async fn unreachable_server_is_unavailable_then_recovers() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);

    let timeout = Duration::from_secs(2);
    let client = GrpcStore::connect_lazy(&addr.to_string(), timeout).unwrap();
    let started = Instant::now();
    match client.latest_serial().await {
        Err(StoreError::Unavailable(m)) => assert!(!m.is_empty()),
        other => panic!("closed port: {other:?}"),
    }
    assert!(
        started.elapsed() <= timeout + Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    match client.save_event(&note(&Keys::generate(), "x", 1)).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("closed port: {other:?}"),
    }

    // also with an http:// address that nobody listens on, through open_store
    let cfg = StoreConfig {
        kind: orly_db::StoreKind::Grpc,
        grpc_server: format!("http://{addr}"),
        grpc_timeout: timeout,
        ..StoreConfig::default()
    };
    let via_config = open_store(&cfg).await.unwrap();
    assert!(matches!(
        via_config.ping().await,
        Err(StoreError::Unavailable(_))
    ));

    // the server comes up on that port: the same clients recover
    let listener = TcpListener::bind(addr).await.unwrap();
    let _server = serve_on(listener).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.latest_serial().await {
            Ok(serial) => {
                assert_eq!(serial, 0);
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    stored(
        client
            .save_event(&note(&Keys::generate(), "back", 1_700_000_000))
            .await
            .unwrap(),
    );
    via_config.ping().await.unwrap();
}
