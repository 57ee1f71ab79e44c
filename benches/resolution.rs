//! First-connection resolution at mesh scale: 10,000 workloads (dual-stack) and 1,000 services
//! with 3 endpoints each, built from generated YAML through the public loader, as an operator's
//! file would be.
//!
//! Run: `cargo bench --bench resolution -- --warm-up-time 1 --measurement-time 3`
//!
//! Each `resolve/*` benchmark resolves one connection per iteration; the destinations cycle through
//! 4,096 pseudo-random targets so the hash lookups are not served from a single hot cache line.
//! `registry/*` and `config/*` measure what a reload of that state costs.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use ringtun::control_plane::config::{self, Config};
use ringtun::control_plane::workload_registry::{Registry, WorkloadId};
use ringtun::data_plane::first_connection::{
    resolve, Accepted, Destination, Direction, EndpointPicker,
};

const WORKLOADS: u32 = 10_000;
const SERVICES: u32 = 1_000;
const ENDPOINTS_PER_SERVICE: u32 = 3;
const TARGETS: usize = 4096;

fn workload_v4(i: u32) -> Ipv4Addr {
    // 10.64.0.1 … : workload i, never .0 / .255 concerns since these are plain /8 hosts.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + i)
}

fn workload_v6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, (i >> 16) as u16, i as u16 + 1)
}

fn vip(s: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + s)
}

/// Workload 0 is the local client (host mode, the accepting listener's workload); the others
/// live on other nodes, half of them HBONE. Service `s` has workloads 1+3s … 3+3s as endpoints.
fn config_yaml() -> String {
    let mut y = String::with_capacity(2 << 20);
    y.push_str("version: 1\nnode:\n  name: node-a\n  admin: off\n  metrics: off\n  readiness: off\nworkloads:\n");
    for i in 0..WORKLOADS {
        let (node, proto) = match i {
            0 => ("node-a", "TCP"),
            _ if i % 2 == 0 => ("node-b", "HBONE"),
            _ => ("node-c", "TCP"),
        };
        y.push_str(&format!(
            "  - {{name: w{i}, namespace: ns{}, service_account: sa{}, ips: [{}, \"{}\"], node: {node}, protocol: {proto}}}\n",
            i % 50,
            i % 7,
            workload_v4(i),
            workload_v6(i),
        ));
    }
    y.push_str("services:\n");
    for s in 0..SERVICES {
        let eps: Vec<String> = (0..ENDPOINTS_PER_SERVICE)
            .map(|k| {
                let w = 1 + s * ENDPOINTS_PER_SERVICE + k;
                format!("ns{}/w{w}", w % 50)
            })
            .collect();
        y.push_str(&format!(
            "  - {{name: svc{s}, namespace: ns{}, vips: [{}], ports: [{{port: 80, target_port: 8080}}], endpoints: [{}]}}\n",
            s % 50,
            vip(s),
            eps.join(", ")
        ));
    }
    y
}

fn load_config(yaml: &str) -> Config {
    match config::load(yaml) {
        Ok(c) => c,
        Err(e) => panic!("generated configuration is invalid:\n{e}"),
    }
}

/// Deterministic pseudo-random indices (xorshift), so every run measures the same targets.
fn indices(n: u32, seed: u64) -> Vec<u32> {
    let mut x = seed | 1;
    (0..TARGETS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as u32
        })
        .collect()
}

fn outbound(dst: SocketAddr) -> Accepted {
    Accepted {
        direction: Direction::Outbound,
        listener_workload: WorkloadId(0),
        peer: SocketAddr::new(IpAddr::V4(workload_v4(0)), 40_000),
        original_dst: dst,
    }
}

