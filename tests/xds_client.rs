//! ringtun's delta ADS client against an in-process fake istiod over a real socket (tonic's
//! gRPC server on loopback), scripted push by push: the opening requests (wildcard, Node,
//! token and cluster headers), an initial push ACKed, a bad resource NACKed while the rest
//! applies, removals, istiod ending the stream and the reconnect declaring the versions held,
//! a removal made while disconnected arriving on the new stream. And the same conversation
//! with an independent fake istiod in Python (`tests/interop/fake_istiod.py`: Debian's grpcio
//! and protobuf, messages built at run time from the schema), so the client is not only
//! tested against tonic's server.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use istio_api::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use istio_api::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use istio_api::istio::workload as wl;
use istio_api::prost::Message;
use istio_api::prost_types::Any;
use istio_api::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ringtun::control_plane::istiod::IstiodEndpoint;
use ringtun::control_plane::xds::client::run;
use ringtun::control_plane::xds::delta::{DeltaClient, NodeInfo, Update};
use ringtun::control_plane::xds::store::Store;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// One stream as the test sees it: the headers it opened with, the requests, and the sender of
/// the pushes (dropping it ends the stream cleanly, as istiod does every ~30 minutes).
struct Opened {
    headers: HashMap<String, String>,
    requests: mpsc::Receiver<DeltaDiscoveryRequest>,
    pushes: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

struct FakeIstiod {
    opened: mpsc::Sender<Opened>,
}

type PushStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeIstiod {
    type DeltaAggregatedResourcesStream = PushStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<PushStream>, Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let mut incoming = request.into_inner();
        let (req_tx, requests) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(Ok(r)) = incoming.next().await {
                if req_tx.send(r).await.is_err() {
                    break;
                }
            }
        });
        let (pushes, push_rx) = mpsc::channel(64);
        self.opened
            .send(Opened {
                headers,
                requests,
                pushes,
            })
            .await
            .map_err(|_| Status::internal("test gone"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(push_rx))))
    }
}

fn workload(uid: &str, ip: u8, version: &str) -> Resource {
    workload_with_addresses(uid, vec![vec![10, 0, 0, ip]], version)
}

fn workload_with_addresses(uid: &str, addresses: Vec<Vec<u8>>, version: &str) -> Resource {
    let a = wl::Address {
        r#type: Some(wl::address::Type::Workload(Box::new(wl::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            addresses,
            node: "node-a".into(),
            ..wl::Workload::default()
        }))),
    };
    Resource {
        name: uid.into(),
        version: version.into(),
        resource: Some(Any {
            type_url: ADDRESS_TYPE_URL.into(),
            value: a.encode_to_vec(),
        }),
        ..Resource::default()
    }
}

fn push(
    type_url: &str,
    nonce: &str,
    resources: Vec<Resource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..DeltaDiscoveryResponse::default()
    }
}

