//! Configuration reload, in process and without root: a node whose workloads all live on other
//! nodes (so it opens no listener) started from a file, then the file rewritten. A reload that
//! loads is applied and every reactor runs on it; one that does not changes nothing and says
//! why; a change of the file is applied without a signal; `node:` settings that need a restart
//! are kept. (Listeners, re-evaluation of open flows and certificates under reload are the root
//! tests' business: `tests/authz_e2e.rs`.)

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use ringtun::app::{App, Options};
use ringtun::control_plane::config::{self, DriverChoice};
use ringtun::lifecycle::reload::{ConfigFile, Outcome};

fn config(policies: usize, reactors_setting: usize) -> String {
    let mut s = format!(
        "version: 1\nnode: {{name: node-a, reactors: {reactors_setting}}}\nworkloads:\n\
         - {{name: web, namespace: prod, ips: [10.9.0.1], node: node-b}}\npolicies:\n"
    );
    for i in 0..policies {
        s.push_str(&format!(
            "- {{name: p{i}, namespace: prod, rules: [{{to: [{{operation: {{ports: [{}]}}}}]}}]}}\n",
            8000 + i
        ));
    }
    s
}

struct Node {
    app: App,
    path: PathBuf,
    dir: PathBuf,
}

impl Node {
    fn start(tag: &str, text: &str) -> Node {
        let dir = std::env::temp_dir().join(format!("ringtun-reload-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.yaml");
        std::fs::write(&path, text).unwrap();
        let cfg = config::load_file(&path).expect("valid config");
        let app = App::start(
            cfg,
            Options {
                driver: Some(DriverChoice::Epoll),
                reactors: Some(2),
                config_file: Some(ConfigFile::new(&path, text.as_bytes())),
                ..Default::default()
            },
        )
        .expect("node starts");
        Node { app, path, dir }
    }

    /// Replaces the file the way editors and Kubernetes do: a new file renamed over the old.
    fn write(&self, text: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    fn generation(&self) -> u64 {
        self.app.state().generation
    }

    fn stop(self) {
        self.app.drain();
        self.app.wait().expect("node drains");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// How long a change of the file may take to be applied (the watcher waits for a quiet
/// directory first; CI machines are slow).
const APPLIED_WITHIN: Duration = Duration::from_secs(10);

#[test]
fn a_changed_file_is_applied_and_a_broken_one_changes_nothing() {
    let node = Node::start("watch", &config(1, 2));
    assert_eq!(node.generation(), 1);
    assert_eq!(node.app.state().policies.policies().len(), 1);

    node.write(&config(3, 2));
    assert!(
        wait_for(APPLIED_WITHIN, || node.generation() == 2),
        "the file changed, the node still runs generation {}",
        node.generation()
    );
    assert_eq!(node.app.state().policies.policies().len(), 3);
    assert_eq!(node.app.metrics.control.generation.load(Relaxed), 2);

    // Broken: a policy port out of range. The running snapshot stays; the failure is counted
    // once (the same broken contents are not tried again until they change or SIGHUP).
    node.write(&config(3, 2).replace("ports: [8002]", "ports: [80000]"));
    let control = &node.app.metrics.control;
    assert!(wait_for(APPLIED_WITHIN, || control
        .reloads_failed
        .load(Relaxed)
        == 1));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(control.reloads_failed.load(Relaxed), 1);
    assert_eq!(control.reloads_applied.load(Relaxed), 1);
    assert_eq!(node.generation(), 2);
    assert_eq!(node.app.state().policies.policies().len(), 3);
    let metrics = node.app.metrics.render();
    assert!(
        metrics.contains("ringtun_config_reloads_total{result=\"failed\"} 1"),
        "{metrics}"
    );

    // SIGHUP tries again and says where the file is wrong.
    match node.app.reload() {
        Some(Outcome::Failed(e)) => {
            let file = node.path.display().to_string();
            assert!(e.starts_with(&format!("{file}:")), "{e}");
            assert!(
                e.contains("policies[2].rules[0].to[0].operation.ports[0]"),
                "{e}"
            );
        }
        other => panic!("a broken file must fail the reload, got {other:?}"),
    }
    assert_eq!(node.generation(), 2);

    // Fixed again: applied.
    node.write(&config(4, 2));
    assert!(wait_for(APPLIED_WITHIN, || node.generation() == 3));
    assert_eq!(node.app.state().policies.policies().len(), 4);
    node.stop();
}

#[test]
fn the_same_contents_written_again_are_not_a_change() {
    let node = Node::start("same", &config(1, 2));
    node.write(&config(1, 2));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(node.generation(), 1);
    assert_eq!(node.app.metrics.control.reloads_applied.load(Relaxed), 0);
    node.stop();
}

#[test]
fn node_settings_that_need_a_restart_keep_their_running_value() {
    let node = Node::start("keep", &config(1, 2));
    node.write(&config(2, 7));
    assert!(wait_for(APPLIED_WITHIN, || node.generation() == 2));
    let state = node.app.state();
    assert_eq!(state.config.node.reactors, Some(2), "reactors changed live");
    assert_eq!(
        state.policies.policies().len(),
        2,
        "the mesh was not reloaded"
    );
    node.stop();
}

#[test]
fn every_reactor_runs_on_the_new_snapshot_when_reload_returns() {
    // SIGHUP reloads even an unchanged file (nothing is written, so the watcher stays out).
    let node = Node::start("adopt", &config(1, 2));
    for generation in 2..6 {
        assert_eq!(node.app.reload(), Some(Outcome::Applied { generation }));
        let serial = node.app.published.load().serial;
        assert_eq!(node.app.adopted_snapshots(), [serial, serial]);
    }
    node.stop();
}

/// What a reload cost the data path is exported: each reactor times every adoption (one
/// histogram sample per reactor per publication), and the longest stays visible.
#[test]
fn every_reactor_times_each_adoption_in_the_metrics() {
    let node = Node::start("adoption", &config(50, 2));
    let reactors = &node.app.metrics.reactors;
    assert!(reactors.iter().all(|r| r.adoption.count() == 0));
    for generation in 2..5 {
        assert_eq!(node.app.reload(), Some(Outcome::Applied { generation }));
    }
    let metrics = node.app.metrics.render();
    for r in 0..2 {
        let count =
            format!("ringtun_reactor_snapshot_adoption_seconds_count{{reactor=\"{r}\"}} 3\n");
        assert!(metrics.contains(&count), "no `{count}` in\n{metrics}");
        let inf = format!(
            "ringtun_reactor_snapshot_adoption_seconds_bucket{{reactor=\"{r}\",le=\"+Inf\"}} 3\n"
        );
        assert!(metrics.contains(&inf), "no `{inf}` in\n{metrics}");
        // An adoption takes some time, and not a second.
        let longest = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "ringtun_reactor_snapshot_adoption_longest_seconds{{reactor=\"{r}\"}} "
                ))
            })
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no longest adoption for reactor {r} in\n{metrics}"));
        assert!(
            longest > 0.0 && longest < 1.0,
            "longest adoption {longest} s"
        );
    }
    let reload = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ringtun_config_reload_seconds "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("reload time exported");
    assert!(reload > 0.0, "{reload}");
    node.stop();
}

