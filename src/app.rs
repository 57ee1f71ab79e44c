//! Assembles a node: state snapshot, listeners, one reactor thread per core, the admin,
//! metrics and readiness endpoints; then waits for signals and drains. `ringtun run` and the
//! demo both start the node through [`App::start`].

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::admin::{self, AdminState, Endpoint};
use crate::control_plane::config::{self, Config, DriverChoice};
use crate::control_plane::state::State;
use crate::data_plane::reactor::{Reactor, ReactorControl, ReactorSpec, TunnelCredentials};
use crate::data_plane::{listeners, FDS_PER_FLOW};
use crate::exit_code;
use crate::lifecycle::{self, Received};
use crate::observability::access_log::Observer;
use crate::observability::metrics::{Metrics, ProcessFacts};

/// Descriptors kept back for listeners, the rings, logging and the admin endpoints.
const FD_RESERVE: u64 = 128;

#[derive(Default, Clone)]
pub struct Options {
    pub driver: Option<DriverChoice>,
    pub reactors: Option<usize>,
    pub observer: Option<Observer>,
    /// Bind the admin, metrics and readiness endpoints (off for the in-process demo).
    pub serve_endpoints: bool,
}

pub struct App {
    pub state: Arc<State>,
    pub metrics: Arc<Metrics>,
    controls: Vec<Arc<ReactorControl>>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    admin: Arc<AdminState>,
    servers: Vec<admin::Server>,
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

/// Loads the trust bundle and every local workload's certificate for HBONE tunnels, and
/// probes kTLS once. `None` without `node.tls`: tunnels are off and HBONE routes refused.
fn load_tunnel_credentials(state: &State) -> Result<Option<Arc<TunnelCredentials>>, String> {
    use crate::control_plane::certs::{load_trust_bundle, load_workload_credentials};
    use crate::control_plane::identity::SpiffeId;
    use crate::tls::{server_config_for, ClientTls};
    let node = &state.config.node;
    let Some(tls) = &node.tls else {
        log::info!("no node.tls: HBONE tunnels are off (connections that need one are refused)");
        return Ok(None);
    };
    let trust = load_trust_bundle(&tls.trust_bundle).map_err(|e| format!("node.tls: {e}"))?;
    let mut client = std::collections::HashMap::new();
    let mut server = std::collections::HashMap::new();
    for (_, entry) in state.registry.local_workloads() {
        let id = SpiffeId::parse(&entry.identity)
            .map_err(|e| format!("workload identity {}: {e}", entry.identity))?;
        if client.contains_key(&id) {
            continue;
        }
        let creds = load_workload_credentials(&tls.certificate_dir, &id)
            .map_err(|e| format!("certificate for {id}: {e}"))?;
        let c = ClientTls::new_for(&creds, &trust, node.hbone.cipher)
            .map_err(|e| format!("TLS client for {id}: {e}"))?;
        let s = server_config_for(&creds, &trust, &node.trust_domain, node.hbone.cipher)
            .map_err(|e| format!("TLS server for {id}: {e}"))?;
        client.insert(id.clone(), c);
        server.insert(id, s);
    }
    let ktls = crate::kernel_features::ktls_support();
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
    log::info!(
        "HBONE tunnels: {} local identities, trust bundle {} ({} CA certificates)",
        client.len(),
        tls.trust_bundle.display(),
        trust.len()
    );
    Ok(Some(Arc::new(TunnelCredentials {
        client,
        server,
        ktls,
    })))
}

impl App {
    pub fn start(config: Config, opts: Options) -> Result<App, String> {
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
            crate::data_plane::driver::plan(opts.driver.unwrap_or(config.node.driver))?;
        log::info!(
            "driver: {} ({why})",
            match driver {
                crate::data_plane::driver::DriverPlan::IoUring { .. } => "io_uring",
                _ => "epoll",
            }
        );
        let (soft, hard) = open_files_limit();
        let budget = soft.saturating_sub(FD_RESERVE) / FDS_PER_FLOW / reactors as u64;
        let max_flows = (config.node.limits.max_flows_per_reactor as u64).min(budget.max(1));
        log::info!(
            "open files limit {soft} (hard {hard}); a flow needs up to {FDS_PER_FLOW} descriptors, so each of \
             {reactors} reactors takes at most {max_flows} flows (configured {})",
            config.node.limits.max_flows_per_reactor
        );
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let config_json = serde_json::to_string(&config).unwrap_or_default();
        log::info!("effective config: {config_json}");
        let pin = config.node.pin_reactors;
        let state = State::new(config, 1);
        let tunnels = load_tunnel_credentials(&state)?;
        let (per_reactor, problems) = listeners::create_all(&state, reactors, tunnels.is_some());
        for p in &problems {
            log::error!("{p}");
        }
        let metrics = Arc::new(Metrics::new(
            reactors,
            ProcessFacts {
                open_files_soft: soft,
                open_files_hard: hard,
                max_flows_per_reactor: max_flows,
            },
        ));
        let mut controls = Vec::new();
        let mut threads = Vec::new();
        let (tx, rx) = mpsc::channel();
        for (id, listeners) in per_reactor.into_iter().enumerate() {
            let control =
                ReactorControl::new().map_err(|e| format!("reactor {id}: eventfd: {e}"))?;
            controls.push(control.clone());
            let spec = ReactorSpec {
                id,
                state: state.clone(),
                driver: driver.clone(),
                listeners,
                metrics: metrics.reactors[id].clone(),
                control,
                observer: opts.observer.clone(),
                max_flows: max_flows as usize,
                cpu: (pin && reactors <= cpus).then_some(id),
                tunnels: tunnels.clone(),
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
                .map_err(|e| format!("spawning reactor {id}: {e}"))?;
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
        let config_dump = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config": serde_json::from_str::<serde_json::Value>(&config_json).unwrap_or_default(),
            "runtime": {
                "reactors": reactors,
                "drivers": drivers,
                "open_files_limit": {"soft": soft, "hard": hard},
                "max_flows_per_reactor": max_flows,
                "listener_problems": problems,
            }
        })
        .to_string();
        let admin = Arc::new(AdminState::new(metrics.clone(), config_dump));
        let mut app = App {
            state,
            metrics,
            controls,
            threads,
            admin,
            servers: Vec::new(),
            drivers,
            endpoints: Vec::new(),
        };
        if let Some(e) = failure {
            app.stop();
            let _ = app.wait();
            return Err(e);
        }
        if opts.serve_endpoints {
            let node = &app.state.config.node;
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
                        return Err(e.to_string());
                    }
                }
            }
        }
        app.admin.ready.store(true, SeqCst);
        log::info!("ready: {} reactors ({})", reactors, app.drivers.join(", "));
        Ok(app)
    }

    /// Stops accepting and lets flows finish until the drain timeout.
    pub fn drain(&self) {
        self.admin.draining.store(true, SeqCst);
        for c in &self.controls {
            c.drain();
        }
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
        for s in self.servers {
            s.join();
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
    let config = match config::load_file(path) {
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
        },
    ) {
        Ok(a) => a,
        Err(e) => {
            log::error!("cannot start: {e}");
            return exit_code::FAILURE;
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
                log::warn!("SIGHUP ignored: configuration reload is not implemented; restart to apply changes");
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