async fn next<T>(rx: &mut mpsc::Receiver<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("{what}: channel closed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_acked_nacked_removed_and_survive_a_reconnect() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (opened_tx, mut opened) = mpsc::channel(4);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(FakeIstiod {
                opened: opened_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let dir = std::env::temp_dir().join(format!("ringtun-xds-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("istio-token");
    std::fs::write(&token, "first-token\n").unwrap();
    let server = IstiodEndpoint {
        address: format!("http://{addr}"),
        token_path: Some(token.clone()),
        cluster_id: "Kubernetes".into(),
    };
    let store = Arc::new(Mutex::new(Store::new("node-a")));
    let (updates_tx, mut updates) = mpsc::channel::<String>(64);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let client_store = store.clone();
    let client = tokio::spawn(async move {
        let mut delta = DeltaClient::new(&NodeInfo {
            node_name: "node-a".into(),
            pod_name: "ringtun-x".into(),
            pod_namespace: "istio-system".into(),
            instance_ip: "10.0.0.2".into(),
            ..NodeInfo::default()
        });
        let mut apply = |u: Update| {
            let mut store = client_store.lock().unwrap();
            let what = match u {
                Update::Addresses(c) => format!("addresses {:?}", store.apply_addresses(c)),
                Update::Policies(c) => format!("policies {:?}", store.apply_policies(c)),
                Update::UnknownType(t) => format!("unknown {t}"),
            };
            let _ = updates_tx.try_send(what);
        };
        run(server, &mut delta, &mut apply, stop_rx).await;
    });

    // The stream opens: headers, then one wildcard request per type with the Node.
    let mut s = next(&mut opened, "the first stream").await;
    assert_eq!(
        s.headers.get("authorization").map(String::as_str),
        Some("Bearer first-token")
    );
    assert_eq!(
        s.headers.get("clusterid").map(String::as_str),
        Some("Kubernetes")
    );
    let mut types = Vec::new();
    for _ in 0..2 {
        let r = next(&mut s.requests, "an opening request").await;
        assert!(r.resource_names_subscribe.is_empty(), "wildcard");
        assert!(r.initial_resource_versions.is_empty(), "nothing held yet");
        let node = r.node.expect("the Node on the opening request");
        assert_eq!(
            node.id,
            "ztunnel~10.0.0.2~ringtun-x.istio-system~istio-system.svc.cluster.local"
        );
        types.push(r.type_url);
    }
    assert_eq!(types, [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]);

    // The initial push: three workloads, one of them unreadable.
    s.pushes
        .send(Ok(push(
            ADDRESS_TYPE_URL,
            "n1",
            vec![
                workload("w1", 1, "v1"),
                workload_with_addresses("w-bad", vec![vec![1, 2, 3]], "v1"),
                workload("w2", 2, "v1"),
            ],
            &[],
        )))
        .await
        .unwrap();
    let nack = next(&mut s.requests, "the NACK").await;
    assert_eq!(nack.response_nonce, "n1");
    assert!(nack.node.is_none());
    let detail = nack.error_detail.expect("a NACK");
    assert!(
        detail
            .message
            .starts_with("w-bad: addresses[0]: an address of 3 bytes"),
        "{}",
        detail.message
    );
    assert_eq!(
        next(&mut updates, "the apply").await,
        "addresses Applied { upserted: 2, removed: 0, unknown_removals: 0 }"
    );
    assert_eq!(store.lock().unwrap().counts(), (2, 0, 0));

    s.pushes
        .send(Ok(push(AUTHORIZATION_TYPE_URL, "n2", vec![], &[])))
        .await
        .unwrap();
    let ack = next(&mut s.requests, "the ACK").await;
    assert_eq!(
        (ack.response_nonce.as_str(), ack.error_detail),
        ("n2", None)
    );
    next(&mut updates, "the policies apply").await;

    // A removal and an update on the same stream.
    s.pushes
        .send(Ok(push(
            ADDRESS_TYPE_URL,
            "n3",
            vec![workload("w1", 9, "v2")],
            &["w2"],
        )))
        .await
        .unwrap();
    let ack = next(&mut s.requests, "the ACK").await;
    assert_eq!(
        (ack.response_nonce.as_str(), ack.error_detail),
        ("n3", None)
    );
    next(&mut updates, "the apply").await;
    assert_eq!(store.lock().unwrap().counts(), (1, 0, 0));

    // istiod ends the stream; the token is rotated meanwhile.
    std::fs::write(&token, "second-token").unwrap();
    drop(s);
    let mut s = next(&mut opened, "the second stream").await;
    assert_eq!(
        s.headers.get("authorization").map(String::as_str),
        Some("Bearer second-token"),
        "re-read at every connect"
    );
    let first = next(&mut s.requests, "a reopening request").await;
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    assert_eq!(
        first.initial_resource_versions,
        HashMap::from([("w1".to_string(), "v2".to_string())]),
        "the versions held, the rejected name left out"
    );
    next(&mut s.requests, "a reopening request").await;

    // What was removed while the stream was down arrives as a removal.
    s.pushes
        .send(Ok(push(ADDRESS_TYPE_URL, "n4", vec![], &["w1"])))
        .await
        .unwrap();
    let ack = next(&mut s.requests, "the ACK").await;
    assert_eq!(ack.response_nonce, "n4");
    next(&mut updates, "the apply").await;
    assert_eq!(store.lock().unwrap().counts(), (0, 0, 0));

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("the client stops")
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_python_istiod_drives_the_same_conversation() {
    let name = "an_independent_python_istiod_drives_the_same_conversation";
    let Some(python) = ringtun::testbed::python_or_skip(
        name,
        "grpc, google.protobuf",
        "python3-grpcio python3-protobuf",
    ) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ringtun-xds-python-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let descriptors = dir.join("descriptors.bin");
    std::fs::write(&descriptors, istio_api::FILE_DESCRIPTOR_SET).unwrap();
    let token = dir.join("istio-token");
    std::fs::write(&token, "py-token").unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/fake_istiod.py");
    let mut istiod = tokio::process::Command::new(python)
        .arg(script)
        .arg(&descriptors)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts the Python fake istiod");
    let mut lines = tokio::io::BufReader::new(istiod.stdout.take().unwrap()).lines();
    let port_line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the fake istiod says its port")
        .unwrap()
        .expect("a port line");
    let port: u16 = port_line
        .strip_prefix("port ")
        .expect(&port_line)
        .parse()
        .unwrap();

    let server = IstiodEndpoint {
        address: format!("http://127.0.0.1:{port}"),
        token_path: Some(token),
        cluster_id: "Kubernetes".into(),
    };
    let store = Arc::new(Mutex::new(Store::new("node-a")));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let client_store = store.clone();
    let client = tokio::spawn(async move {
        let mut delta = DeltaClient::new(&NodeInfo {
            node_name: "node-a".into(),
            ..NodeInfo::default()
        });
        let mut apply = |u: Update| {
            let mut store = client_store.lock().unwrap();
            match u {
                Update::Addresses(c) => {
                    store.apply_addresses(c);
                }
                Update::Policies(c) => {
                    store.apply_policies(c);
                }
                Update::UnknownType(_) => {}
            }
        };
        run(server, &mut delta, &mut apply, stop_rx).await;
    });

    let verdict = tokio::time::timeout(Duration::from_secs(40), lines.next_line())
        .await
        .expect("the fake istiod gives its verdict")
        .unwrap()
        .unwrap_or_default();
    assert!(verdict.starts_with("PASS"), "{verdict}");
    eprintln!("fake istiod: {verdict}");
    // Every workload was removed by the end; the policy stays.
    assert_eq!(store.lock().unwrap().counts(), (0, 0, 1));
    assert!(istiod.wait().await.unwrap().success());
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("the client stops")
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
