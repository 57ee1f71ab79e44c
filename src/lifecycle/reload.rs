//! Live configuration changes: SIGHUP, or a change of the configuration file (seen by
//! [`super::watch`]), builds a new node snapshot and publishes it; the reactors adopt it at
//! their next wakeup (they are woken at once). New connections see the new workloads, services
//! and policies from then on. A change of the certificate files alone (the trust bundle, a
//! local identity's `cert.pem` or `key.pem`) publishes the running state with new credentials:
//! new tunnels present the new certificates, open tunnels go on with theirs.
//!
//! Boundary: this is the control thread's side. It reads and validates the file, builds the
//! state (registry, compiled policies) and the tunnel credentials off the data path, publishes,
//! waits until every reactor runs on the new snapshot and only then lets go of the old one (so
//! the old state, which can be large, is freed here and not on a reactor). A file that does not
//! load — or whose certificates do not — changes nothing: the running snapshot stays, the
//! error is logged, counted (`ringtun_config_reloads_total{result="failed"}`) and shown in
//! `/config_dump` until a reload succeeds.
//!
//! In node CA mode the same publish step serves renewal: [`Reloader::renew`] (called by the
//! `config-watch` thread when a certificate is due) issues the certificates that passed half
//! their lifetime and publishes the running state with them. A renewal that fails (the CA
//! expired, its files became unreadable) keeps the current certificates, is logged and counted
//! (`ringtun_certificate_renewals_total{result="failed"}`) and is retried with backoff.
//!
//! Only the mesh is reloaded: `workloads`, `services`, `policies`, `node.root_namespace` and
//! `node.tls` (its files are read again). Every other `node:` setting (ports, reactors,
//! timeouts, …) shapes sockets and threads that already exist: a changed one is kept at its
//! running value, logged, and listed under `pending_restart` until the next start.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::control_plane::config::{check_file_text, Config, NodeConfig};
use crate::control_plane::node_ca::NodeCa;
use crate::control_plane::state::State;
use crate::data_plane::listeners::{self, ListenerUpdate};
use crate::data_plane::reactor::ReactorControl;
use crate::data_plane::snapshot::{Published, Snapshot};
use crate::kernel_features::KtlsSupport;
use crate::observability::metrics::Metrics;
use crate::tls::credentials;

/// How long a reload waits for every reactor to adopt its snapshot before it says so.
const ADOPTION_LIMIT: Duration = Duration::from_secs(2);
/// A failed renewal is tried again after this, doubling at each failure up to
/// [`RENEWAL_BACKOFF_MAX`].
const RENEWAL_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RENEWAL_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The configuration file a node runs from, and the fingerprint of the text it started with.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub digest: [u8; 32],
}

impl ConfigFile {
    pub fn new(path: &Path, text: &[u8]) -> ConfigFile {
        ConfigFile {
            path: path.to_path_buf(),
            digest: Sha256::digest(text).into(),
        }
    }
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: read everything again, changed or not.
    Signal,
    /// A watched file changed: nothing happens unless its contents did.
    FileChanged,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied {
        generation: u64,
    },
    /// The file's contents are what the node already ran (or already refused).
    Unchanged,
    /// Nothing changed; the error says why.
    Failed(String),
}

/// Builds and publishes snapshots; shared by the signal loop and the file watcher (one reload
/// at a time).
pub struct Reloader {
    path: PathBuf,
    published: Arc<Published>,
    controls: Vec<Arc<ReactorControl>>,
    metrics: Arc<Metrics>,
    ktls: KtlsSupport,
    status: Mutex<Status>,
}

struct Status {
    /// Of the text last read (applied or refused): a file event with the same contents is
    /// not a change.
    digest: [u8; 32],
    /// Of the certificate files last read, likewise.
    credentials_digest: [u8; 32],
    /// The certificate files of the last configuration refused because its certificates did
    /// not load (a workload added before its certificate was written), and their fingerprint
    /// then: when they change, that configuration is tried again.
    waiting_for: Vec<PathBuf>,
    waiting_digest: [u8; 32],
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    last_applied_at: Option<SystemTime>,
    /// How long the last applied reload took, from reading the files to every reactor
    /// running on its snapshot.
    last_applied_in: Option<Duration>,
    pending_restart: Vec<String>,
    /// Workloads the last reload could not make listeners for.
    listener_problems: Vec<String>,
    draining: bool,
    /// Node CA mode: the CA and what it issued for the running snapshot.
    node_ca: Option<NodeCa>,
    /// After a failed renewal: the next attempt is not before this, and the backoff after it.
    renewal_retry: Option<(SystemTime, Duration)>,
    /// Why the last renewal failed, until one succeeds (`/config_dump`).
    renewal_error: Option<String>,
}

