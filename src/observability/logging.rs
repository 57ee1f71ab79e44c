//! Process logging: one line per event on stderr, `<time> <LEVEL> <thread> <target>: message`.
//! Level from `--log`, else `RINGTUN_LOG`, else `info`. Kept dependency-light on purpose: the data
//! path never logs per byte, so a simple locked writer is enough.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let thread = std::thread::current();
        let line = format!(
            "{}.{:03} {:5} {} {}: {}\n",
            now.as_secs(),
            now.subsec_millis(),
            record.level(),
            thread.name().unwrap_or("-"),
            record.target(),
            record.args()
        );
        // One write per line so lines from different threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger once; later calls only change the level. Precedence: `level` (the
/// `--log` flag), then `RINGTUN_LOG`, then `default` (per command), then `info`.
pub fn init(level: Option<&str>, default: Option<&str>) {
    let env = std::env::var("RINGTUN_LOG").ok();
    let wanted = level.or(env.as_deref()).or(default).unwrap_or("info");
    let filter = match wanted.to_ascii_lowercase().as_str() {
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        "off" => LevelFilter::Off,
        _ => LevelFilter::Info,
    };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter);
    if !matches!(
        wanted,
        "error" | "warn" | "info" | "debug" | "trace" | "off"
    ) {
        log::warn!("unknown log level {wanted:?}; using info");
    }
}
