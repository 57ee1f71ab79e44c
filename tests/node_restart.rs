//! A stopped node lets go of its listening sockets at once, so the next node on the same ports
//! (a restart, or the demo's second act in the same process) gets every connection.
//!
//! With io_uring an armed accept holds its listening socket after close(2) until the request is
//! cancelled. Left to the ring's teardown, that happens asynchronously, after the reactor thread
//! has ended; meanwhile the old socket still listens in the `SO_REUSEPORT` group, takes some of
//! the next node's connections and resets them when it finally closes (CI saw the demo's first
//! HBONE connection reset this way).
//!
//! Its own test binary, with one test: the check binds the ports again right after the node
//! stopped, and any process spawned meanwhile by another test in the same process (`ip`,
//! `iptables`, `ringtun`) would hold a copy of the listening socket until its exec, failing the
//! check for a reason that is not ringtun's.
//!
//! Without root it prints `SKIPPED (needs root)` to stderr; with `CI` set it fails.

use ringtun::app::{App, Options};
use ringtun::control_plane::config::{self, DriverChoice};
use ringtun::testbed::{listen_in, root_or_skip, Pod, Testbed};

#[test]
fn a_stopped_node_lets_go_of_its_listening_sockets() {
    if !root_or_skip("a_stopped_node_lets_go_of_its_listening_sockets") {
        return;
    }
    // The drivers one after the other, not as parallel tests (see the module docs).
    for (name, driver) in [
        ("io_uring", DriverChoice::IoUring),
        ("epoll", DriverChoice::Epoll),
    ] {
        let tb = Testbed::create(&name[..2]).expect("testbed");
        let client = tb.pod_ns(Pod::Client).unwrap();
        let mesh1 = tb.pod_ns(Pod::Mesh1).unwrap();
        // Every round binds the ports again without `SO_REUSEPORT` right after `wait()`
        // returns, which fails while any old socket still listens.
        for round in 0..20 {
            let cfg = config::load(&tb.config_yaml(2, "")).expect("config");
            let app = App::start(
                cfg,
                Options {
                    driver: Some(driver),
                    reactors: Some(2),
                    observer: None,
                    serve_endpoints: false,
                    ..Default::default()
                },
            )
            .expect("node starts");
            app.drain();
            app.wait().expect("node drains");
            for (ns, addr) in [(&client, "127.0.0.1:15001"), (&mesh1, "0.0.0.0:15006")] {
                if let Err(e) = listen_in(ns, addr.parse().unwrap()) {
                    panic!("{name}, round {round}: {addr} still taken after the node stopped: {e}");
                }
            }
        }
    }
}