impl Status {
    /// When node CA mode has something to renew next (see [`Reloader::next_renewal`]).
    fn renewal_due(&self) -> Option<SystemTime> {
        if self.draining {
            return None;
        }
        let due = self.node_ca.as_ref()?.next_renewal()?;
        Some(self.renewal_retry.map_or(due, |(retry_at, _)| retry_at))
    }
}

/// What [`Reloader::renew`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Nothing was due (or the node is not in node CA mode, or is draining).
    NotDue,
    /// This many certificates were issued anew and are presented by new tunnels.
    Renewed(u64),
    /// Nothing changed; the error says why. Tried again after the backoff.
    Failed(String),
}

impl Reloader {
    /// `published` holds the snapshot the node started with; its certificate files are taken
    /// as read now, a moment after start built its credentials from them. `node_ca` is what
    /// built them in node CA mode.
    pub fn new(
        file: ConfigFile,
        published: Arc<Published>,
        controls: Vec<Arc<ReactorControl>>,
        metrics: Arc<Metrics>,
        ktls: KtlsSupport,
        node_ca: Option<NodeCa>,
    ) -> Reloader {
        let credentials_digest =
            files_digest(&credentials::credential_files(&published.load().state));
        Reloader {
            path: file.path,
            published,
            controls,
            metrics,
            ktls,
            status: Mutex::new(Status {
                digest: file.digest,
                credentials_digest,
                waiting_for: Vec::new(),
                waiting_digest: [0; 32],
                last_error: None,
                last_error_at: None,
                last_applied_at: None,
                last_applied_in: None,
                pending_restart: Vec::new(),
                listener_problems: Vec::new(),
                draining: false,
                node_ca,
                renewal_retry: None,
                renewal_error: None,
            }),
        }
    }

    /// The configuration file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files whose change a reload applies (their directories are watched): the
    /// configuration file, the certificate files the running configuration names, and those of
    /// a configuration waiting for its certificates.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        files.extend(credentials::credential_files(&self.published.load().state));
        files.extend(self.status().waiting_for.iter().cloned());
        files
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node is draining: no more reloads.
    pub fn stop(&self) {
        self.status().draining = true;
    }

