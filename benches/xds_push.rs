//! A full-mesh push from istiod, as issue 14 sizes it: 100,000 workloads with 10,000 services
//! (one Address push) and 10,000 policies (one Authorization push), from the bytes on the wire
//! to the store: decode, convert each resource, answer (ACK/NACK), apply with the endpoint and
//! local-workload indexes. And the push that follows in a running mesh: one workload changed,
//! applied to the full store (what a push costs must follow what it changes, not the mesh).
//!
//! Run: `cargo bench --bench xds_push -- --warm-up-time 1 --measurement-time 10`
//!
//! Setup prints the wire size of each push and the memory the store holds once both are
//! applied (bytes live in the allocator, counted by a wrapper around mimalloc, the allocator
//! ringtun runs with).
//!
//! The mesh: workload i is `ns<i % 1000>/w<i>`, one IPv4 address, HBONE, on one of 1,000
//! nodes (100 on this node), an endpoint of service `ns<i % 1000>/s<i % 10000>` on port 80
//! → 8080, naming one selector policy. Policies are namespace-scoped ALLOWs from two
//! principals to two ports.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

use istio_api::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use istio_api::istio::security as sec;
use istio_api::istio::workload as wl;
use istio_api::prost::Message;
use istio_api::prost_types::Any;
use istio_api::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ringtun::control_plane::xds::delta::{DeltaClient, NodeInfo, Update};
use ringtun::control_plane::xds::store::Store;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WORKLOADS: u32 = 100_000;
const SERVICES: u32 = 10_000;
const POLICIES: u32 = 10_000;
const NAMESPACES: u32 = 1_000;
const NODES: u32 = 1_000;

fn any(type_url: &str, value: Vec<u8>) -> Option<Any> {
    Some(Any {
        type_url: type_url.into(),
        value,
    })
}

fn workload(i: u32, version: u32) -> Resource {
    let ns = format!("ns{}", i % NAMESPACES);
    let uid = format!("Kubernetes//Pod/{ns}/w{i}");
    let w = wl::Workload {
        uid: uid.clone(),
        name: format!("w{i}"),
        namespace: ns.clone(),
        addresses: vec![(0x0a40_0000u32 + i).to_be_bytes().to_vec()],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        service_account: format!("sa{}", i % 10),
        node: format!("node-{}", i % NODES),
        services: [(
            format!("{ns}/s{}.{ns}.svc.cluster.local", i % SERVICES),
            wl::PortList {
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        )]
        .into(),
        authorization_policies: vec![format!("{ns}/p{}", i % POLICIES)],
        ..wl::Workload::default()
    };
    let a = wl::Address {
        r#type: Some(wl::address::Type::Workload(Box::new(w))),
    };
    Resource {
        name: uid,
        version: format!("v{version}"),
        resource: any(ADDRESS_TYPE_URL, a.encode_to_vec()),
        ..Resource::default()
    }
}

fn service(i: u32) -> Resource {
    let ns = format!("ns{}", i % NAMESPACES);
    let hostname = format!("s{i}.{ns}.svc.cluster.local");
    let s = wl::Service {
        name: format!("s{i}"),
        namespace: ns.clone(),
        hostname: hostname.clone(),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: (0x0a60_0000u32 + i).to_be_bytes().to_vec(),
            length: None,
        }],
        ports: vec![wl::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..wl::Service::default()
    };
    let a = wl::Address {
        r#type: Some(wl::address::Type::Service(Box::new(s))),
    };
    Resource {
        name: format!("{ns}/{hostname}"),
        version: "v1".into(),
        resource: any(ADDRESS_TYPE_URL, a.encode_to_vec()),
        ..Resource::default()
    }
}

fn policy(i: u32) -> Resource {
    let ns = format!("ns{}", i % NAMESPACES);
    let exact = |s: String| sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(s)),
    };
    let p = sec::Authorization {
        name: format!("p{i}"),
        namespace: ns.clone(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Allow as i32,
        groups: vec![sec::Group {
            rules: vec![sec::Rules {
                matches: vec![sec::Match {
                    principals: vec![
                        exact(format!("cluster.local/ns/{ns}/sa/sa1")),
                        exact(format!("cluster.local/ns/{ns}/sa/sa2")),
                    ],
                    destination_ports: vec![8080, 9090],
                    ..sec::Match::default()
                }],
            }],
        }],
        dry_run: false,
    };
    Resource {
        name: format!("{ns}/p{i}"),
        resource: any(AUTHORIZATION_TYPE_URL, p.encode_to_vec()),
        ..Resource::default()
    }
}

fn push(type_url: &str, resources: Vec<Resource>) -> Vec<u8> {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: "n1".into(),
        resources,
        ..DeltaDiscoveryResponse::default()
    }
    .encode_to_vec()
}

fn node() -> NodeInfo {
    NodeInfo {
        node_name: "node-0".into(),
        ..NodeInfo::default()
    }
}

/// Decodes a push, converts and answers it, applies it.
fn receive(client: &mut DeltaClient, store: &mut Store, wire: &[u8]) {
    let response = DeltaDiscoveryResponse::decode(wire).expect("decodes");
    let pushed = client.on_response(response);
    assert!(
        pushed.reply.error_detail.is_none(),
        "every resource applies"
    );
    match pushed.update {
        Update::Addresses(c) => {
            store.apply_addresses(c);
        }
        Update::Policies(c) => {
            store.apply_policies(c);
        }
        Update::UnknownType(t) => panic!("{t}"),
    }
}

fn bench(c: &mut Criterion) {
    let addresses = push(
        ADDRESS_TYPE_URL,
        (0..SERVICES)
            .map(service)
            .chain((0..WORKLOADS).map(|i| workload(i, 1)))
            .collect(),
    );
    let policies = push(AUTHORIZATION_TYPE_URL, (0..POLICIES).map(policy).collect());
    let one_change = push(ADDRESS_TYPE_URL, vec![workload(4242, 2)]);

    let before = LIVE.load(Ordering::Relaxed);
    let mut client = DeltaClient::new(&node());
    let mut store = Store::new("node-0");
    receive(&mut client, &mut store, &addresses);
    receive(&mut client, &mut store, &policies);
    let held = LIVE.load(Ordering::Relaxed) - before;
    let (w, s, p) = store.counts();
    println!(
        "push: addresses {:.1} MiB on the wire, policies {:.1} MiB; the store holds {w} workloads \
         ({} local), {s} services, {p} policies in {:.1} MiB ({:.0} bytes per workload, delta \
         client's versions included)",
        addresses.len() as f64 / 1048576.0,
        policies.len() as f64 / 1048576.0,
        store.local_workloads().count(),
        held as f64 / 1048576.0,
        held as f64 / f64::from(WORKLOADS),
    );

    let mut g = c.benchmark_group("xds_push");
    g.sample_size(10);
    g.bench_function("full_mesh_100k_addresses_10k_policies", |b| {
        b.iter_batched(
            || (DeltaClient::new(&node()), Store::new("node-0")),
            |(mut client, mut store)| {
                receive(&mut client, &mut store, &addresses);
                receive(&mut client, &mut store, &policies);
                black_box((client, store))
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("xds_push");
    g.bench_function("one_workload_into_100k", |b| {
        b.iter(|| receive(&mut client, &mut store, black_box(&one_change)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
