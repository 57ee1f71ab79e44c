//! Assembles a node: state snapshot, listeners, one reactor thread per core, the admin,
//! metrics and readiness endpoints; then waits for signals and drains. `ringtun run` and the
//! demo both start the node through [`App::start`].

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::admin::{self, AdminState, Endpoint};
use crate::control_plane::config::{self, Config, DriverChoice, FileError};
use crate::control_plane::state::State;
use crate::data_plane::reactor::{Reactor, ReactorControl, ReactorSpec};
use crate::data_plane::snapshot::{Published, Snapshot};
use crate::data_plane::{listeners, FDS_PER_FLOW};
use crate::exit_code;
use crate::lifecycle::reload::{ConfigFile, Outcome, Reloader, Trigger};
use crate::lifecycle::{self, watch, Received};
use crate::observability::access_log::Observer;
use crate::observability::metrics::{Metrics, ProcessFacts};
use crate::tls::credentials;

/// Descriptors kept back for listeners, the rings, logging and the admin endpoints.
const FD_RESERVE: u64 = 128;

/// What one reactor may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReactorBudget {
    flows: u64,
    pipes: u64,
}

/// Splits the open-files limit `soft` between the reactors: after the reserve and the TLS
/// handshakes (one descriptor each, their own budget), each reactor's share pays first for its
/// pipes (two descriptors each: `splice.pipes_per_reactor`, but at most a quarter of the
/// share), and the rest for flows ([`FDS_PER_FLOW`] each), capped by the configured limit.
/// Pipes are lent to flows only while bytes are in flight, so they are budgeted per reactor,
/// not per flow.
fn reactor_budget(
    soft: u64,
    reactors: usize,
    limits: &config::Limits,
    splice: &config::SpliceSettings,
) -> ReactorBudget {
    let reactors = reactors.max(1) as u64;
    let handshake_fds = limits.max_handshakes_per_reactor as u64 * reactors;
    let share = soft.saturating_sub(FD_RESERVE + handshake_fds) / reactors;
    let pipes = (splice.pipes_per_reactor as u64).min(share / 8);
    let flows = share.saturating_sub(2 * pipes) / FDS_PER_FLOW;
    ReactorBudget {
        flows: (limits.max_flows_per_reactor as u64).min(flows.max(1)),
        pipes,
    }
}

#[derive(Default, Clone)]
pub struct Options {
    pub driver: Option<DriverChoice>,
    pub reactors: Option<usize>,
    pub observer: Option<Observer>,
    /// Bind the admin, metrics and readiness endpoints (off for the in-process demo).
    pub serve_endpoints: bool,
    /// The file the configuration came from: SIGHUP and changes of the file reload it. `None`
    /// (the demo, tests that start a node in process): the configuration is fixed.
    pub config_file: Option<ConfigFile>,
}

pub struct App {
    /// The node snapshot the reactors run on (state, tunnel credentials).
    pub published: Arc<Published>,
    pub metrics: Arc<Metrics>,
    controls: Vec<Arc<ReactorControl>>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    admin: Arc<AdminState>,
    servers: Vec<admin::Server>,
    reloader: Option<Arc<Reloader>>,
    watcher: Option<JoinHandle<()>>,
    watcher_stop: Arc<AtomicBool>,
    /// Drivers the reactors run, in reactor order.
    pub drivers: Vec<&'static str>,
    pub endpoints: Vec<(Endpoint, SocketAddr)>,
}

/// The open-file limit: raised to the hard limit when allowed, then reported.
fn open_files_limit() -> (u64, u64) {
    use crate::sys::process::{open_files_limit, set_open_files_limit};
    match open_files_limit() {
        Ok((soft, hard)) => {
            if soft < hard && set_open_files_limit(hard, hard).is_ok() {
                return (hard, hard);
            }
            (soft, hard)
        }
        Err(_) => (1024, 1024),
    }
}

/// Why a node did not start, and the exit code that says so.
#[derive(Debug)]
pub struct StartError {
    /// [`exit_code::CONFIG`] for files the config names that cannot be used,
    /// [`exit_code::NOPERM`] when only a missing privilege stopped it, else
    /// [`exit_code::FAILURE`].
    pub code: i32,
    pub message: String,
}