    /// Reads the file and, if it loads, publishes the snapshot it describes and waits for the
    /// reactors to run on it.
    pub fn reload(&self, trigger: Trigger) -> Outcome {
        let started = Instant::now();
        let mut status = self.status();
        if status.draining {
            log::info!("reload ignored: the node is draining");
            return Outcome::Unchanged;
        }
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) => {
                return self.failed(
                    &mut status,
                    format!("{}: cannot read: {e}", self.path.display()),
                )
            }
        };
        let digest: [u8; 32] = Sha256::digest(&text).into();
        if trigger == Trigger::FileChanged && digest == status.digest {
            let waited_for_changed = !status.waiting_for.is_empty()
                && files_digest(&status.waiting_for) != status.waiting_digest;
            if !waited_for_changed {
                return self.reload_credentials(&mut status, started);
            }
            log::info!(
                "the certificate files a refused configuration waits for changed: trying it again"
            );
        }
        status.digest = digest;
        status.waiting_for.clear();
        let text = match String::from_utf8(text) {
            Ok(t) => t,
            Err(_) => {
                return self.failed(
                    &mut status,
                    format!("{}: not UTF-8 text", self.path.display()),
                )
            }
        };
        let config = match check_file_text(&self.path, &text) {
            Ok((config, warnings)) => {
                for w in warnings {
                    log::warn!("{w}");
                }
                config
            }
            Err(e) => return self.failed(&mut status, e.lines().join("\n")),
        };
        let current = self.published.load();
        let (config, pending) = keep_running_node_settings(&current.state.config, config);
        for setting in &pending {
            log::warn!(
                "reload: {setting} changed; it takes effect at the next start (running with \
                 its current value)"
            );
        }
        let generation = current.state.generation + 1;
        let state = State::new(config, generation);
        let files = credentials::credential_files(&state);
        let files_now = files_digest(&files);
        let credentials =
            match credentials::load(&state, &self.ktls, &mut status.node_ca, SystemTime::now()) {
                Ok(c) => c.map(Arc::new),
                Err(e) => {
                    status.waiting_for = files;
                    status.waiting_digest = files_now;
                    return self.failed(&mut status, e.to_string());
                }
            };
        status.credentials_digest = files_now;
        let serial = current.serial + 1;
        self.hand_listeners(&mut status, &current.state, &state, serial);
        drop(current);
        let workloads = state.registry.local_workloads().count();
        let policies = state.policies.policies().len();
        // The gauge first: whoever sees the new generation published (a reactor, `/config_dump`,
        // a test) must not read the old one here.
        self.metrics.control.generation.store(generation, Relaxed);
        let (adopted, took) = self.publish(
            &mut status,
            Snapshot {
                serial,
                state,
                credentials,
            },
            started,
        );
        status.pending_restart = pending;
        log::info!(
            "configuration generation {generation} applied ({trigger:?}): {workloads} local \
             workloads, {policies} policies, in {took:?}{}",
            not_adopted(adopted)
        );
        Outcome::Applied { generation }
    }

    /// The configuration is what runs: if the certificate files changed, publishes the
    /// running state with credentials built from them.
    fn reload_credentials(&self, status: &mut Status, started: Instant) -> Outcome {
        let current = self.published.load();
        let digest = files_digest(&credentials::credential_files(&current.state));
        if digest == status.credentials_digest {
            return Outcome::Unchanged;
        }
        status.credentials_digest = digest;
        let generation = current.state.generation;
        let credentials = match credentials::load(
            &current.state,
            &self.ktls,
            &mut status.node_ca,
            SystemTime::now(),
        ) {
            Ok(c) => c.map(Arc::new),
            Err(e) => return self.failed(status, format!("certificate files: {e}")),
        };
        let (adopted, took) = self.publish(status, with_credentials(current, credentials), started);
        log::info!(
            "certificate files changed: generation {generation} runs with the new certificates \
             (new tunnels present them), in {took:?}{}",
            not_adopted(adopted)
        );
        Outcome::Applied { generation }
    }

    /// Publishes `snapshot`, waits for the reactors to adopt it, frees the old one here on the
    /// control thread (no reactor holds it any more), and records the reload as applied.
    /// Returns whether every reactor adopted it in time, and how long the reload took.
    fn publish(
        &self,
        status: &mut Status,
        snapshot: Snapshot,
        started: Instant,
    ) -> (bool, Duration) {
        let (adopted, took) = self.swap(snapshot, started);
        status.last_error = None;
        status.last_error_at = None;
        status.last_applied_at = Some(SystemTime::now());
        status.last_applied_in = Some(took);
        let c = &self.metrics.control;
        c.reloads_applied.fetch_add(1, Relaxed);
        c.last_reload_ns.store(took.as_nanos() as u64, Relaxed);
        (adopted, took)
    }

    /// Publishes `snapshot`, waits for the reactors to adopt it and frees the old one here on
    /// the control thread (no reactor holds it any more). Returns whether every reactor
    /// adopted it in time, and how long it took since `started`.
    fn swap(&self, snapshot: Snapshot, started: Instant) -> (bool, Duration) {
        let serial = snapshot.serial;
        let old = self.published.store(snapshot);
        let adopted = self.await_adoption(serial);
        drop(old);
        (adopted, started.elapsed())
    }

    /// When node CA mode has something to renew next: the earliest half-life of what it
    /// issued, or the retry time after a failure. `None` when not in node CA mode.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.status().renewal_due()
    }

    /// Node CA mode: if a certificate passed half its lifetime at `now`, issues it (and any
    /// other due) anew and publishes the running state with them; new tunnels present them,
    /// open tunnels go on. Not a configuration reload: the generation stays.
    pub fn renew(&self, now: SystemTime) -> Renewal {
        let started = Instant::now();
        let mut status = self.status();
        match status.renewal_due() {
            Some(due) if due <= now => {}
            _ => return Renewal::NotDue,
        }
        let before = status.node_ca.as_ref().map_or(0, NodeCa::issued_total);
        let current = self.published.load();
        let c = &self.metrics.control;
        let credentials =
            match credentials::load(&current.state, &self.ktls, &mut status.node_ca, now) {
                Ok(c) => c.map(Arc::new),
                Err(e) => {
                    c.certificate_renewals_failed.fetch_add(1, Relaxed);
                    let backoff = status.renewal_retry.map_or(RENEWAL_BACKOFF_MIN, |(_, b)| {
                        (b * 2).min(RENEWAL_BACKOFF_MAX)
                    });
                    status.renewal_retry = Some((now + backoff, backoff));
                    status.renewal_error = Some(e.to_string());
                    log::error!(
                        "node CA: renewing certificates failed; the current ones stay in use, \
                         next attempt in {backoff:?}: {e}"
                    );
                    return Renewal::Failed(e.to_string());
                }
            };
        status.renewal_retry = None;
        status.renewal_error = None;
        let renewed = status.node_ca.as_ref().map_or(0, NodeCa::issued_total) - before;
        c.certificate_renewals.fetch_add(renewed, Relaxed);
        let (adopted, took) = self.swap(with_credentials(current, credentials), started);
        log::info!(
            "node CA: {renewed} certificate(s) renewed at half their lifetime (new tunnels \
             present them), in {took:?}{}",
            not_adopted(adopted)
        );
        Renewal::Renewed(renewed)
    }

    /// Makes the listeners of the workloads `next` adds to this node (or changes: another
    /// namespace, HBONE, IPv6) and hands each reactor its share, to take when it adopts
    /// snapshot `serial`. A workload whose listeners cannot be made is logged and listed in
    /// `/config_dump`; the rest of the reload goes on (as at start).
    fn hand_listeners(&self, status: &mut Status, previous: &State, next: &State, serial: u64) {
        let tunnels = next.config.node.tls.is_some();
        let ids = listeners::to_make(previous, next, tunnels);
        status.listener_problems.clear();
        if ids.is_empty() {
            return;
        }
        let replaced: Vec<Arc<str>> = ids
            .iter()
            .map(|&id| Arc::clone(&next.registry.workload(id).name))
            .collect();
        let (per_reactor, problems) =
            listeners::create_for(next, &ids, self.controls.len(), tunnels, serial);
        for p in &problems {
            log::error!("reload: {p}");
        }
        status.listener_problems = problems.iter().map(ToString::to_string).collect();
        for (control, listeners) in self.controls.iter().zip(per_reactor) {
            control.hand_listeners(ListenerUpdate {
                serial,
                listeners,
                replaced: replaced.clone(),
            });
        }
    }

    fn failed(&self, status: &mut Status, error: String) -> Outcome {
        let generation = self.published.load().state.generation;
        log::error!("configuration reload failed; generation {generation} keeps running:\n{error}");
        self.metrics.control.reloads_failed.fetch_add(1, Relaxed);
        status.last_error = Some(error.clone());
        status.last_error_at = Some(SystemTime::now());
        Outcome::Failed(error)
    }

    /// Wakes every reactor and waits until each runs on snapshot `serial`.
    fn await_adoption(&self, serial: u64) -> bool {
        for c in &self.controls {
            c.refresh();
        }
        let deadline = Instant::now() + ADOPTION_LIMIT;
        loop {
            if self.controls.iter().all(|c| c.adopted() >= serial) {
                return true;
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "reload: not every reactor adopted snapshot {serial} within {ADOPTION_LIMIT:?}"
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// What `/config_dump` shows of reloads.
    pub fn dump(&self) -> serde_json::Value {
        let status = self.status();
        let c = &self.metrics.control;
        let secs = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        };
        serde_json::json!({
            "file": self.path.display().to_string(),
            "generation": self.published.load().state.generation,
            "applied": c.reloads_applied.load(Relaxed),
            "failed": c.reloads_failed.load(Relaxed),
            "last_applied_unix": secs(status.last_applied_at),
            "last_applied_in_seconds": status.last_applied_in.map(|d| d.as_secs_f64()),
            "last_error": status.last_error,
            "last_error_unix": secs(status.last_error_at),
            "pending_restart": status.pending_restart,
            "listener_problems": status.listener_problems,
            // Node CA mode only: the next renewal, and why the last one failed.
            "certificate_renewal": status.node_ca.as_ref().map(|_| serde_json::json!({
                "next_unix": secs(status.renewal_due()),
                "last_error": status.renewal_error,
                "renewed": c.certificate_renewals.load(Relaxed),
                "failed": c.certificate_renewals_failed.load(Relaxed),
            })),
        })
    }
}

/// The next snapshot: the running state (`current`'s, let go of here) with new credentials.
fn with_credentials(
    current: Arc<Snapshot>,
    credentials: Option<Arc<credentials::TunnelCredentials>>,
) -> Snapshot {
    Snapshot {
        serial: current.serial + 1,
        state: Arc::clone(&current.state),
        credentials,
    }
}

/// The log's note on a publication some reactor had not adopted within [`ADOPTION_LIMIT`].
fn not_adopted(adopted: bool) -> &'static str {
    if adopted {
        ""
    } else {
        "; some reactors had not adopted it yet"
    }
}

