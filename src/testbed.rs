//! A small mesh in network namespaces, for `ringtun demo` and the root tests: a node
//! namespace routing between pod namespaces (a client pod, two mesh pods behind a service VIP)
//! and a server outside the mesh, joined by veth pairs (this machine has no `dummy` links).
//! Everything it creates is named with a unique prefix and removed when it is dropped.
//!
//! Test support, not part of ringtun's API: hidden from the documentation and free to change
//! with the tests that use it. It stays in the library, not behind a cargo feature, because the
//! demo — a command of every build — runs on it too, and `tests/*.rs` can only reach the
//! library.
//!
//! ```text
//!            client 10.77.1.2 fd77:1::2 ─┐
//!            mesh-1 10.77.2.2 fd77:2::2 ─┤ node (router; ringtun runs here)
//!            mesh-2 10.77.3.2 fd77:3::2 ─┤
//!  ext (out of mesh) 10.77.4.2 fd77:4::2 ─┘     service echo: VIP 10.96.0.10:80 → mesh-1|2:8080
//! ```

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::redirection::netns::{netns_path, NetNs};

pub mod two_nodes;

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const VIP_PORT: u16 = 80;
pub const MESH_PORT: u16 = 8080;

/// The pods of the testbed, in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pod {
    Client = 1,
    Mesh1 = 2,
    Mesh2 = 3,
    Ext = 4,
}

impl Pod {
    pub const ALL: [Pod; 4] = [Pod::Client, Pod::Mesh1, Pod::Mesh2, Pod::Ext];

    fn suffix(self) -> &'static str {
        match self {
            Pod::Client => "client",
            Pod::Mesh1 => "mesh1",
            Pod::Mesh2 => "mesh2",
            Pod::Ext => "ext",
        }
    }

    pub fn v4(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 77, self as u8, 2))
    }

    pub fn v6(self) -> IpAddr {
        format!("fd77:{}::2", self as u8)
            .parse()
            .expect("literal address")
    }
}

/// A node of the two-node mesh ([`Testbed::two_node_config`]). Both ringtun processes run in
/// the testbed's node namespace (they serve their pods through the pods' namespaces); their
/// admin, metrics and readiness endpoints sit on different ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshNode {
    /// Serves the client pod.
    A,
    /// Serves mesh-1 and mesh-2 (HBONE).
    B,
}

impl MeshNode {
    pub fn name(self) -> &'static str {
        match self {
            MeshNode::A => "node-a",
            MeshNode::B => "node-b",
        }
    }

    /// Admin port; metrics is `+ 20`, readiness `+ 21`.
    pub fn port_base(self) -> u16 {
        match self {
            MeshNode::A => 15000,
            MeshNode::B => 16000,
        }
    }

    /// The pods whose capture rules this node's config installs.
    pub fn pods(self) -> &'static [Pod] {
        match self {
            MeshNode::A => &[Pod::Client],
            MeshNode::B => &[Pod::Mesh1, Pod::Mesh2],
        }
    }
}

pub struct Testbed {
    pub prefix: String,
    created: Vec<String>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn is_root() -> bool {
    crate::sys::process::is_root()
}

/// For root tests: true when running as root; otherwise prints `SKIPPED (needs root)` and
/// returns false — or panics when `CI` is set, where a skipped test must not pass.
pub fn root_or_skip(name: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{name}: root tests must run as root in CI");
    }
    eprintln!("SKIPPED (needs root): {name}");
    false
}

