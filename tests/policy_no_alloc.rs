//! A policy decision never allocates: the data path calls it once per connection, on a reactor
//! thread, and must not reach the allocator for it. This binary counts allocations made by the
//! test's own thread while decisions run (its own binary: the counting allocator is global).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;

use ringtun::control_plane::config;
use ringtun::control_plane::identity::SpiffeId;
use ringtun::control_plane::policy::{Connection, LogOnlyKind, Reason};
use ringtun::control_plane::state::State;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let on = COUNTING.try_with(Cell::get).unwrap_or(false);
    if on {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's layout contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as for `dealloc`, and the caller guarantees `new_size` is valid.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made on this thread by `f`.
fn allocations_during(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

const CONFIG: &str = "\
version: 1
node: {name: n}
workloads:
  - {name: web, namespace: prod, ips: [10.0.0.1, \"fd00::1\"], node: n, netns: web, labels: {app: web}}
policies:
  - name: strict
    namespace: istio-system
    action: DENY
    rules: [{from: [{source: {not_principals: ['*']}}]}]
  - name: allow-web
    namespace: prod
    selector: {match_labels: {app: web}}
    rules:
      - from: [{source: {principals: ['cluster.local/ns/dev/*'], not_namespaces: [evil]}}]
        to: [{operation: {ports: [8080]}}]
        when: [{key: source.ip, values: [10.9.0.0/16, 'fd00:9::/32']}]
      - from: [{source: {service_accounts: [dev/tool]}}, {source: {principals: ['*/sa/client']}}]
  - name: audit-all
    namespace: prod
    action: AUDIT
    rules: [{}]
  - name: audit-dev
    namespace: prod
    action: AUDIT
    rules: [{from: [{source: {namespaces: ['de*']}}]}]
";

#[test]
fn decisions_do_not_allocate() {
    let state = State::new(config::load(CONFIG).expect("valid"), 1);
    let web = state
        .registry
        .workload_by_ip("10.0.0.1".parse().unwrap())
        .expect("web");
    let dev_client = SpiffeId::new("cluster.local", "dev", "client").expect("id");
    let dev_other = SpiffeId::new("cluster.local", "dev", "other").expect("id");
    let evil = SpiffeId::new("cluster.local", "evil", "x").expect("id");
    let conn = |identity: Option<&'static SpiffeId>, src: &str, dst: &str| Connection {
        destination: web,
        destination_addr: dst.parse::<SocketAddr>().unwrap(),
        source_identity: identity,
        source_ip: src.parse().unwrap(),
    };
    // 'static for the closure's convenience; the identities live for the whole test.
    let dev_client: &'static SpiffeId = Box::leak(Box::new(dev_client));
    let evil: &'static SpiffeId = Box::leak(Box::new(evil));
    let dev_other: &'static SpiffeId = Box::leak(Box::new(dev_other));
    let cases = [
        conn(Some(dev_client), "10.9.0.1", "10.0.0.1:8080"),
        conn(Some(dev_client), "::ffff:10.9.0.1", "[fd00::1]:9090"),
        conn(Some(evil), "10.9.0.1", "10.0.0.1:8080"),
        conn(None, "10.9.0.1", "10.0.0.1:8080"),
        conn(Some(dev_other), "10.8.0.1", "10.0.0.1:8080"),
    ];
    // The decisions are the interesting ones: allowed by a rule, denied by one, and denied for
    // want of an ALLOW; audits recorded.
    let reasons: Vec<Reason> = cases
        .iter()
        .map(|c| state.policies.evaluate(c).reason)
        .collect();
    assert!(
        matches!(reasons[0], Reason::AllowedBy(r) if r.rule == 0),
        "{reasons:?}"
    );
    assert!(
        matches!(reasons[1], Reason::AllowedBy(r) if r.rule == 1),
        "{reasons:?}"
    );
    assert_eq!(reasons[2], Reason::NoAllowMatched);
    assert!(matches!(reasons[3], Reason::DeniedBy(_)), "{reasons:?}");
    assert_eq!(reasons[4], Reason::NoAllowMatched);
    let audits = state.policies.evaluate(&cases[0]).log_only;
    assert_eq!(audits.iter().count(), 2);
    assert!(audits.iter().all(|m| m.kind == LogOnlyKind::Audit));

    let mut allowed = 0;
    let mut logged = 0;
    let n = allocations_during(|| {
        for _ in 0..1000 {
            for c in &cases {
                let d = state.policies.evaluate(c);
                allowed += usize::from(d.is_allowed());
                logged += d.log_only.iter().count();
                logged += state.policies.log_only_matches(c).count();
            }
        }
    });
    assert_eq!(n, 0, "{n} allocations in 5,000 decisions");
    assert_eq!(allowed, 2000);
    assert!(logged > 0);
    // The counter works: the same thread allocating is seen.
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1u8; 16]))) > 0);
}