/// The fingerprint of `files` as they are now (a file that cannot be read counts by its error,
/// so its return is a change).
fn files_digest(files: &[PathBuf]) -> [u8; 32] {
    let mut h = Sha256::new();
    for file in files {
        h.update(file.as_os_str().as_encoded_bytes());
        h.update([0]);
        match std::fs::read(file) {
            Ok(bytes) => {
                h.update([1]);
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(bytes);
            }
            Err(e) => {
                h.update([2]);
                h.update(e.to_string());
            }
        }
    }
    h.finalize().into()
}

/// The new configuration with the `node:` settings a running node cannot change put back to
/// their running values, and the names of those that differed (`node.ports`, …).
/// `root_namespace` (policy scope) and `tls` (which files hold the certificates) are taken
/// from the new file; whether tunnels exist at all (`tls` present or not) is not.
pub fn keep_running_node_settings(running: &Config, mut next: Config) -> (Config, Vec<String>) {
    let mut kept: NodeConfig = running.node.clone();
    kept.root_namespace = next.node.root_namespace.clone();
    if kept.tls.is_some() == next.node.tls.is_some() {
        kept.tls = next.node.tls.clone();
    }
    let as_map = |n: &NodeConfig| match serde_json::to_value(n) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (was, wanted) = (as_map(&kept), as_map(&next.node));
    let mut pending: Vec<String> = wanted
        .iter()
        .filter(|(k, v)| was.get(*k) != Some(*v))
        .map(|(k, _)| format!("node.{k}"))
        .collect();
    pending.sort();
    next.node = kept;
    (next, pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::config::load;
    use crate::control_plane::node_ca::write_test_node_ca;
    use crate::observability::metrics::ProcessFacts;

    /// Node CA mode's renewal through the reloader, on a simulated clock and without
    /// reactors: due at half-life and not before, published without a configuration reload,
    /// and a failure keeps the certificate in use, is counted and backs off (1 s, then 2 s).
    #[test]
    fn renewal_publishes_at_half_life_and_a_failure_keeps_the_certificate_and_backs_off() {
        let dir = std::env::temp_dir().join(format!("ringtun-renew-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = SystemTime::now();
        let (_, ica) = write_test_node_ca(&dir, t0, Duration::from_secs(3600));
        let text = format!(
            "version: 1\nnode:\n  name: n\n  tls:\n    trust_bundle: {d}/root.pem\n    \
             node_ca: {{certificate: {d}/ica.pem, key: {d}/ica-key.pem, certificate_lifetime: 2s}}\n\
             workloads:\n- {{name: web, namespace: ns, service_account: web, ips: [10.0.0.1], node: n, netns: p1}}\n",
            d = dir.display()
        );
        let path = dir.join("node.yaml");
        std::fs::write(&path, &text).unwrap();
        let ktls = credentials::unprobed_ktls();
        let state = State::new(load(&text).unwrap(), 1);
        let mut node_ca = None;
        let credentials = credentials::load(&state, &ktls, &mut node_ca, t0)
            .unwrap()
            .map(Arc::new);
        let published = Published::new(Snapshot {
            serial: 1,
            state,
            credentials,
        });
        let metrics = Arc::new(Metrics::new(0, ProcessFacts::default()));
        let reloader = Reloader::new(
            ConfigFile::new(&path, text.as_bytes()),
            Arc::clone(&published),
            Vec::new(),
            Arc::clone(&metrics),
            ktls,
            node_ca,
        );
        let serial = || {
            let snapshot = published.load();
            snapshot.credentials.as_ref().unwrap().listing()[0]
                .serial
                .clone()
        };
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let first = serial();
        let c = &metrics.control;

        assert_eq!(reloader.next_renewal(), Some(at(1000)));
        assert_eq!(reloader.renew(at(999)), Renewal::NotDue);
        assert_eq!(serial(), first);
        assert_eq!(reloader.renew(at(1000)), Renewal::Renewed(1));
        let second = serial();
        assert_ne!(second, first);
        assert_eq!(c.certificate_renewals.load(Relaxed), 1);
        // Not a configuration reload.
        assert_eq!(c.reloads_applied.load(Relaxed), 0);
        assert_eq!(published.load().state.generation, 1);
        assert_eq!(reloader.next_renewal(), Some(at(2000)));

        // The CA's key goes away: the renewal fails, the certificate stays, retried after 1 s.
        std::fs::remove_file(dir.join("ica-key.pem")).unwrap();
        assert!(
            matches!(reloader.renew(at(2000)), Renewal::Failed(e) if e.contains("ica-key.pem"))
        );
        assert_eq!(serial(), second);
        assert_eq!(c.certificate_renewals_failed.load(Relaxed), 1);
        assert_eq!(reloader.next_renewal(), Some(at(3000)));
        assert_eq!(reloader.renew(at(2500)), Renewal::NotDue);
        let dump = reloader.dump();
        let last_error = dump["certificate_renewal"]["last_error"]
            .as_str()
            .unwrap_or("");
        assert!(last_error.contains("ica-key.pem"), "{dump}");
        assert_eq!(dump["certificate_renewal"]["failed"], 1, "{dump}");
        assert!(matches!(reloader.renew(at(3000)), Renewal::Failed(_)));
        assert_eq!(c.certificate_renewals_failed.load(Relaxed), 2);
        assert_eq!(reloader.next_renewal(), Some(at(5000)));

        // The key is back: the next attempt renews.
        std::fs::write(dir.join("ica-key.pem"), &ica.key_pem).unwrap();
        assert_eq!(reloader.renew(at(5000)), Renewal::Renewed(1));
        assert_ne!(serial(), second);
        assert_eq!(reloader.next_renewal(), Some(at(6000)));
        assert!(reloader.dump()["certificate_renewal"]["last_error"].is_null());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn node_settings_that_shape_threads_and_sockets_wait_for_a_restart() {
        let running = load(
            "version: 1\nnode: {name: n, reactors: 2, root_namespace: istio-system}\nworkloads: []\n",
        )
        .unwrap();
        let next = load(
            "version: 1\nnode: {name: n, reactors: 4, root_namespace: mesh-root, ports: {outbound: 16001}}\n\
             workloads: [{name: w, namespace: ns, ips: [10.0.0.1], node: n}]\n",
        )
        .unwrap();
        let (merged, pending) = keep_running_node_settings(&running, next);
        assert_eq!(pending, ["node.ports", "node.reactors"]);
        assert_eq!(merged.node.reactors, Some(2));
        assert_eq!(merged.node.ports.outbound, 15001);
        // Policy scope and the mesh itself are taken.
        assert_eq!(merged.node.root_namespace, "mesh-root");
        assert_eq!(merged.workloads.len(), 1);

        let same = keep_running_node_settings(&running, running.clone());
        assert_eq!(same.1, Vec::<String>::new());
        assert_eq!(same.0, running);
    }

    #[test]
    fn certificate_paths_reload_but_turning_tunnels_on_waits() {
        let without = load("version: 1\nnode: {name: n}\n").unwrap();
        let with = load(
            "version: 1\nnode: {name: n, tls: {trust_bundle: /c/ca.pem, certificate_dir: /c}}\n",
        )
        .unwrap();
        let (merged, pending) = keep_running_node_settings(&without, with.clone());
        assert!(merged.node.tls.is_none());
        assert_eq!(pending, ["node.tls"]);
        let moved = load(
            "version: 1\nnode: {name: n, tls: {trust_bundle: /d/ca.pem, certificate_dir: /d}}\n",
        )
        .unwrap();
        let (merged, pending) = keep_running_node_settings(&with, moved);
        assert_eq!(
            merged.node.tls.unwrap().certificate_dir,
            Some(PathBuf::from("/d"))
        );
        assert!(pending.is_empty());
    }
}