/// A `python3` that can import `modules` (e.g. `"h2, ssl"`), as an absolute path (so `ip netns
/// exec` runs the same interpreter): `$RINGTUN_INTEROP_PYTHON`, then the one on `PATH`, then
/// Debian's (a pyenv or venv `python3` first on `PATH` does not see Debian's packages).
pub fn python_with(modules: &str) -> Option<String> {
    let mut candidates: Vec<String> = Vec::new();
    if let Some(p) = std::env::var_os("RINGTUN_INTEROP_PYTHON") {
        candidates.push(p.to_string_lossy().into_owned());
    }
    candidates.push("python3".into());
    candidates.push("/usr/bin/python3".into());
    candidates.into_iter().find_map(|p| {
        let out = Command::new(&p)
            .args([
                "-c",
                &format!("import {modules}, sys; print(sys.executable)"),
            ])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
}

/// [`python_with`], or `None` after printing `SKIPPED` — a panic when `CI` is set, where the
/// Debian `packages` must have been installed.
pub fn python_or_skip(name: &str, modules: &str, packages: &str) -> Option<String> {
    match python_with(modules) {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!(
                "{name}: no python3 that imports {modules} (Debian {packages}); CI must install it"
            )
        }
        None => {
            eprintln!("SKIPPED (python3 without {modules}; apt-get install {packages}): {name}");
            None
        }
    }
}

fn run(cmd: &[&str]) -> io::Result<()> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl Testbed {
    /// Builds the topology. `tag` goes into the namespace names (keep it short).
    pub fn create(tag: &str) -> io::Result<Testbed> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("rt{}-{}{}", std::process::id(), tag, n);
        let mut tb = Testbed {
            prefix,
            created: Vec::new(),
        };
        tb.build()?;
        Ok(tb)
    }

    pub fn node_name(&self) -> String {
        format!("{}-node", self.prefix)
    }

    pub fn pod_name(&self, pod: Pod) -> String {
        format!("{}-{}", self.prefix, pod.suffix())
    }

    pub fn node_ns(&self) -> io::Result<NetNs> {
        NetNs::open(&netns_path(&self.node_name()))
    }

    pub fn pod_ns(&self, pod: Pod) -> io::Result<NetNs> {
        NetNs::open(&netns_path(&self.pod_name(pod)))
    }

    pub fn pod_path(&self, pod: Pod) -> PathBuf {
        netns_path(&self.pod_name(pod))
    }

    fn add_ns(&mut self, name: &str) -> io::Result<()> {
        run(&["ip", "netns", "add", name])?;
        self.created.push(name.to_string());
        // No duplicate address detection: a tentative link-local address cannot send neighbour
        // solicitations, which stalls the first IPv6 connection for a second or two.
        run(&[
            "ip",
            "netns",
            "exec",
            name,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        run(&["ip", "-n", name, "link", "set", "lo", "up"])
    }

    fn build(&mut self) -> io::Result<()> {
        let node = self.node_name();
        self.add_ns(&node)?;
        run(&[
            "ip",
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ])?;
        for pod in Pod::ALL {
            let name = self.pod_name(pod);
            self.add_ns(&name)?;
            let i = pod as u8;
            let (veth_node, gw4, gw6) = (
                format!("v{i}"),
                format!("10.77.{i}.1"),
                format!("fd77:{i}::1"),
            );
            run(&[
                "ip", "-n", &node, "link", "add", &veth_node, "type", "veth", "peer", "name",
                "eth0", "netns", &name,
            ])?;
            run(&[
                "ip",
                "-n",
                &node,
                "addr",
                "add",
                &format!("{gw4}/24"),
                "dev",
                &veth_node,
            ])?;
            run(&[
                "ip",
                "-n",
                &node,
                "addr",
                "add",
                &format!("{gw6}/64"),
                "dev",
                &veth_node,
                "nodad",
            ])?;
            run(&["ip", "-n", &node, "link", "set", &veth_node, "up"])?;
            run(&[
                "ip",
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/24", pod.v4()),
                "dev",
                "eth0",
            ])?;
            run(&[
                "ip",
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/64", pod.v6()),
                "dev",
                "eth0",
                "nodad",
            ])?;
            run(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &name, "route", "add", "default", "via", &gw4])?;
            run(&[
                "ip", "-n", &name, "-6", "route", "add", "default", "via", &gw6,
            ])?;
        }
        Ok(())
    }

    /// A node configuration serving the client and both mesh pods (pod mode), with the
    /// service VIP in front of the mesh pods. `extra_node` is YAML appended under `node:`.
    pub fn config_yaml(&self, reactors: usize, extra_node: &str) -> String {
        let pod = |p: Pod, name: &str| {
            format!(
                "  - name: {name}\n    namespace: default\n    service_account: {name}\n    ips: [{}, \"{}\"]\n    node: node-a\n    protocol: TCP\n    netns: {}\n",
                p.v4(),
                p.v6(),
                self.pod_path(p).display()
            )
        };
        format!(
            "version: 1\nnode:\n  name: node-a\n  reactors: {reactors}\n  admin: 127.0.0.1:15000\n  metrics: 127.0.0.1:15020\n  readiness: 127.0.0.1:15021\n{extra_node}workloads:\n{}{}{}services:\n  - name: echo\n    namespace: default\n    vips: [{VIP}]\n    ports:\n      - {{port: {VIP_PORT}, target_port: {MESH_PORT}}}\n    endpoints: [mesh-1, mesh-2]\n",
            pod(Pod::Client, "client"),
            pod(Pod::Mesh1, "mesh-1"),
            pod(Pod::Mesh2, "mesh-2"),
        )
    }

    /// One node's configuration in a two-node mesh: node A serves the client pod, node B serves
    /// both mesh pods, which speak HBONE (so A reaches them through tunnels to their port
    /// 15008, where B's listeners take the tunnel). Both nodes list the same workloads; only
    /// `node.name` and the endpoint ports differ ([`MeshNode::port_base`]). `certs` is the
    /// directory `ringtun certs` filled (CA `ca.pem`, `<ns>/<sa>/cert.pem|key.pem`).
    pub fn two_node_config(
        &self,
        node: MeshNode,
        reactors: usize,
        certs: &Path,
        extra_node: &str,
    ) -> String {
        let pod = |p: Pod, name: &str, on: MeshNode, protocol: &str| {
            format!(
                "  - name: {name}\n    namespace: default\n    service_account: {name}\n    ips: [{}, \"{}\"]\n    node: {}\n    protocol: {protocol}\n    netns: {}\n",
                p.v4(),
                p.v6(),
                on.name(),
                self.pod_path(p).display()
            )
        };
        let base = node.port_base();
        format!(
            "version: 1\nnode:\n  name: {}\n  reactors: {reactors}\n  admin: 127.0.0.1:{}\n  metrics: 127.0.0.1:{}\n  readiness: 127.0.0.1:{}\n  tls:\n    trust_bundle: {}\n    certificate_dir: {}\n{extra_node}workloads:\n{}{}{}services:\n  - name: echo\n    namespace: default\n    vips: [{VIP}]\n    ports:\n      - {{port: {VIP_PORT}, target_port: {MESH_PORT}}}\n    endpoints: [mesh-1, mesh-2]\n",
            node.name(),
            base,
            base + 20,
            base + 21,
            certs.join("ca.pem").display(),
            certs.display(),
            pod(Pod::Client, "client", MeshNode::A, "TCP"),
            pod(Pod::Mesh1, "mesh-1", MeshNode::B, "HBONE"),
            pod(Pod::Mesh2, "mesh-2", MeshNode::B, "HBONE"),
        )
    }

    /// The pods whose traffic ringtun captures (the ext server is outside the mesh).
    pub fn captured_pods() -> [Pod; 3] {
        [Pod::Client, Pod::Mesh1, Pod::Mesh2]
    }

    /// `ringtun redirect install` in each of `pods` for the node `config` (a file) describes;
    /// panics with ringtun's own words when one fails (test support).
    pub fn install_capture(&self, bin: &Path, pods: &[Pod], config: &Path) {
        for &pod in pods {
            let out = Command::new(bin)
                .args([
                    "redirect",
                    "install",
                    "--netns",
                    &self.pod_name(pod),
                    "--config",
                ])
                .arg(config)
                .output()
                .expect("ringtun redirect install runs");
            assert!(
                out.status.success(),
                "redirect install in {}: {}",
                self.pod_name(pod),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for name in self.created.iter().rev() {
            let _ = run(&["ip", "netns", "del", name]);
        }
        // Configs and ringtun logs written for this testbed; kept when a test is failing so
        // the log can be read.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&self.prefix));
        }
    }
}

/// A listener made inside `ns` (it keeps the namespace).
pub fn listen_in(ns: &NetNs, addr: SocketAddr) -> io::Result<TcpListener> {
    ns.enter_for(|| TcpListener::bind(addr))?
}

/// A connection made from inside `ns`, as the pod's application would make it.
pub fn connect_in(ns: &NetNs, addr: SocketAddr) -> io::Result<TcpStream> {
    let s = ns.enter_for(|| TcpStream::connect_timeout(&addr, Duration::from_secs(10)))??;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

/// Uploads `bytes` through the client `connect()` opens to the connection `listener` accepts,
/// which reads nothing until the pipeline has been full for 2 s; returns the CPU seconds
/// `cpu()` grew by during the last 2 s of the stall (a proxy waiting for a stalled reader
/// should use none), then lets the destination read and checks that every byte arrived in
/// order. The client connects only once the listener exists: connecting first let the proxy's
/// upstream connect meet no listener and reset the client.
pub fn stalled_upload_cpu(
    listener: std::net::TcpListener,
    connect: impl FnOnce() -> std::net::TcpStream,
    bytes: usize,
    cpu: impl Fn() -> f64,
) -> f64 {
    use std::io::{Read, Write};
    let client = connect();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        wait.recv().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let mut data = vec![0u8; bytes];
    Pattern::new(bytes as u64).fill(&mut data);
    let mut w = client.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    // Let the windows, pipes and socket buffers fill, then watch while nothing can move.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !writer.is_finished(),
        "the stalled destination took all {bytes} bytes"
    );
    let before = cpu();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu() - before;
    go.send(()).unwrap();
    writer.join().unwrap();
    let got = server.join().unwrap();
    assert_eq!(got.len(), bytes, "bytes missing after the stall");
    assert!(got == data, "bytes differ after the stall");
    drop(client);
    used
}

/// Deterministic, incompressible test bytes (xorshift64*), so corruption cannot hide.
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `len` pattern bytes; returns their SHA-256.
pub fn send_pattern(w: &mut impl Write, len: u64, seed: u64) -> io::Result<[u8; 32]> {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(h.finalize().into())
}

/// Reads to EOF; returns the byte count and SHA-256.
pub fn recv_hash(r: &mut impl Read) -> io::Result<(u64, [u8; 32])> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            // A signal landed during the read (seen under CI load): not the stream's end.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if n == 0 {
            return Ok((total, h.finalize().into()));
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
}

pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// `ringtun run` as a child process inside the node namespace (tests and perf).
pub struct RingtunProcess {
    pub child: Child,
    pub log: PathBuf,
    /// The configuration file it runs with (rewrite it and [`hangup`](Self::hangup), or let
    /// ringtun see the change, to reload).
    pub config: PathBuf,
    node_ns: NetNs,
    /// Admin port; metrics `+ 20`, readiness `+ 21`.
    port_base: u16,
}

impl RingtunProcess {
    /// Runs ringtun in the node namespace (pod mode: it serves the pods from outside).
    pub fn spawn(
        bin: &Path,
        tb: &Testbed,
        config: &str,
        args: &[&str],
    ) -> io::Result<RingtunProcess> {
        Self::spawn_in(bin, tb, &tb.node_name(), config, args)
    }

    /// Runs ringtun inside namespace `ns` (host mode: that namespace is the workload).
    pub fn spawn_in(
        bin: &Path,
        tb: &Testbed,
        ns: &str,
        config: &str,
        args: &[&str],
    ) -> io::Result<RingtunProcess> {
        Self::spawn_named(bin, tb, ns, "node", 15000, config, args)
    }

    /// Runs node `node` of the two-node mesh ([`Testbed::two_node_config`]) in the node
    /// namespace.
    pub fn spawn_mesh_node(
        bin: &Path,
        tb: &Testbed,
        node: MeshNode,
        config: &str,
        args: &[&str],
    ) -> io::Result<RingtunProcess> {
        Self::spawn_named(
            bin,
            tb,
            &tb.node_name(),
            node.name(),
            node.port_base(),
            config,
            args,
        )
    }

    /// Runs ringtun in namespace `ns`; its config and log are `<tmp>/<prefix>/<name>.yaml|.log`
    /// and its endpoints are on `port_base` (+20 metrics, +21 readiness).
    pub fn spawn_named(
        bin: &Path,
        tb: &Testbed,
        ns: &str,
        name: &str,
        port_base: u16,
        config: &str,
        args: &[&str],
    ) -> io::Result<RingtunProcess> {
        let dir = std::env::temp_dir().join(&tb.prefix);
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, config)?;
        let log = dir.join(format!("{name}.log"));
        let logf = std::fs::File::create(&log)?;
        let cfg_s = cfg.display().to_string();
        let mut cmd_args = vec![
            "netns",
            "exec",
            ns,
            bin.to_str().unwrap_or("ringtun"),
            "run",
            "--config",
            &cfg_s,
        ];
        cmd_args.extend_from_slice(args);
        let child = Command::new("ip")
            .args(&cmd_args)
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()?;
        let p = RingtunProcess {
            child,
            log,
            config: cfg,
            node_ns: NetNs::open(&netns_path(ns))?,
            port_base,
        };
        p.wait_ready(Duration::from_secs(20))?;
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) the process has used so far, from /proc/<pid>/stat.
    pub fn cpu_seconds(&self) -> io::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // After the parenthesised command name: field 3 (state) onward; utime and stime are
        // fields 14 and 15.
        let rest = stat
            .rfind(')')
            .map(|i| &stat[i + 2..])
            .ok_or_else(|| io::Error::other("unexpected /proc/<pid>/stat"))?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> io::Result<f64> {
            f.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| io::Error::other("unexpected /proc/<pid>/stat"))
        };
        let hz = crate::sys::process::clock_ticks_per_second() as f64;
        Ok((ticks(11)? + ticks(12)?) / hz)
    }

    /// GET on the admin/metrics/readiness ports of the namespace ringtun runs in.
    pub fn get(&self, port: u16, path: &str) -> io::Result<(u16, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.node_ns
            .enter_for(|| crate::admin::http_get(addr, path))?
    }

    pub fn metrics(&self) -> io::Result<String> {
        Ok(self.get(self.port_base + 20, "/metrics")?.1)
    }

    /// Sum of a metric's samples whose label text contains every string in `labels`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> io::Result<f64> {
        Ok(metric_sum(&self.metrics()?, name, labels))
    }

    fn wait_ready(&self, limit: Duration) -> io::Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok((200, _)) = self.get(self.port_base + 21, "/healthz/ready") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(io::Error::other(format!(
            "ringtun not ready after {limit:?}; log:\n{}",
            self.log_text()
        )))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The access log so far: one JSON record per finished connection.
    pub fn access_records(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| l.split_once(" access: ").map(|(_, json)| json))
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect()
    }

    /// Resident memory (VmRSS) now, in KiB; 0 once the process is gone.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Descriptors the process holds now.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// SIGHUP: reload the configuration.
    pub fn hangup(&self) -> io::Result<()> {
        crate::sys::signal::send(self.pid(), crate::sys::signal::Signal::SIGHUP)
    }

    /// SIGTERM, then wait for exit; returns the exit code.
    pub fn terminate(mut self) -> io::Result<i32> {
        let _ = crate::sys::signal::terminate(self.pid());
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st.code().unwrap_or(-1));
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                return Err(io::Error::other(
                    "ringtun did not exit within 30 s of SIGTERM",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RingtunProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Writes development certificates for every workload of `config` into `dir` with
/// `ringtun certs` (the CA is reused when `dir` already has one).
pub fn write_certs(bin: &Path, config: &str, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cfg = dir.join("certs-config.yaml");
    std::fs::write(&cfg, config)?;
    let out = Command::new(bin)
        .arg("certs")
        .arg("--config")
        .arg(&cfg)
        .arg("--out")
        .arg(dir)
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ringtun certs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Sum of the samples of `name` whose labels contain every string in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|l| labels.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What one side of an exchange saw: the hash of what it sent, and of what it received.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    pub sent: u64,
    pub sent_hash: [u8; 32],
    pub received: u64,
    pub received_hash: [u8; 32],
    pub elapsed: Duration,
}

/// Sends `bytes` pattern bytes (then half-closes) while reading the peer's bytes to EOF.
pub fn exchange(stream: TcpStream, bytes: u64, seed: u64) -> io::Result<Exchange> {
    let start = Instant::now();
    let mut w = stream.try_clone()?;
    let writer = std::thread::spawn(move || -> io::Result<[u8; 32]> {
        let h = send_pattern(&mut w, bytes, seed)?;
        w.shutdown(std::net::Shutdown::Write)?;
        Ok(h)
    });
    let mut r = stream;
    let (received, received_hash) = recv_hash(&mut r)?;
    let sent_hash = writer
        .join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    Ok(Exchange {
        sent: bytes,
        sent_hash,
        received,
        received_hash,
        elapsed: start.elapsed(),
    })
}

/// One exchange of `bytes` each way between the client pod and a server listening at `to` in
/// `server_pod` (through whatever captures the client's connection): every byte arrives,
/// SHA-256 equal at both ends. Returns how long the client's side took.
pub fn exchange_intact(tb: &Testbed, server_pod: Pod, to: SocketAddr, bytes: u64) -> Duration {
    let listener = listen_in(&tb.pod_ns(server_pod).expect("server pod"), to).expect("listen");
    let server = serve_exchanges(listener, 1, bytes, 2);
    let client =
        connect_in(&tb.pod_ns(Pod::Client).expect("client pod"), to).expect("client connects");
    let c = exchange(client, bytes, 1).expect("client exchange");
    let s = server
        .join()
        .expect("server thread")
        .expect("server exchange")[0];
    assert_eq!((c.received, s.received), (bytes, bytes), "bytes lost");
    assert_eq!(
        hex(&c.sent_hash),
        hex(&s.received_hash),
        "client → server bytes differ"
    );
    assert_eq!(
        hex(&s.sent_hash),
        hex(&c.received_hash),
        "server → client bytes differ"
    );
    c.elapsed
}

/// Reads to EOF (retrying EINTR); the error if the stream ended with one instead.
pub fn read_until_end(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = [0u8; 65536];
    let mut out = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The errors a socket ends with when its peer reset it (not a clean EOF).
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// SO_LINGER 0: closing the socket then sends a RST instead of a FIN.
pub fn set_linger_zero(s: &TcpStream) {
    let _ = crate::sys::socket::set_linger_zero(std::os::fd::AsRawFd::as_raw_fd(s));
}

/// `n` exchanges of `bytes` each way at once: clients from `connect` (each on its own thread),
/// served on `listener`. Asserts every byte arrived intact both ways: every client sends the
/// same pattern and every server answers with one, so each side's hash of what arrived must be
/// the other side's hash of what it sent.
pub fn concurrent_exchanges_intact(
    listener: TcpListener,
    n: usize,
    bytes: u64,
    connect: impl Fn() -> TcpStream,
) {
    let server = serve_exchanges(listener, n, bytes, 2);
    let clients: Vec<_> = (0..n)
        .map(|_| {
            let s = connect();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            std::thread::spawn(move || exchange(s, bytes, 1).expect("client exchange"))
        })
        .collect();
    let mine: Vec<Exchange> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    let theirs = server.join().unwrap().expect("server exchanges");
    assert_eq!(theirs.len(), n);
    for (c, s) in mine.iter().zip(&theirs) {
        assert_eq!((c.received, s.received), (bytes, bytes));
        assert_eq!(
            s.received_hash, mine[0].sent_hash,
            "client → server bytes differ"
        );
        assert_eq!(
            c.received_hash, theirs[0].sent_hash,
            "server → client bytes differ"
        );
    }
}

/// Accepts `count` connections on `listener`, answering each with [`exchange`] of `bytes`.
pub fn serve_exchanges(
    listener: TcpListener,
    count: usize,
    bytes: u64,
    seed: u64,
) -> std::thread::JoinHandle<io::Result<Vec<Exchange>>> {
    std::thread::spawn(move || {
        let mut handles = Vec::new();
        for _ in 0..count {
            let (s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(120)))?;
            handles.push(std::thread::spawn(move || exchange(s, bytes, seed)));
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| io::Error::other("server panicked"))?)
            .collect()
    })
}
