//! The `config-watch` thread: watches the directories holding the files a node runs from (the
//! configuration file, and the certificate files it names: the trust bundle, each local
//! identity's certificate and key) and asks for a reload when something in them changed.
//! Events are collected until the directory has been quiet for a moment (an editor or `kubectl`
//! writes, renames and swaps symlinks in bursts); the reload itself compares contents, so an
//! unrelated file in the same directory costs one read and changes nothing.
//!
//! The same thread is node CA mode's renewal timer: it wakes when the next issued certificate
//! reaches half its lifetime (or a failed renewal's backoff ends) and calls
//! [`Reloader::renew`]. Control work, never on a reactor. Without inotify (no watch can be
//! made) the thread still runs for renewal; file changes then wait for SIGHUP.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::reload::{Reloader, Trigger};
use crate::sys::inotify::DirWatcher;

/// How quiet the directories must be before a burst of events counts as one change.
const QUIET: Duration = Duration::from_millis(150);
/// A burst never delays the reload longer than this.
const LONGEST_BURST: Duration = Duration::from_secs(2);
/// How often the thread looks at its stop flag and the set of directories.
const TICK: Duration = Duration::from_millis(500);

/// Starts the watcher (and renewal timer); it ends soon after `stop` is set.
pub fn spawn(reloader: Arc<Reloader>, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
    let watcher = DirWatcher::new().and_then(|mut w| {
        // Watching before this returns: a change made right after start is not missed.
        w.watch_exactly(&watched_dirs(&reloader))?;
        Ok(w)
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!(
                "cannot watch {} for changes ({e}); reload with SIGHUP",
                reloader.path().display()
            );
            None
        }
    };
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            // A change between the node reading its files and the watch starting has no
            // event: compare the contents once.
            if watcher.is_some() {
                reloader.reload(Trigger::FileChanged);
            }
            let mut warned: Option<String> = None;
            while !stop.load(SeqCst) {
                let wait = until_renewal(&reloader, SystemTime::now());
                match watcher.as_mut() {
                    Some(w) => watch_once(w, &reloader, wait, &mut warned),
                    None => std::thread::sleep(wait),
                }
                reloader.renew(SystemTime::now());
            }
        })
}

/// How long the thread may wait before node CA mode has something to renew (at most a
/// [`TICK`], so it sees `stop` and new directories soon).
fn until_renewal(reloader: &Reloader, now: SystemTime) -> Duration {
    match reloader.next_renewal() {
        // Not in a loop of tiny waits just before it is due.
        Some(at) => at
            .duration_since(now)
            .map_or(Duration::ZERO, |d| d.max(Duration::from_millis(5)))
            .min(TICK),
        None => TICK,
    }
}

/// Waits up to `wait` for a change in the watched directories and reloads after one.
fn watch_once(
    watcher: &mut DirWatcher,
    reloader: &Reloader,
    wait: Duration,
    warned: &mut Option<String>,
) {
    let dirs = watched_dirs(reloader);
    if let Err(e) = watcher.watch_exactly(&dirs) {
        // A directory that does not exist yet: try again next tick; say it once.
        let msg = format!("cannot watch {dirs:?}: {e}");
        if warned.as_ref() != Some(&msg) {
            log::warn!("config-watch: {msg}; changes are applied on SIGHUP");
            *warned = Some(msg);
        }
    }
    match watcher.wait(wait) {
        Ok(changes) if !changes.is_empty() => {
            settle(watcher);
            reloader.reload(Trigger::FileChanged);
        }
        Ok(_) => {}
        Err(e) => {
            log::warn!("config-watch: {e}");
            std::thread::sleep(TICK);
        }
    }
}

/// The parent directories of the files a reload reads (asked again every tick: a reload that
/// adds a local identity adds its certificate directory).
fn watched_dirs(reloader: &Reloader) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = reloader
        .watched_files()
        .iter()
        .filter_map(|f| f.parent().map(|p| p.to_path_buf()))
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Waits until no event arrived for [`QUIET`] (at most [`LONGEST_BURST`]).
fn settle(watcher: &mut DirWatcher) {
    let start = Instant::now();
    while start.elapsed() < LONGEST_BURST {
        match watcher.wait(QUIET) {
            Ok(changes) if !changes.is_empty() => continue,
            _ => return,
        }
    }
}
