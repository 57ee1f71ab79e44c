//! Authorization at mesh scale: one decision with 10, 1,000 and 10,000 policies in the mesh, the
//! snapshot rebuild (configuration load, registry, policy compile) at 10,000 workloads and
//! 10,000 policies, and freeing the state a reload replaced — built from generated YAML through
//! the public loader, as an operator's file (or a reload of it) would be.
//!
//! Run: `cargo bench --bench policy -- --warm-up-time 1 --measurement-time 3`
//!
//! The mesh: 10,000 workloads in 200 namespaces (50 each, labels `app: app0…app9`), 110 of them
//! on this node, spread over the namespaces. Policies are spread the same way — per namespace,
//! most select one app (ALLOW from a few principals to two ports), some apply to the whole
//! namespace (ALLOW from other namespaces, DENY from an address block or an identity), a few
//! are AUDIT; one in a thousand lives in the root namespace (mesh-wide DENY of an address
//! block). So about P/500 policies apply to a local workload (20 at 10,000, 3 at 1,000; setup
//! prints the count).
//! The `worst_case/*` benchmarks instead put N ALLOW policies, none matching, on one workload:
//! every one of them is evaluated, which bounds what a single crowded workload costs.
//!
//! Each `decide/*` iteration decides one connection; they cycle through 4,096 pseudo-random
//! connections (destination, identity or plaintext, source address, port) so the measurement is
//! not one hot path. Setup checks that the mix holds allowed-by-rule, denied-by-rule and
//! denied-for-want-of-ALLOW decisions, and prints it.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use ringtun::control_plane::config::{self, Config};
use ringtun::control_plane::identity::SpiffeId;
use ringtun::control_plane::policy::{Connection, PolicySet, Reason};
use ringtun::control_plane::state::State;
use ringtun::control_plane::workload_registry::{Registry, WorkloadId};

// The allocator `ringtun` itself runs with (src/main.rs): load and rebuild allocate a lot, and
// glibc's malloc would measure something the binary does not do.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WORKLOADS: u32 = 10_000;
const NAMESPACES: u32 = 200;
const APPS: u32 = 10;
const SERVICE_ACCOUNTS: u32 = 10;
/// Workload i is local when i % LOCAL_EVERY == 0: 110 of 10,000 (a full node), in 110
/// different namespaces.
const LOCAL_EVERY: u32 = 91;
const CONNECTIONS: usize = 4096;

fn workload_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + i)
}

fn workloads_yaml(y: &mut String) {
    y.push_str("version: 1\nnode:\n  name: node-a\n  admin: off\n  metrics: off\n  readiness: off\nworkloads:\n");
    for i in 0..WORKLOADS {
        let local = i % LOCAL_EVERY == 0;
        y.push_str(&format!(
            "  - {{name: w{i}, namespace: ns{}, service_account: sa{}, ips: [{}], node: {}{}, labels: {{app: app{}}}}}\n",
            i % NAMESPACES,
            i % SERVICE_ACCOUNTS,
            workload_ip(i),
            if local { "node-a" } else { "node-b" },
            if local { format!(", netns: w{i}") } else { String::new() },
            (i / NAMESPACES) % APPS,
        ));
    }
}

/// Policy j of `total`, in namespace ns(j % 200); see the module doc for the mix.
fn policy_yaml(y: &mut String, j: u32, total: u32) {
    let ns = j % NAMESPACES;
    // The k-th policy of its namespace: picks the kind and the app it selects.
    let k = j / NAMESPACES;
    let other = |k: u32| (ns + k) % NAMESPACES;
    if total >= 1000 && j % 1000 == 999 {
        y.push_str(&format!(
            "  - {{name: mesh{j}, namespace: istio-system, action: DENY, rules: [{{from: [{{source: {{ip_blocks: [192.168.{}.0/24]}}}}]}}]}}\n",
            (j / 1000) % 256
        ));
        return;
    }
    match k % 20 {
        // Whole namespace: ALLOW from two other namespaces to its ports.
        0 => y.push_str(&format!(
            "  - {{name: p{j}, namespace: ns{ns}, rules: [{{from: [{{source: {{namespaces: [ns{}, ns{}]}}}}], to: [{{operation: {{ports: [8080, 9090]}}}}]}}]}}\n",
            other(1),
            other(2)
        )),
        // Whole namespace: DENY an address block, or one identity.
        1 => y.push_str(&format!(
            "  - {{name: p{j}, namespace: ns{ns}, action: DENY, rules: [{{from: [{{source: {{ip_blocks: [172.16.{}.0/24]}}}}]}}, {{from: [{{source: {{principals: [cluster.local/ns/ns{}/sa/banned]}}}}]}}]}}\n",
            j % 256,
            other(3)
        )),
        // One app: AUDIT connections from its own namespace on an admin port.
        2 => y.push_str(&format!(
            "  - {{name: p{j}, namespace: ns{ns}, action: AUDIT, selector: {{match_labels: {{app: app{}}}}}, rules: [{{to: [{{operation: {{ports: [9901]}}}}]}}]}}\n",
            k % APPS
        )),
        // One app: ALLOW from three principals (one a wildcard) to two ports.
        _ => y.push_str(&format!(
            "  - {{name: p{j}, namespace: ns{ns}, selector: {{match_labels: {{app: app{}}}}}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/ns{}/sa/sa{}, cluster.local/ns/ns{}/sa/sa{}, 'cluster.local/ns/ns{}/*']}}}}], to: [{{operation: {{ports: [8080, 9090]}}}}]}}]}}\n",
            k % APPS,
            other(1),
            j % SERVICE_ACCOUNTS,
            ns,
            (j + 3) % SERVICE_ACCOUNTS,
            other(4)
        )),
    }
}

