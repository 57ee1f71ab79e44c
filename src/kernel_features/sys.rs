//! Small system helpers shared by the probes: errno naming, raw socket options, loopback
//! socket pairs, pipes, `/proc` readers and the process identity (uname, rlimit, capabilities).
//! Every resource is returned as an owned value (`OwnedFd`, `TcpStream`, ...) so a probe that
//! returns early still closes it: `probe()` must leave the fd table exactly as it found it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;

/// How long a probe waits for loopback data or a completion before calling the feature absent.
/// Loopback is synchronous in practice; the bound only exists so that a probe can never hang.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `EINVAL`, `ENOENT`… followed by the C library's text, the form operators search for.
pub(crate) fn errno_text(errno: Errno) -> String {
    format!("{errno}")
}

/// The errno behind an `io::Error`, or `EIO` when the error did not come from a syscall.
pub(crate) fn io_errno(err: &std::io::Error) -> Errno {
    Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO))
}

/// `setsockopt` with an arbitrary byte payload (kTLS crypto_info, ULP names, ints).
pub(crate) fn setsockopt_bytes(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> Result<(), Errno> {
    let len = libc::socklen_t::try_from(value.len()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `value` is a live, initialised buffer of exactly `len` bytes for the duration of
    // the call and the kernel only reads from it; a bad fd or option yields an errno, not UB.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast::<libc::c_void>(),
            len,
        )
    };
    Errno::result(rc).map(drop)
}

/// TLS record content types (RFC 8446 §5.1) the probes send and expect.
pub(crate) const TLS_CONTENT_HANDSHAKE: u8 = 22;
pub(crate) const TLS_CONTENT_APPLICATION_DATA: u8 = 23;

/// An `io::Error` from `crate::sys` as the errno this module's callers report.
fn errno_of(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Sends `payload` as one TLS record of content type `record_type` on a kTLS (`TLS_TX`)
/// socket: the kernel encrypts it under the socket's current key.
pub(crate) fn send_tls_record(
    fd: &impl AsRawFd,
    record_type: u8,
    payload: &[u8],
) -> Result<usize, Errno> {
    crate::sys::tls::send_record(fd.as_raw_fd(), record_type, payload).map_err(errno_of)
}

/// Receives one record's plaintext from a kTLS (`TLS_RX`) socket into `buf`: its content type
/// and length. A control buffer is passed, so a non-data record arrives with its type instead
/// of failing with EIO.
pub(crate) fn recv_tls_record(fd: &impl AsRawFd, buf: &mut [u8]) -> Result<(u8, usize), Errno> {
    crate::sys::tls::recv_record(fd.as_raw_fd(), buf, 0)
        .map(|r| (r.record_type, r.len))
        .map_err(errno_of)
}

/// A connected loopback TCP pair: `(client, server)`. Tries IPv4 unless `v6` is asked for.
pub(crate) fn loopback_pair(v6: bool) -> Result<(TcpStream, TcpStream), Errno> {
    let addr: SocketAddr = if v6 {
        (Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::LOCALHOST, 0).into()
    };
    let listener = TcpListener::bind(addr).map_err(|e| io_errno(&e))?;
    let local = listener.local_addr().map_err(|e| io_errno(&e))?;
    let client = TcpStream::connect_timeout(&local, PROBE_TIMEOUT).map_err(|e| io_errno(&e))?;
    // The connection normally sits in the accept queue already; the bounded wait only guards
    // against a host whose firewall eats loopback SYN-ACKs. Accepted sockets do not inherit
    // O_NONBLOCK on Linux, so `server` is an ordinary blocking stream.
    listener.set_nonblocking(true).map_err(|e| io_errno(&e))?;
    if !wait_readable(&listener, PROBE_TIMEOUT)? {
        return Err(Errno::ETIMEDOUT);
    }
    let (server, _) = listener.accept().map_err(|e| io_errno(&e))?;
    for s in [&client, &server] {
        // A probe that reads must never wait forever.
        s.set_read_timeout(Some(PROBE_TIMEOUT))
            .map_err(|e| io_errno(&e))?;
        s.set_write_timeout(Some(PROBE_TIMEOUT))
            .map_err(|e| io_errno(&e))?;
    }
    Ok((client, server))
}

/// A non-blocking, close-on-exec pipe: `(read end, write end)`.
pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
}

/// Waits until `fd` is readable or [`PROBE_TIMEOUT`] passes; `Ok(false)` on timeout.
pub(crate) fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> Result<bool, Errno> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `pfd` is one valid, writable pollfd and nfds is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        match Errno::result(rc) {
            Ok(n) => return Ok(n > 0),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A `/proc` or `/sys` file trimmed, or `None` when it does not exist or cannot be read.
pub(crate) fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A numeric sysctl such as `/proc/sys/fs/pipe-max-size`.
pub(crate) fn read_u64(path: &str) -> Option<u64> {
    read_trimmed(path)?.parse().ok()
}

/// The `release` field of uname(2): what `uname -r` prints.
pub(crate) fn kernel_release() -> String {
    // SAFETY: an all-zero `utsname` is a valid value (arrays of c_char).
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname; uname only writes into it.
    let rc = unsafe { libc::uname(&mut uts) };
    if rc != 0 {
        // uname cannot fail with a valid pointer; procfs is the fallback all the same.
        return read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Soft and hard RLIMIT_NOFILE. `u64::MAX` is RLIM_INFINITY.
pub(crate) fn nofile_limit() -> Option<(u64, u64)> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()
}

/// A `Key:\tvalue` line of `/proc/self/status`.
pub(crate) fn proc_status_field(key: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then(|| v.trim().to_owned())
    })
}

/// The effective capability mask (`CapEff`), if /proc tells.
pub(crate) fn effective_caps() -> Option<u64> {
    u64::from_str_radix(&proc_status_field("CapEff")?, 16).ok()
}

/// `CAP_NET_ADMIN` from linux/capability.h.
pub(crate) const CAP_NET_ADMIN: u32 = 12;
/// `CAP_SYS_RESOURCE` from linux/capability.h.
pub(crate) const CAP_SYS_RESOURCE: u32 = 24;

/// Whether the process holds capability `cap` in its effective set (false if unknown).
pub(crate) fn has_cap(cap: u32) -> bool {
    effective_caps().is_some_and(|mask| mask & (1u64 << cap) != 0)
}

/// True when a seccomp filter is installed (`Seccomp: 2`); such filters are the usual reason a
/// container sees EPERM or ENOSYS from io_uring_setup on a kernel that has it.
pub(crate) fn seccomp_filtered() -> bool {
    proc_status_field("Seccomp").as_deref() == Some("2")
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn loopback_pair_carries_bytes_both_ways() {
        let (mut a, mut b) = loopback_pair(false).expect("loopback pair");
        a.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ping");
        b.write_all(b"pong").expect("write back");
        a.read_exact(&mut buf).expect("read back");
        assert_eq!(&buf, b"pong");
    }

    #[test]
    fn kernel_release_matches_procfs() {
        assert_eq!(
            Some(kernel_release()),
            read_trimmed("/proc/sys/kernel/osrelease")
        );
    }
}
