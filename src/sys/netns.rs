//! Moving the calling thread into a network namespace (`setns(2)`, `CLONE_NEWNET`). A socket
//! belongs to the namespace of the thread that created it, for life; which namespace to enter
//! and how to return is `redirection::netns`'s business.

use std::io;
use std::os::fd::AsFd;

use nix::sched::{setns, CloneFlags};

use super::io_error;

/// Moves the calling thread (only it) into the network namespace `ns` refers to (an open
/// `/proc/…/ns/net` or `/var/run/netns/…`). Needs CAP_SYS_ADMIN.
pub fn enter(ns: impl AsFd) -> io::Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(enter(&f).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    }
}