fn mesh_yaml(policies: u32) -> String {
    let mut y = String::with_capacity(4 << 20);
    workloads_yaml(&mut y);
    y.push_str("policies:\n");
    for j in 0..policies {
        policy_yaml(&mut y, j, policies);
    }
    y
}

fn load(yaml: &str) -> Config {
    match config::load(yaml) {
        Ok(c) => c,
        Err(e) => panic!("generated configuration is invalid:\n{e}"),
    }
}

/// Deterministic pseudo-random numbers (xorshift), so every run measures the same connections.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % u64::from(n)) as u32
    }
}

/// Identities from every namespace and service account; plaintext is `None`.
fn identities() -> Vec<SpiffeId> {
    (0..NAMESPACES)
        .flat_map(|ns| {
            (0..SERVICE_ACCOUNTS).map(move |sa| {
                SpiffeId::new("cluster.local", &format!("ns{ns}"), &format!("sa{sa}"))
                    .expect("identity")
            })
        })
        .collect()
}

struct Spec {
    destination: WorkloadId,
    destination_addr: SocketAddr,
    identity: Option<usize>,
    source_ip: IpAddr,
}

/// Connections to local workloads from identities biased toward neighbouring namespaces (where
/// the policies allow), 10% plaintext, a few from the denied blocks.
fn connections(registry: &Registry, ids: &[SpiffeId]) -> Vec<Spec> {
    let locals: Vec<WorkloadId> = registry.local_workloads().map(|(id, _)| id).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..CONNECTIONS)
        .map(|_| {
            let destination = locals[rng.below(locals.len() as u32) as usize];
            let ns = destination.0 % NAMESPACES;
            let port = [8080, 9090, 9901, 5432][rng.below(4) as usize];
            let identity = match rng.below(10) {
                0 => None,
                1..=6 => {
                    let from_ns = (ns + rng.below(5)) % NAMESPACES;
                    Some((from_ns * SERVICE_ACCOUNTS + rng.below(SERVICE_ACCOUNTS)) as usize)
                }
                _ => Some(rng.below(ids.len() as u32) as usize),
            };
            let source_ip = match rng.below(20) {
                0 => IpAddr::V4(Ipv4Addr::new(172, 16, rng.below(256) as u8, 7)),
                1 => IpAddr::V4(Ipv4Addr::new(192, 168, rng.below(10) as u8, 7)),
                _ => IpAddr::V4(workload_ip(rng.below(WORKLOADS))),
            };
            Spec {
                destination,
                destination_addr: SocketAddr::new(
                    registry.workload(destination).workload.ips[0],
                    port,
                ),
                identity,
                source_ip,
            }
        })
        .collect()
}

fn conn<'a>(s: &Spec, ids: &'a [SpiffeId]) -> Connection<'a> {
    Connection {
        destination: s.destination,
        destination_addr: s.destination_addr,
        source_identity: s.identity.map(|i| &ids[i]),
        source_ip: s.source_ip,
    }
}

/// Counts the decision kinds, so a benchmark is known to measure the paths it is named after.
fn mix(set: &PolicySet, specs: &[Spec], ids: &[SpiffeId]) -> [usize; 5] {
    let mut m = [0; 5];
    for s in specs {
        let d = set.evaluate(&conn(s, ids));
        m[match d.reason {
            Reason::AllowedBy(_) => 0,
            Reason::DeniedBy(_) => 1,
            Reason::NoAllowMatched => 2,
            Reason::NoAllowPolicy => 3,
            Reason::NotLocal => 4,
        }] += 1;
    }
    m
}

