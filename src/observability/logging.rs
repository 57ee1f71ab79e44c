//! Process logging: one line per event on stderr, `<RFC 3339 time> <LEVEL> <thread> <target>:
//! message`, time in UTC to the millisecond (`2026-12-04T20:44:19.123Z`), so lines from
//! several nodes sort and join with other tools' logs. Level from `--log`, else `RINGTUN_LOG`,
//! else `info`. Kept dependency-light on purpose: the data path never logs per byte, so a
//! simple locked writer is enough.
//!
//! What a peer can provoke at will — a failed handshake per connection, a refused accept, an
//! admin connection shed — is logged through [`log_limited!`](crate::log_limited): at most
//! [`BURST`] lines of one kind per [`WINDOW`], then silence, then one line saying how many
//! were suppressed. 2,000 idle connections to port 15008 cost a handful of lines, not 2,000;
//! the counters still count every one.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

/// Lines of one kind logged per window before the rest are suppressed.
pub const BURST: u32 = 5;
/// The rate limiter's window.
pub const WINDOW: Duration = Duration::from_secs(10);

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let thread = std::thread::current();
        let line = format!(
            "{} {:5} {} {}: {}\n",
            rfc3339(SystemTime::now()),
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

/// `time` as RFC 3339 in UTC with milliseconds: `2026-12-04T20:44:19.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// One kind of line's window.
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
    /// A line of this kind was logged at this level and target (for the suppression note).
    level: log::Level,
    target: &'static str,
}

static LIMITER: Mutex<Option<HashMap<&'static str, Window>>> = Mutex::new(None);
static REPORTER: AtomicBool = AtomicBool::new(false);

/// The rate limiter behind [`log_limited!`](crate::log_limited): whether a line of kind `key`
/// may be logged now, and the note to append to it (how many of its kind were suppressed
/// since the last one logged).
pub fn admit(key: &'static str, level: log::Level, target: &'static str) -> Option<String> {
    admit_at(key, level, target, Instant::now())
}

fn admit_at(
    key: &'static str,
    level: log::Level,
    target: &'static str,
    now: Instant,
) -> Option<String> {
    let mut guard = LIMITER.lock().unwrap_or_else(|p| p.into_inner());
    let windows = guard.get_or_insert_with(HashMap::new);
    let w = windows.entry(key).or_insert(Window {
        start: now,
        logged: 0,
        suppressed: 0,
        level,
        target,
    });
    let mut note = String::new();
    if now.duration_since(w.start) >= WINDOW {
        if w.suppressed > 0 {
            note = format!(
                " ({} similar lines suppressed before this one)",
                w.suppressed
            );
        }
        *w = Window {
            start: now,
            logged: 0,
            suppressed: 0,
            level,
            target,
        };
    }
    if w.logged < BURST {
        w.logged += 1;
        return Some(note);
    }
    w.suppressed += 1;
    if w.suppressed == 1 {
        schedule_report();
    }
    None
}

/// A flood that stops must still have its count told: a thread wakes at the end of the
/// window and reports every kind that suppressed lines (one at a time per process).
fn schedule_report() {
    if REPORTER.swap(true, Ordering::SeqCst) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("log-limiter".into())
        .spawn(|| loop {
            std::thread::sleep(WINDOW);
            if !report_suppressed(Instant::now()) {
                REPORTER.store(false, Ordering::SeqCst);
                return;
            }
        });
    if spawned.is_err() {
        REPORTER.store(false, Ordering::SeqCst);
    }
}

/// Logs the suppressed counts of windows that are over and resets them; true while some
/// window still suppresses (the reporter keeps going).
fn report_suppressed(now: Instant) -> bool {
    let mut lines = Vec::new();
    let mut active = false;
    {
        let mut guard = LIMITER.lock().unwrap_or_else(|p| p.into_inner());
        let Some(windows) = guard.as_mut() else {
            return false;
        };
        for (key, w) in windows.iter_mut() {
            if w.suppressed == 0 {
                continue;
            }
            if now.duration_since(w.start) >= WINDOW {
                lines.push((w.level, w.target, *key, w.suppressed));
                w.suppressed = 0;
                w.logged = 0;
                w.start = now;
            } else {
                active = true;
            }
        }
    }
    for (level, target, key, n) in lines {
        log::log!(target: target, level, "{n} more `{key}` lines suppressed in the last {WINDOW:?}");
    }
    active
}

/// Logs like `log::log!`, at most [`BURST`](crate::observability::logging::BURST) lines of
/// kind `key` per window; see the module docs.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $key:expr, $($arg:tt)+) => {{
        let level: log::Level = $level;
        if level <= log::max_level() {
            if let Some(note) =
                $crate::observability::logging::admit($key, level, module_path!())
            {
                log::log!(level, "{}{}", format_args!($($arg)+), note);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_796_416_259_123);
        assert_eq!(rfc3339(t), "2026-12-04T20:30:59.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // A leap day.
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    /// One test for the limiter: its state is process-wide, and parallel tests would reset
    /// each other's windows.
    #[test]
    fn a_flood_of_one_kind_is_cut_to_a_burst_then_counted() {
        let start = Instant::now();
        let key = "test-flood";
        let level = log::Level::Warn;
        let admitted = (0..2000)
            .filter(|_| admit_at(key, level, "t", start).is_some())
            .count();
        assert_eq!(admitted, BURST as usize);
        // Another kind is not affected.
        assert_eq!(
            admit_at("test-other", level, "t", start),
            Some(String::new())
        );
        // The next window's first line carries the count.
        let later = start + WINDOW;
        assert_eq!(
            admit_at(key, level, "t", later).as_deref(),
            Some(" (1995 similar lines suppressed before this one)")
        );
        assert_eq!(admit_at(key, level, "t", later), Some(String::new()));

        // A flood that stops: its count is reported when its window ends.
        let key = "test-report";
        for _ in 0..(BURST + 3) {
            let _ = admit_at(key, level, "t", later);
        }
        let suppressed = |k| LIMITER.lock().unwrap().as_ref().unwrap()[k].suppressed;
        assert_eq!(suppressed(key), 3);
        assert!(report_suppressed(later), "window still open");
        assert_eq!(suppressed(key), 3);
        report_suppressed(later + WINDOW);
        assert_eq!(suppressed(key), 0, "the count was reported and reset");
    }
}