impl StartError {
    fn failure(message: impl Into<String>) -> Self {
        StartError {
            code: exit_code::FAILURE,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<StartError> for String {
    fn from(e: StartError) -> String {
        e.message
    }
}

/// Everything `run` would refuse about the files a valid config names (the trust bundle, the
/// certificate directory, each local workload's certificate and key), each as one line. What
/// `check-config` reports beyond the file itself; `run` exits 64 for the same.
pub fn check_files(config: &Config) -> Vec<String> {
    credentials::check_files(&State::new(config.clone(), 0))
}

/// The local certificates `run` would load but not present now (expired, not valid yet), each
/// as one line: `check-config` warns, `run` starts and logs the same.
pub fn certificate_warnings(config: &Config) -> Vec<String> {
    credentials::check_validity(&State::new(config.clone(), 0), SystemTime::now())
}

/// `/certificates`: every local certificate the snapshot presents, with its state at `now`.
fn certificates_json(snapshot: &Snapshot, now: SystemTime) -> String {
    let listing = snapshot
        .credentials
        .as_ref()
        .map(|c| c.listing())
        .unwrap_or_default();
    let certificates: Vec<serde_json::Value> = listing
        .iter()
        .map(|info| {
            let mut v = serde_json::to_value(info).unwrap_or_default();
            let state = match info.usable_at(now) {
                Ok(()) => "valid".to_string(),
                Err(why) => why.to_string(),
            };
            v["state"] = serde_json::Value::String(state);
            v
        })
        .collect();
    serde_json::json!({ "certificates": certificates }).to_string()
}

/// Probes kTLS once (every snapshot's credentials carry the answer) and says what tunnels will
/// use.
fn probe_ktls(
    node: &crate::control_plane::config::NodeConfig,
) -> crate::kernel_features::KtlsSupport {
    let ktls = crate::kernel_features::ktls_support();
    if node.tls.is_none() {
        log::info!("no node.tls: HBONE tunnels are off (connections that need one are refused)");
        return ktls;
    }
    match (&node.hbone.ktls, &ktls.reason) {
        (crate::control_plane::config::KtlsChoice::Off, _) => {
            log::info!("HBONE tunnels: user-space TLS (node.hbone.ktls: off)")
        }
        (_, None) => log::info!(
            "HBONE tunnels: kTLS available (TX {:?}, RX {:?}); tunnels with those ciphers run in the kernel",
            ktls.ciphers,
            ktls.rx_ciphers
        ),
        (_, Some(why)) => log::info!("HBONE tunnels: user-space TLS ({why})"),
    }
    ktls
}

/// What the listener problems mean: in host mode, or when no local workload is served at all,
/// the node does not start (77 when only a missing privilege stopped it); in pod mode the
/// other pods are served and the failed ones listed (readiness names them).
fn judge_listeners(
    problems: &[listeners::ListenerProblem],
    local_workloads: usize,
) -> Result<Vec<String>, StartError> {
    if problems.is_empty() {
        return Ok(Vec::new());
    }
    let mut failed: Vec<&str> = problems.iter().map(|p| p.workload.as_str()).collect();
    failed.sort_unstable();
    failed.dedup();
    let fatal = problems.iter().any(|p| !p.pod) || failed.len() >= local_workloads;
    if !fatal {
        return Ok(problems.iter().map(ToString::to_string).collect());
    }
    let code = if problems.iter().all(|p| p.not_permitted) {
        exit_code::NOPERM
    } else {
        exit_code::FAILURE
    };
    let why = if failed.len() >= local_workloads {
        "no local workload can be served"
    } else {
        "a host-mode listener cannot be opened"
    };
    let hint = if code == exit_code::NOPERM {
        " (ringtun needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    } else {
        ""
    };
    let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
    Err(StartError {
        code,
        message: format!("{why}{hint}: {}", list.join("; ")),
    })
}

impl App {
    pub fn start(config: Config, opts: Options) -> Result<App, StartError> {
        let reactors = opts
            .reactors
            .or(config.node.reactors)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .max(1);
        let (driver, why) =
            crate::data_plane::driver::plan(opts.driver.unwrap_or(config.node.driver))
                .map_err(StartError::failure)?;
        log::info!(
            "driver: {} ({why})",
            match driver {
                crate::data_plane::driver::DriverPlan::IoUring { .. } => "io_uring",
                _ => "epoll",
            }
        );
        let (soft, hard) = open_files_limit();
        let budget = reactor_budget(soft, reactors, &config.node.limits, &config.node.splice);
        let max_flows = budget.flows;
        log::info!(
            "open files limit {soft} (hard {hard}); each of {reactors} reactors has {} pipes \
             (2 descriptors each, configured {}), {} handshakes (1 each) and at most {max_flows} \
             flows ({FDS_PER_FLOW} each, configured {})",
            budget.pipes,
            config.node.splice.pipes_per_reactor,
            config.node.limits.max_handshakes_per_reactor,
            config.node.limits.max_flows_per_reactor
        );
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let config_json = serde_json::to_string(&config).unwrap_or_default();
        log::info!("effective config: {config_json}");
        let pin = config.node.pin_reactors;
        let ktls = probe_ktls(&config.node);
        let state = State::new(config, 1);
        let mut node_ca = None;
        let tunnels =
            credentials::load(&state, &ktls, &mut node_ca, SystemTime::now()).map_err(|e| {
                StartError {
                    code: exit_code::CONFIG,
                    message: e.to_string(),
                }
            })?;
        if node_ca.is_some() && opts.config_file.is_none() {
            log::warn!(
                "node CA mode without a configuration file to reload: certificates are issued \
                 once and not renewed"
            );
        }
        let (per_reactor, problems) = listeners::create_all(&state, reactors, tunnels.is_some(), 1);
        let not_served = judge_listeners(&problems, state.registry.local_workloads().count())?;
        let published = Published::new(Snapshot {
            serial: 1,
            state,
            credentials: tunnels.map(Arc::new),
        });
        for p in &not_served {
            log::error!("{p}; this workload is not served, the others are");
        }
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let metrics = Arc::new(Metrics::new(
            reactors,
            ProcessFacts {
                open_files_soft: soft,
                open_files_hard: hard,
                max_flows_per_reactor: max_flows,
                pipes_per_reactor: budget.pipes,
            },
        ));
        let controls = ReactorControl::group(reactors)
            .map_err(|e| StartError::failure(format!("reactor eventfds: {e}")))?;
        let mut threads = Vec::new();
        let (tx, rx) = mpsc::channel();
        for (id, listeners) in per_reactor.into_iter().enumerate() {
            let control = Arc::clone(&controls[id]);
            let spec = ReactorSpec {
                id,
                published: Arc::clone(&published),
                driver: driver.clone(),
                listeners,
                metrics: metrics.reactors[id].clone(),
                control,
                observer: opts.observer.clone(),
                max_flows: max_flows as usize,
                pipes: budget.pipes as usize,
                cpu: (pin && reactors <= cpus).then_some(id),
            };
            let tx = tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("reactor-{id}"))
                .spawn(move || match Reactor::new(spec) {
                    Ok(r) => {
                        let _ = tx.send(Ok(r.driver_name()));
                        r.run()
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("reactor {id}: {e}")));
                        Err(e)
                    }
                })
                .map_err(|e| StartError::failure(format!("spawning reactor {id}: {e}")))?;
            threads.push(handle);
        }
        drop(tx);
        let mut drivers = Vec::new();
        let mut failure = None;
        for _ in 0..reactors {
            match rx.recv() {
                Ok(Ok(d)) => drivers.push(d),
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some("a reactor exited during start-up".into()),
            }
        }
        let reloader = opts.config_file.map(|file| {
            Arc::new(Reloader::new(
                file,
                Arc::clone(&published),
                controls.clone(),
                Arc::clone(&metrics),
                ktls,
                node_ca,
            ))
        });
        let runtime = serde_json::json!({
            "reactors": reactors,
            "drivers": drivers,
            "open_files_limit": {"soft": soft, "hard": hard},
            "max_flows_per_reactor": max_flows,
            "pipes_per_reactor": budget.pipes,
            "listener_problems": problems,
        });
        let config_dump = {
            let published = Arc::clone(&published);
            let reloader = reloader.clone();
            Box::new(move || {
                let state = published.load().state.clone();
                serde_json::json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "generation": state.generation,
                    "config": serde_json::to_value(&*state.config).unwrap_or_default(),
                    "reload": reloader.as_ref().map(|r| r.dump()),
                    "runtime": runtime,
                })
                .to_string()
            })
        };
        let mut admin = AdminState::new(metrics.clone(), config_dump);
        admin.certificates = {
            let published = Arc::clone(&published);
            Box::new(move || certificates_json(&published.load(), SystemTime::now()))
        };
        let admin = Arc::new(admin);
        *admin.not_served.lock().unwrap_or_else(|p| p.into_inner()) = not_served;
        let watcher_stop = Arc::new(AtomicBool::new(false));
        let mut app = App {
            published,
            metrics,
            controls,
            threads,
            admin,
            servers: Vec::new(),
            reloader,
            watcher: None,
            watcher_stop,
            drivers,
            endpoints: Vec::new(),
        };
        if let Some(e) = failure {
            app.stop();
            let _ = app.wait();
            return Err(StartError::failure(e));
        }
        if opts.serve_endpoints {
            let state = app.state();
            let node = &state.config.node;
            let wanted = [
                (Endpoint::Admin, node.admin_addr),
                (Endpoint::Metrics, node.metrics_addr),
                (Endpoint::Readiness, node.readiness_addr),
            ];
            for (endpoint, addr) in wanted {
                let Some(addr) = addr else { continue };
                match admin::serve(endpoint, addr, app.admin.clone()) {
                    Ok(s) => {
                        app.endpoints.push((endpoint, s.addr));
                        app.servers.push(s);
                    }
                    Err(e) => {
                        app.stop();
                        let _ = app.wait();
                        return Err(StartError::failure(e.to_string()));
                    }
                }
            }
        }
        if let Some(r) = &app.reloader {
            match watch::spawn(Arc::clone(r), Arc::clone(&app.watcher_stop)) {
                Ok(handle) => app.watcher = Some(handle),
                Err(e) => log::warn!(
                    "cannot start the config-watch thread ({e}): changes of {} wait for SIGHUP \
                     and node CA certificates are not renewed",
                    r.path().display()
                ),
            }
        }
        app.admin.ready.store(true, SeqCst);
        log::info!("ready: {} reactors ({})", reactors, app.drivers.join(", "));
        Ok(app)
    }

    /// The node state the reactors run on now.
    pub fn state(&self) -> Arc<State> {
        Arc::clone(&self.published.load().state)
    }

    /// The serial of the snapshot each reactor runs on, in reactor order.
    pub fn adopted_snapshots(&self) -> Vec<u64> {
        self.controls.iter().map(|c| c.adopted()).collect()
    }

    /// Reloads the configuration file (`None` when the node has none to reload).
    pub fn reload(&self) -> Option<Outcome> {
        Some(self.reloader.as_ref()?.reload(Trigger::Signal))
    }

    /// Stops accepting and lets flows finish until the drain timeout.
    pub fn drain(&self) {
        if let Some(r) = &self.reloader {
            r.stop();
        }
        // Reactors first, readiness after: a client that saw 503 must find every reactor
        // already refusing (see the reactor's loop).
        for c in &self.controls {
            c.drain();
        }
        self.admin.draining.store(true, SeqCst);
    }

    /// Resets every flow and stops now.
    pub fn stop(&self) {
        self.admin.draining.store(true, SeqCst);
        for c in &self.controls {
            c.stop();
        }
    }

    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Waits for the reactors, then stops the endpoints. Err lists reactors that failed.
    pub fn wait(self) -> Result<(), String> {
        let mut errors = Vec::new();
        for (i, t) in self.threads.into_iter().enumerate() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("reactor {i}: {e}")),
                Err(_) => errors.push(format!("reactor {i} panicked")),
            }
        }
        self.admin.stop.store(true, SeqCst);
        self.watcher_stop.store(true, SeqCst);
        for s in self.servers {
            s.join();
        }
        if let Some(w) = self.watcher {
            let _ = w.join();
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// `ringtun run`: load, start, wait for SIGTERM, drain, exit 0.
pub fn run_from_file(path: &Path, driver: Option<DriverChoice>, reactors: Option<usize>) -> i32 {
    let loaded = std::fs::read(path)
        .map_err(|source| FileError::Unreadable {
            path: path.to_path_buf(),
            source,
        })
        .and_then(|bytes| {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let (config, warnings) = config::check_file_text(path, &text)?;
            for w in warnings {
                log::warn!("{w}");
            }
            Ok((config, ConfigFile::new(path, &bytes)))
        });
    let (config, file) = match loaded {
        Ok(c) => c,
        Err(e) => {
            let lines = e.lines();
            for line in &lines {
                eprintln!("{line}");
            }
            eprintln!("{}: {} error(s); not starting", path.display(), lines.len());
            return exit_code::CONFIG;
        }
    };
    let problems = check_files(&config);
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{}: {p}", path.display());
        }
        eprintln!(
            "{}: {} problem(s) with the files it names; not starting",
            path.display(),
            problems.len()
        );
        return exit_code::CONFIG;
    }
    if let Err(e) = lifecycle::block_signals() {
        log::error!("cannot block signals: {e}");
        return exit_code::FAILURE;
    }
    let drain_timeout = config.node.timeouts.drain;
    let app = match App::start(
        config,
        Options {
            driver,
            reactors,
            observer: None,
            serve_endpoints: true,
            config_file: Some(file),
        },
    ) {
        Ok(a) => a,
        Err(e) => {
            log::error!("cannot start: {e}");
            return e.code;
        }
    };
    let mut drain_started: Option<Instant> = None;
    loop {
        if app.is_finished() {
            break;
        }
        match lifecycle::wait_signal(Duration::from_secs(1)) {
            Some(Received::Terminate) if drain_started.is_none() => {
                log::info!(
                    "signal received: draining (up to {:?}); send again to stop at once",
                    drain_timeout
                );
                drain_started = Some(Instant::now());
                app.drain();
            }
            Some(Received::Terminate) => {
                log::warn!("second signal: stopping now");
                app.stop();
            }
            Some(Received::Hangup) => {
                log::info!("SIGHUP: reloading {}", path.display());
                app.reload();
            }
            None => {}
        }
        // Reactors enforce the deadline themselves; this is the backstop if one is stuck.
        if let Some(t) = drain_started {
            if t.elapsed() > drain_timeout + Duration::from_secs(5) {
                log::error!("reactors did not finish draining in time; stopping");
                app.stop();
            }
        }
    }
    match app.wait() {
        Ok(()) => {
            log::info!("stopped");
            exit_code::OK
        }
        Err(e) => {
            log::error!("{e}");
            exit_code::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_handshakes_and_flows_fit_in_the_open_files_limit() {
        let limits = config::Limits {
            max_flows_per_reactor: 16384,
            max_handshakes_per_reactor: 256,
            max_handshakes_per_source: 16,
            max_tunnels_per_peer: 256,
            flow_receive_buffer: 128 * 1024,
        };
        let splice = config::SpliceSettings {
            pipe_size: 1 << 18,
            max_bytes_per_wakeup: 1 << 20,
            pipe_pool_size: 64,
            pipes_per_reactor: 256,
        };
        // 20,000 descriptors, 2 reactors: 128 reserved, 512 for handshakes; each reactor's
        // 9,680 pay for 256 pipes (512) and 4,584 flows of 2: 9,168 flows on the node.
        let b = reactor_budget(20_000, 2, &limits, &splice);
        assert_eq!(
            b,
            ReactorBudget {
                flows: 4584,
                pipes: 256
            }
        );
        assert!(2 * (b.flows * FDS_PER_FLOW + 2 * b.pipes + 256) + FD_RESERVE <= 20_000);
        // A generous limit leaves the configured one.
        assert_eq!(reactor_budget(1 << 20, 2, &limits, &splice).flows, 16384);
        // A small one keeps pipes to a quarter of the share, and each reactor a flow.
        let small = reactor_budget(
            1024,
            2,
            &config::Limits {
                max_handshakes_per_reactor: 16,
                ..limits
            },
            &splice,
        );
        assert_eq!(small.pipes, (1024 - 128 - 32) / 2 / 8);
        assert_eq!(
            reactor_budget(100, 2, &limits, &splice),
            ReactorBudget { flows: 1, pipes: 0 }
        );
    }
}