fn bench_resolution(c: &mut Criterion) {
    let yaml = config_yaml();
    let cfg = load_config(&yaml);
    assert_eq!(cfg.workloads.len(), WORKLOADS as usize);
    assert_eq!(cfg.services.len(), SERVICES as usize);
    let reg = Registry::new(&cfg);
    let ports = cfg.node.ports;

    let to_workload_v4: Vec<Accepted> = indices(WORKLOADS - 1, 1)
        .into_iter()
        .map(|i| outbound(SocketAddr::new(IpAddr::V4(workload_v4(i + 1)), 9000)))
        .collect();
    let to_workload_v6: Vec<Accepted> = indices(WORKLOADS - 1, 2)
        .into_iter()
        .map(|i| outbound(SocketAddr::new(IpAddr::V6(workload_v6(i + 1)), 9000)))
        .collect();
    let to_vip: Vec<Accepted> = indices(SERVICES, 3)
        .into_iter()
        .map(|s| outbound(SocketAddr::new(IpAddr::V4(vip(s)), 80)))
        .collect();
    // 192.0.2.0/24 … 203.0.113.x: documentation ranges, in no workload or service.
    let to_outside: Vec<Accepted> = indices(1 << 16, 4)
        .into_iter()
        .map(|i| {
            outbound(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(0xC000_0200 + i)),
                443,
            ))
        })
        .collect();
    // Inbound plaintext to the local workload from a random mesh peer (source lookup by IP).
    let inbound: Vec<Accepted> = indices(WORKLOADS - 1, 5)
        .into_iter()
        .map(|i| Accepted {
            direction: Direction::InboundPlaintext,
            listener_workload: WorkloadId(0),
            peer: SocketAddr::new(IpAddr::V4(workload_v4(i + 1)), 50_000),
            original_dst: SocketAddr::new(IpAddr::V4(workload_v4(0)), 8080),
        })
        .collect();

    // The benchmarks must measure the paths they are named after.
    let mut picker = EndpointPicker::default();
    assert!(matches!(
        resolve(&reg, &ports, &to_workload_v4[0], &mut picker).destination,
        Destination::Workload(_)
    ));
    assert!(matches!(
        resolve(&reg, &ports, &to_workload_v6[0], &mut picker).destination,
        Destination::Workload(_)
    ));
    assert!(matches!(
        resolve(&reg, &ports, &to_vip[0], &mut picker).destination,
        Destination::Service { .. }
    ));
    assert_eq!(
        resolve(&reg, &ports, &to_outside[0], &mut picker).destination,
        Destination::OutOfMesh
    );
    assert!(resolve(&reg, &ports, &inbound[0], &mut picker)
        .source
        .is_some());

    let mut g = c.benchmark_group("resolve (10k workloads, 1k services x 3 endpoints)");
    g.throughput(Throughput::Elements(1));
    for (name, targets) in [
        ("workload_by_ip_v4", &to_workload_v4),
        ("workload_by_ip_v6", &to_workload_v6),
        ("vip_to_endpoint", &to_vip),
        ("out_of_mesh_miss", &to_outside),
        ("inbound_plaintext", &inbound),
    ] {
        let mut picker = EndpointPicker::default();
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                let acc = &targets[i % TARGETS];
                i = i.wrapping_add(1);
                black_box(resolve(
                    black_box(&reg),
                    &ports,
                    black_box(acc),
                    &mut picker,
                ))
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("registry");
    g.bench_function("workload_by_ip_hit_v4", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let ip = to_workload_v4[i % TARGETS].original_dst.ip();
            i = i.wrapping_add(1);
            black_box(reg.workload_by_ip(black_box(ip)))
        })
    });
    g.bench_function("workload_by_ip_miss_v4", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let ip = to_outside[i % TARGETS].original_dst.ip();
            i = i.wrapping_add(1);
            black_box(reg.workload_by_ip(black_box(ip)))
        })
    });
    g.sample_size(20);
    g.bench_function("build_10k_workloads_1k_services", |b| {
        b.iter(|| black_box(Registry::new(black_box(&cfg))))
    });
    g.finish();

    let mut g = c.benchmark_group("config");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(yaml.len() as u64));
    g.bench_function("load_10k_workloads_1k_services_yaml", |b| {
        b.iter(|| black_box(load_config(black_box(&yaml))))
    });
    g.finish();
}

criterion_group!(benches, bench_resolution);
criterion_main!(benches);