fn bench_decisions(c: &mut Criterion) {
    let ids = identities();
    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(1));
    for policies in [10, 1_000, 10_000] {
        let state = State::new(load(&mesh_yaml(policies)), 1);
        let specs = connections(&state.registry, &ids);
        let m = mix(&state.policies, &specs, &ids);
        let applicable: Vec<usize> = state
            .registry
            .local_workloads()
            .map(|(id, _)| {
                let a = state.policies.applicable(id).expect("local");
                a.allow.len() + a.deny.len() + a.log_only.len()
            })
            .collect();
        eprintln!(
            "{policies} policies: per local workload {:.1} apply (max {}); of {CONNECTIONS} \
             connections {} allowed by a rule, {} denied by a rule, {} denied (no ALLOW \
             matched), {} allowed (no ALLOW policy)",
            applicable.iter().sum::<usize>() as f64 / applicable.len() as f64,
            applicable.iter().max().unwrap_or(&0),
            m[0],
            m[1],
            m[2],
            m[3]
        );
        assert_eq!(m[4], 0);
        if policies >= 1_000 {
            assert!(
                m[0] > 0 && m[1] > 0 && m[2] > 0,
                "the mix must exercise every path: {m:?}"
            );
        }
        let mut i = 0usize;
        g.bench_function(format!("{policies}_policies_in_mesh"), |b| {
            b.iter(|| {
                let s = &specs[i % CONNECTIONS];
                i = i.wrapping_add(1);
                black_box(state.policies.evaluate(black_box(&conn(s, &ids))))
            })
        });
    }
    g.finish();

    // One workload with N ALLOW policies, none of which matches: all N are evaluated.
    let mut g = c.benchmark_group("worst_case");
    g.throughput(Throughput::Elements(1));
    for n in [100u32, 1_000] {
        let mut y = String::from(
            "version: 1\nnode: {name: node-a}\nworkloads:\n  - {name: w, namespace: ns, ips: [10.0.0.1], node: node-a, netns: w, labels: {app: w}}\npolicies:\n",
        );
        for j in 0..n {
            y.push_str(&format!(
                "  - {{name: p{j}, namespace: ns, selector: {{match_labels: {{app: w}}}}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/other/sa/s{j}, 'td{j}/*']}}}}], to: [{{operation: {{ports: [8080]}}}}]}}]}}\n"
            ));
        }
        let state = State::new(load(&y), 1);
        let id = SpiffeId::new("cluster.local", "ns", "client").expect("id");
        let c = Connection {
            destination: WorkloadId(0),
            destination_addr: "10.0.0.1:8080".parse().expect("addr"),
            source_identity: Some(&id),
            source_ip: "10.1.0.1".parse().expect("ip"),
        };
        assert_eq!(state.policies.evaluate(&c).reason, Reason::NoAllowMatched);
        g.bench_function(
            format!("{n}_allow_policies_on_one_workload_none_match"),
            |b| b.iter(|| black_box(state.policies.evaluate(black_box(&c)))),
        );
    }
    g.finish();
}

fn bench_rebuild(c: &mut Criterion) {
    let yaml = mesh_yaml(10_000);
    let cfg = load(&yaml);
    assert_eq!(cfg.workloads.len(), WORKLOADS as usize);
    assert_eq!(cfg.policies.len(), 10_000);
    let registry = Registry::new(&cfg);

    let mut g = c.benchmark_group("rebuild (10k workloads, 10k policies)");
    g.sample_size(10);
    g.bench_function("policy_set_from_config", |b| {
        b.iter(|| black_box(PolicySet::from_config(black_box(&cfg), &registry)))
    });
    g.bench_function("state_registry_and_policies", |b| {
        b.iter_batched(
            || cfg.clone(),
            |cfg| black_box(State::new(cfg, 2)),
            BatchSize::LargeInput,
        )
    });
    // What the last holder of a replaced snapshot pays to free its state: the reloader makes
    // sure that is the control thread, never a reactor.
    g.bench_function("free_state", |b| {
        b.iter_batched(|| State::new(cfg.clone(), 2), drop, BatchSize::LargeInput)
    });
    g.throughput(Throughput::Bytes(yaml.len() as u64));
    g.bench_function("reload_yaml_load_and_state", |b| {
        b.iter(|| black_box(State::new(load(black_box(&yaml)), 2)))
    });
    g.finish();
}

criterion_group!(benches, bench_decisions, bench_rebuild);
criterion_main!(benches);
