//! Two ringtun nodes over the testbed (`Testbed::two_node_config`): node A serves the client
//! pod, node B the HBONE pods mesh-1 and mesh-2, each with its capture rules installed and its
//! baseline descriptor count taken once it settled. [`Mesh::finish`] checks that every flow
//! ended and the descriptors came back on both nodes, then stops them with SIGTERM (exit 0).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{connect_in, is_reset, listen_in, read_until_end, write_certs};
use super::{MeshNode, Pod, RingtunProcess, Testbed};

pub struct Node {
    pub process: Option<RingtunProcess>,
    pub baseline_fds: usize,
}

pub struct Mesh {
    pub tb: Testbed,
    pub a: Node,
    pub b: Node,
    /// The directory `ringtun certs` filled (CA `ca.pem`, `<ns>/<sa>/cert.pem|key.pem`).
    pub certs: PathBuf,
}

impl Mesh {
    /// Both nodes with `extra_node` YAML under `node:` (e.g. an `hbone:` section).
    pub fn start(bin: &Path, driver: &str, extra_node: &str) -> Mesh {
        Self::start_with(bin, driver, extra_node, |_, c| c)
    }

    /// Like `start`, with each node's config passed through `edit` (to make the nodes'
    /// views of the mesh disagree, or to give one node policies).
    pub fn start_with(
        bin: &Path,
        driver: &str,
        extra_node: &str,
        edit: impl Fn(MeshNode, String) -> String,
    ) -> Mesh {
        let tb = Testbed::create(&format!("h{}", &driver[..1])).expect("testbed");
        let dir = std::env::temp_dir().join(&tb.prefix);
        let certs = dir.join("certs");
        let cfg = |n| tb.two_node_config(n, 2, &certs, extra_node);
        write_certs(bin, &cfg(MeshNode::A), &certs).expect("certs");
        let mut nodes = Vec::new();
        for n in [MeshNode::A, MeshNode::B] {
            let config = edit(n, cfg(n));
            let path = dir.join(format!("{}-capture.yaml", n.name()));
            std::fs::write(&path, &config).unwrap();
            tb.install_capture(bin, n.pods(), &path);
            let p = RingtunProcess::spawn_mesh_node(bin, &tb, n, &config, &["--driver", driver])
                .expect("ringtun starts");
            let baseline_fds = settled_fds(&p);
            nodes.push(Node {
                process: Some(p),
                baseline_fds,
            });
        }
        let b = nodes.pop().unwrap();
        let a = nodes.pop().unwrap();
        Mesh { tb, a, b, certs }
    }

    pub fn a(&self) -> &RingtunProcess {
        self.a.process.as_ref().unwrap()
    }

    pub fn b(&self) -> &RingtunProcess {
        self.b.process.as_ref().unwrap()
    }

    /// A connection from the client pod (captured by node A).
    pub fn connect(&self, to: SocketAddr) -> TcpStream {
        let s = connect_in(&self.tb.pod_ns(Pod::Client).unwrap(), to).expect("client connects");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// A listener on `pod`'s IPv4 address.
    pub fn listen(&self, pod: Pod, port: u16) -> TcpListener {
        listen_in(
            &self.tb.pod_ns(pod).unwrap(),
            SocketAddr::new(pod.v4(), port),
        )
        .unwrap()
    }

    /// Connects from the client pod and reads to the end; the stream must end with a reset,
    /// not a FIN.
    pub fn expect_reset(&self, to: SocketAddr) {
        expect_reset_from(&self.tb, Pod::Client, to)
    }

    /// Every flow gone on both nodes, descriptors back to their baselines, SIGTERM, exit 0.
    pub fn finish(mut self) {
        for (name, node) in [("A", &mut self.a), ("B", &mut self.b)] {
            let r = node.process.take().unwrap();
            let open = wait_for(|| r.metric("ringtun_flows_open", &[]).unwrap() == 0.0);
            assert!(
                open,
                "node {name}: flows still open at the end:\n{}",
                r.log_text()
            );
            let now = settle_to(&r, node.baseline_fds);
            let log = r.log_text();
            let code = r.terminate().unwrap();
            assert_eq!(code, 0, "node {name}: exit code after SIGTERM; log:\n{log}");
            node.baseline_fds = now;
        }
    }
}

/// Connects from `pod` and reads to the end; the stream must end with a reset, not a FIN.
pub fn expect_reset_from(tb: &Testbed, pod: Pod, to: SocketAddr) {
    match connect_in(&tb.pod_ns(pod).unwrap(), to) {
        Ok(mut c) => {
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            match read_until_end(&mut c) {
                Ok(b) => panic!(
                    "{to}: ended cleanly after {} bytes; a reset was expected",
                    b.len()
                ),
                Err(e) => assert!(is_reset(&e), "{to}: expected a reset, got {e}"),
            }
        }
        Err(e) => assert!(is_reset(&e), "{to}: connect failed with {e}, not a reset"),
    }
}

/// Polls `f` for up to 10 s.
pub fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The descriptor count once it stopped changing (for up to 10 s).
pub fn settled_fds(r: &RingtunProcess) -> usize {
    let mut last = r.fd_count();
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = r.fd_count();
        if now == last || start.elapsed() > Duration::from_secs(10) {
            return now;
        }
        last = now;
    }
}

/// Waits for the fd count to return to `baseline` plus what is legitimately kept: two per
/// pooled empty pipe, one per open tunnel (pooled until idle); asserts it.
pub fn settle_to(r: &RingtunProcess, baseline: usize) -> usize {
    let kept = || {
        let pipes = r.metric("ringtun_pipes_pooled", &[]).unwrap_or(0.0) as usize;
        let tunnels = r.metric("ringtun_hbone_tunnels_open", &[]).unwrap_or(0.0) as usize;
        2 * pipes + tunnels
    };
    let ok = wait_for(|| r.fd_count() == baseline + kept());
    let now = r.fd_count();
    assert!(
        ok,
        "fd count {now} != baseline {baseline} + {} (pooled pipes and open tunnels); log:\n{}",
        kept(),
        r.log_text()
    );
    now
}
