//! Watching directories for changed files (`inotify(7)`), for configuration and certificate
//! reloads. Directories rather than files: editors and Kubernetes replace a file (write a new
//! one, rename it over the old, or swap a `..data` symlink) and a watch on the old file would
//! see it deleted and nothing after.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::io_error;

/// A set of watched directories.
pub struct DirWatcher {
    inotify: Inotify,
    dirs: HashMap<PathBuf, WatchDescriptor>,
    names: HashMap<WatchDescriptor, PathBuf>,
}

/// One change: the directory and the name in it that changed (`None`: the directory itself,
/// or the kernel's queue overflowed and anything may have changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub dir: Option<PathBuf>,
    pub name: Option<OsString>,
}

impl DirWatcher {
    pub fn new() -> io::Result<DirWatcher> {
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(io_error)?;
        Ok(DirWatcher {
            inotify,
            dirs: HashMap::new(),
            names: HashMap::new(),
        })
    }

    /// Watches exactly `dirs` from now on (adding and removing watches as needed).
    pub fn watch_exactly(&mut self, dirs: &[PathBuf]) -> io::Result<()> {
        let gone: Vec<PathBuf> = self
            .dirs
            .keys()
            .filter(|d| !dirs.contains(d))
            .cloned()
            .collect();
        for d in gone {
            if let Some(wd) = self.dirs.remove(&d) {
                self.names.remove(&wd);
                // The directory may be gone already (its watch with it).
                let _ = self.inotify.rm_watch(wd);
            }
        }
        for d in dirs {
            if !self.dirs.contains_key(d) {
                self.watch(d)?;
            }
        }
        Ok(())
    }

    fn watch(&mut self, dir: &Path) -> io::Result<()> {
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        let wd = self.inotify.add_watch(dir, flags).map_err(io_error)?;
        self.dirs.insert(dir.to_path_buf(), wd);
        self.names.insert(wd, dir.to_path_buf());
        Ok(())
    }

    /// The directories watched now.
    pub fn watched(&self) -> impl Iterator<Item = &Path> {
        self.dirs.keys().map(PathBuf::as_path)
    }

    /// Waits up to `timeout` for changes; returns those that arrived (empty on timeout).
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Vec<Change>> {
        if !super::socket::wait_readable(self.inotify.as_fd().as_raw_fd(), timeout)? {
            return Ok(Vec::new());
        }
        let events = match self.inotify.read_events() {
            Ok(events) => events,
            Err(nix::errno::Errno::EAGAIN) => return Ok(Vec::new()),
            Err(e) => return Err(io_error(e)),
        };
        let mut changes = Vec::with_capacity(events.len());
        for ev in events {
            if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                // The kernel dropped the watch (the directory went away): watch it again
                // when it comes back.
                if let Some(dir) = self.names.remove(&ev.wd) {
                    self.dirs.remove(&dir);
                }
                continue;
            }
            changes.push(Change {
                dir: self.names.get(&ev.wd).cloned(),
                name: ev.name,
            });
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_replaced_by_rename_is_seen_in_its_directory() {
        let dir = std::env::temp_dir().join(format!("ringtun-inotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = DirWatcher::new().unwrap();
        w.watch_exactly(std::slice::from_ref(&dir)).unwrap();
        assert!(w.wait(Duration::from_millis(10)).unwrap().is_empty());
        std::fs::write(dir.join("node.yaml.tmp"), "x").unwrap();
        std::fs::rename(dir.join("node.yaml.tmp"), dir.join("node.yaml")).unwrap();
        let mut names = Vec::new();
        while let Ok(changes) = w.wait(Duration::from_millis(200)) {
            if changes.is_empty() {
                break;
            }
            names.extend(changes.into_iter().filter_map(|c| c.name));
        }
        assert!(names.iter().any(|n| n == "node.yaml"), "{names:?}");
        w.watch_exactly(&[]).unwrap();
        assert_eq!(w.watched().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