/// A configuration whose certificate files are not there yet (its writer was faster than the
/// certificate agent) is refused, then applied as soon as they are written: no signal, no
/// second edit of the configuration file.
#[test]
fn a_configuration_waiting_for_its_certificate_files_is_applied_when_they_appear() {
    use ringtun::control_plane::certs::DevCa;
    use std::time::SystemTime;

    // Node::start's directory, filled first: the bundle the first configuration names.
    let dir = std::env::temp_dir().join(format!("ringtun-reload-certs-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let ca = DevCa::generate(
        "cluster.local",
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    let with_bundle = |bundle: &str, policies: usize| {
        config(policies, 2).replace(
            "node: {name: node-a, reactors: 2}",
            &format!(
                "node: {{name: node-a, reactors: 2, tls: {{trust_bundle: {}, certificate_dir: {}}}}}",
                dir.join(bundle).display(),
                dir.join("certs").display()
            ),
        )
    };
    let node = Node::start("certs", &with_bundle("ca.pem", 1));
    assert!(node.app.published.load().credentials.is_some());

    node.write(&with_bundle("next-ca.pem", 2));
    let control = &node.app.metrics.control;
    assert!(wait_for(APPLIED_WITHIN, || control
        .reloads_failed
        .load(Relaxed)
        == 1));
    assert_eq!(node.generation(), 1);

    let tmp = dir.join("next-ca.pem.tmp");
    std::fs::write(&tmp, ca.cert_pem()).unwrap();
    std::fs::rename(&tmp, dir.join("next-ca.pem")).unwrap();
    assert!(
        wait_for(APPLIED_WITHIN, || node.generation() == 2),
        "the bundle arrived, the node still runs generation {}",
        node.generation()
    );
    assert_eq!(node.app.state().policies.policies().len(), 2);
    assert_eq!(control.reloads_failed.load(Relaxed), 1);
    node.stop();
}
