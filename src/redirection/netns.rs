//! Sockets made inside a pod's network namespace. A socket belongs to the namespace of the thread
//! that created it and keeps it for life, so ringtun enters a pod's namespace only for the
//! `socket()` call and returns at once: listeners are made this way at start-up, and a pod's
//! outbound sockets on the reactor thread for each connection (as ztunnel's in-pod mode does).

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sys;

/// An open handle on a network namespace. Holding the fd keeps the namespace alive even if
/// its bind-mount is removed, so sockets can still be made while ringtun drains.
#[derive(Debug, Clone)]
pub struct NetNs {
    path: PathBuf,
    fd: Arc<OwnedFd>,
}

/// Bare names live under `/var/run/netns` (where `ip netns add` puts them); paths stay as given.
pub fn netns_path(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new("/var/run/netns").join(name_or_path)
    }
}

thread_local! {
    /// The namespace this thread started in, opened on first use so we can always return to it.
    static HOME: RefCell<Option<OwnedFd>> = const { RefCell::new(None) };
}

/// Opens this thread's way home now, so the descriptor exists from the start (a reactor calls
/// this once; later pod-namespace sockets then cost no new descriptors).
pub fn prepare_thread() -> io::Result<()> {
    HOME.with(|home| -> io::Result<()> {
        let mut home = home.borrow_mut();
        if home.is_none() {
            *home = Some(OwnedFd::from(File::open("/proc/thread-self/ns/net")?));
        }
        Ok(())
    })
}

impl NetNs {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("network namespace {}: {e}", path.display()),
            )
        })?;
        Ok(NetNs {
            path: path.to_path_buf(),
            fd: Arc::new(OwnedFd::from(file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with this thread inside the namespace and returns to the thread's original
    /// namespace before returning, whatever `f` did.
    pub fn enter_for<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        prepare_thread()?;
        sys::netns::enter(self.fd.as_fd()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("entering network namespace {}: {e}", self.path.display()),
            )
        })?;
        let out = f();
        HOME.with(|home| {
            let home = home.borrow();
            let fd = home.as_ref().expect("opened above");
            // Failing to return would leave the reactor making sockets in a pod's namespace:
            // that is unrecoverable for this thread, so it is a fatal error.
            if let Err(e) = sys::netns::enter(fd.as_fd()) {
                panic!(
                    "cannot return to the original network namespace (fd {}): {e}",
                    fd.as_raw_fd()
                );
            }
        });
        Ok(out)
    }
}

/// Runs `f` in `netns` if given, else on the current namespace.
pub fn in_netns<T>(netns: Option<&NetNs>, f: impl FnOnce() -> T) -> io::Result<T> {
    match netns {
        Some(ns) => ns.enter_for(f),
        None => Ok(f()),
    }
}

/// Runs `f` on a short-lived helper thread that enters `netns` first; used at start-up to make a
/// pod's listeners without ever moving the calling thread.
pub fn on_helper_thread<T: Send + 'static>(
    netns: Option<NetNs>,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    std::thread::Builder::new()
        .name("netns-helper".into())
        .spawn(move || match &netns {
            Some(ns) => {
                sys::netns::enter(ns.fd.as_fd()).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("entering network namespace {}: {e}", ns.path.display()),
                    )
                })?;
                Ok(f())
            }
            None => Ok(f()),
        })?
        .join()
        .map_err(|_| io::Error::other("netns helper thread panicked"))?
}
