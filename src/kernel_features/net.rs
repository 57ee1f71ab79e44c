//! Socket and pipe probes for the data path and redirection: inline `splice(2)`, IP_TRANSPARENT
//! and the TPROXY target, SO_ORIGINAL_DST (v4 and v6), SO_REUSEPORT, pipe sizing and SO_MARK.
//! Each one tries the real operation on loopback sockets or fresh pipes and classifies the
//! errno; ENOPROTOOPT/EOPNOTSUPP mean "the kernel lacks it", EPERM "this process may not".

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

use super::report::{Availability, OriginalDstReport, TproxyReport, TproxyTarget};
use super::sys::{self, errno_text, io_errno, PROBE_TIMEOUT};

/// The mark DESIGN.md §1 puts on every proxy socket.
const PROXY_MARK: u32 = 0x539;
/// The pipe size the splice path asks for.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// `IP6T_SO_ORIGINAL_DST` from linux/netfilter_ipv6/ip6_tables.h.
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

fn permission_hint(errno: Errno, cap: &str) -> String {
    match errno {
        Errno::EPERM | Errno::EACCES => format!("{} (needs {cap})", errno_text(errno)),
        Errno::ENOPROTOOPT | Errno::EOPNOTSUPP => {
            format!("{}: the kernel lacks this option", errno_text(errno))
        }
        other => errno_text(other),
    }
}

fn tcp_socket() -> Result<OwnedFd, Errno> {
    socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Moves a few bytes a → (socket) → pipe → (socket) → a's peer and back, the way the fast path
/// does: non-blocking sockets, SPLICE_F_NONBLOCK | SPLICE_F_MOVE.
pub(crate) fn probe_splice() -> Availability {
    match splice_round_trip() {
        Ok(()) => Availability::yes(),
        Err(why) => Availability::no(why),
    }
}

fn splice_round_trip() -> Result<(), String> {
    const DATA: &[u8] = b"ringtun splice probe";
    let (mut client, server) =
        sys::loopback_pair(false).map_err(|e| format!("loopback TCP pair: {}", errno_text(e)))?;
    let (pipe_r, pipe_w) = sys::pipe().map_err(|e| format!("pipe: {}", errno_text(e)))?;
    server
        .set_nonblocking(true)
        .map_err(|e| format!("O_NONBLOCK: {}", errno_text(io_errno(&e))))?;
    client.write_all(DATA).map_err(|e| format!("write: {e}"))?;
    if !sys::wait_readable(&server, PROBE_TIMEOUT).map_err(errno_text)? {
        return Err("loopback data did not arrive".into());
    }
    let into_pipe = splice(&server, &pipe_w, DATA.len())
        .map_err(|e| format!("splice socket -> pipe: {}", splice_reason(e)))?;
    let out_of_pipe = splice(&pipe_r, &server, into_pipe)
        .map_err(|e| format!("splice pipe -> socket: {}", splice_reason(e)))?;
    if out_of_pipe != into_pipe {
        return Err(format!(
            "pipe -> socket moved {out_of_pipe} of {into_pipe} bytes"
        ));
    }
    if !sys::wait_readable(&client, PROBE_TIMEOUT).map_err(errno_text)? {
        return Err("spliced bytes did not come back".into());
    }
    let mut back = vec![0u8; into_pipe];
    client
        .read_exact(&mut back)
        .map_err(|e| format!("read back: {e}"))?;
    if back != DATA[..into_pipe] {
        return Err("spliced bytes came back changed".into());
    }
    Ok(())
}

/// One non-blocking splice(2) without offsets, as the data path issues it.
fn splice(from: &impl AsRawFd, to: &impl AsRawFd, len: usize) -> Result<usize, Errno> {
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    // SAFETY: both fds are open for the duration of the call (borrowed from owners) and null
    // offsets are allowed for sockets and pipes; no user memory is involved.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    Errno::result(n).map(|n| n as usize)
}

fn splice_reason(errno: Errno) -> String {
    match errno {
        Errno::EINVAL => format!(
            "{} (socket type or kernel does not support splice)",
            errno_text(errno)
        ),
        Errno::ENOSYS => format!(
            "{} (kernel or seccomp filter lacks splice)",
            errno_text(errno)
        ),
        other => errno_text(other),
    }
}

/// Whether an inbound connection can reach an application in this namespace from the
/// client's address: the check a workload's listeners get (`client_address`), from this
/// namespace's first address that is not loopback or link-local; with none, the route check
/// alone.
pub(crate) fn probe_client_address() -> Availability {
    use crate::data_plane::client_address::{check_return_path, check_route};
    let local = nix::ifaddrs::getifaddrs().ok().and_then(|addrs| {
        addrs
            .filter_map(|a| {
                let sa = a.address?;
                let ip = if let Some(v4) = sa.as_sockaddr_in() {
                    std::net::IpAddr::V4(v4.ip())
                } else {
                    std::net::IpAddr::V6(sa.as_sockaddr_in6()?.ip())
                };
                let link_local = match ip {
                    std::net::IpAddr::V4(v4) => v4.is_link_local(),
                    std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
                };
                (!ip.is_loopback() && !link_local).then_some(ip)
            })
            .min_by_key(|ip| ip.is_ipv6())
    });
    let checked = match local {
        Some(ip) => check_return_path(ip, PROXY_MARK),
        None => check_route(),
    };
    match checked {
        Ok(()) => Availability::yes(),
        Err(e) => Availability::no(e.to_string()),
    }
}

/// IP_TRANSPARENT on a fresh socket plus what the system says about the TPROXY target.
pub(crate) fn probe_tproxy(kernel_release: &str) -> TproxyReport {
    let transparent =
        tcp_socket().and_then(|fd| socket::setsockopt(&fd, sockopt::IpTransparent, &true));
    let (ip_transparent, ip_transparent_reason) = match transparent {
        Ok(()) => (true, None),
        Err(e) => (
            false,
            Some(format!(
                "IP_TRANSPARENT: {}",
                permission_hint(e, "CAP_NET_ADMIN")
            )),
        ),
    };
    let (target, target_evidence) = tproxy_target(kernel_release);
    TproxyReport {
        available: ip_transparent && target != TproxyTarget::Unknown,
        ip_transparent,
        ip_transparent_reason,
        target,
        target_evidence,
    }
}

/// Looks in the places that can tell without running iptables: registered xtables targets,
/// loaded modules, the built-in list and module files of the running kernel.
fn tproxy_target(release: &str) -> (TproxyTarget, String) {
    // Unreadable sources are named in the verdict: /proc/net/ip_tables_targets is root-only,
    // so "unknown" from an unprivileged run is not "absent".
    let mut unreadable = Vec::new();
    for table in [
        "/proc/net/ip_tables_targets",
        "/proc/net/ip6_tables_targets",
    ] {
        match std::fs::read_to_string(table) {
            Ok(t) if t.lines().any(|l| l.trim() == "TPROXY") => {
                return (TproxyTarget::Present, format!("TPROXY listed in {table}"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => unreadable.push(format!("{table} ({})", e.kind())),
        }
    }
    for module in ["xt_TPROXY", "nft_tproxy", "nf_tproxy_ipv4"] {
        let path = format!("/sys/module/{module}");
        if Path::new(&path).exists() {
            return (TproxyTarget::Present, format!("{path} exists"));
        }
    }
    let modules = format!("/lib/modules/{release}");
    if let Some(builtin) = sys::read_trimmed(&format!("{modules}/modules.builtin")) {
        if builtin
            .lines()
            .any(|l| l.ends_with("/xt_TPROXY.ko") || l.ends_with("/nft_tproxy.ko"))
        {
            return (
                TproxyTarget::Present,
                format!("built in per {modules}/modules.builtin"),
            );
        }
    }
    for ext in ["ko", "ko.xz", "ko.zst", "ko.gz"] {
        let file = format!("{modules}/kernel/net/netfilter/xt_TPROXY.{ext}");
        if Path::new(&file).exists() {
            return (TproxyTarget::Loadable, format!("module file {file}"));
        }
    }
    let mut evidence = "not in ip_tables_targets, /sys/module or /lib/modules".to_owned();
    if !unreadable.is_empty() {
        evidence = format!("{evidence}; could not read {}", unreadable.join(", "));
    }
    (TproxyTarget::Unknown, evidence)
}

/// SO_ORIGINAL_DST on a connected loopback socket: ENOENT (no NAT entry for this flow) still
/// proves the option exists; ENOPROTOOPT means nf_conntrack is not loaded.
pub(crate) fn probe_original_dst() -> OriginalDstReport {
    let ipv4 = original_dst_v4();
    let ipv6 = original_dst_v6();
    OriginalDstReport {
        available: ipv4.available,
        ipv4,
        ipv6,
    }
}

fn original_dst_verdict(result: Result<(), Errno>, what: &str) -> Availability {
    match result {
        Ok(()) | Err(Errno::ENOENT) => Availability::yes(),
        Err(Errno::ENOPROTOOPT) => Availability::no(format!(
            "{what}: {}: nf_conntrack is not loaded (it loads with the first NAT rule)",
            errno_text(Errno::ENOPROTOOPT)
        )),
        Err(e) => Availability::no(format!("{what}: {}", errno_text(e))),
    }
}

fn original_dst_v4() -> Availability {
    match sys::loopback_pair(false) {
        Ok((client, _server)) => original_dst_verdict(
            socket::getsockopt(&client, sockopt::OriginalDst).map(drop),
            "SO_ORIGINAL_DST",
        ),
        Err(e) => Availability::no(format!("IPv4 loopback TCP pair: {}", errno_text(e))),
    }
}

fn original_dst_v6() -> Availability {
    let (client, _server) = match sys::loopback_pair(true) {
        Ok(pair) => pair,
        Err(e) => {
            return Availability::no(format!(
                "IPv6 loopback TCP pair: {} (IPv6 disabled?)",
                errno_text(e)
            ))
        }
    };
    // Asked with a raw getsockopt so the errno is classified the same way as IPv4's.
    // SAFETY: an all-zero sockaddr_in6 is a valid value.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: `addr` is a writable sockaddr_in6 and `len` holds its exact size; the kernel
    // writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            client.as_raw_fd(),
            libc::SOL_IPV6,
            IP6T_SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in6).cast::<libc::c_void>(),
            &mut len,
        )
    };
    original_dst_verdict(Errno::result(rc).map(drop), "IP6T_SO_ORIGINAL_DST")
}

/// Two SO_REUSEPORT sockets bound and listening on the same loopback port.
pub(crate) fn probe_reuseport() -> Availability {
    let attempt = || -> Result<(), String> {
        let step = |what: &str, e: Errno| format!("{what}: {}", permission_hint(e, "nothing"));
        let first = tcp_socket().map_err(|e| step("socket", e))?;
        socket::setsockopt(&first, sockopt::ReusePort, &true)
            .map_err(|e| step("SO_REUSEPORT", e))?;
        socket::bind(
            first.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
        )
        .map_err(|e| step("bind", e))?;
        let port = socket::getsockname::<SockaddrIn>(first.as_raw_fd())
            .map_err(|e| step("getsockname", e))?
            .port();
        socket::listen(
            &first,
            socket::Backlog::new(8).map_err(|e| step("listen", e))?,
        )
        .map_err(|e| step("listen", e))?;
        let second = tcp_socket().map_err(|e| step("socket", e))?;
        socket::setsockopt(&second, sockopt::ReusePort, &true)
            .map_err(|e| step("SO_REUSEPORT", e))?;
        socket::bind(
            second.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
        )
        .map_err(|e| step("second bind to the same port", e))?;
        socket::listen(
            &second,
            socket::Backlog::new(8).map_err(|e| step("listen", e))?,
        )
        .map_err(|e| step("second listen", e))?;
        Ok(())
    };
    match attempt() {
        Ok(()) => Availability::yes(),
        Err(why) => Availability::no(why),
    }
}

/// F_SETPIPE_SZ to 1 MiB on a fresh pipe.
pub(crate) fn probe_pipe_resize() -> Availability {
    let (read_end, _write_end) = match sys::pipe() {
        Ok(p) => p,
        Err(e) => return Availability::no(format!("pipe: {}", errno_text(e))),
    };
    match fcntl(read_end.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
        Ok(size) if size >= PIPE_SIZE => Availability::yes(),
        Ok(size) => Availability::no(format!("kernel granted only {size} bytes")),
        Err(Errno::EPERM) => Availability::no(format!(
            "{}: above fs.pipe-max-size or past fs.pipe-user-pages-soft without CAP_SYS_RESOURCE",
            errno_text(Errno::EPERM)
        )),
        Err(e) => Availability::no(errno_text(e)),
    }
}

/// SO_MARK 0x539 on a fresh socket.
pub(crate) fn probe_so_mark() -> Availability {
    match tcp_socket().and_then(|fd| socket::setsockopt(&fd, sockopt::Mark, &PROXY_MARK)) {
        Ok(()) => Availability::yes(),
        Err(e) => Availability::no(format!(
            "SO_MARK: {}",
            permission_hint(e, "CAP_NET_ADMIN or CAP_NET_RAW")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_moves_bytes_on_loopback() {
        // splice(2) between TCP and pipes exists on every kernel ringtun supports.
        assert_eq!(probe_splice(), Availability::yes());
    }

    #[test]
    fn reuseport_binds_two_listeners() {
        assert_eq!(probe_reuseport(), Availability::yes());
    }

    #[test]
    fn so_mark_works_with_cap_net_admin() {
        if sys::has_cap(sys::CAP_NET_ADMIN) {
            assert_eq!(probe_so_mark(), Availability::yes());
        }
    }

    #[test]
    fn enoprotoopt_means_no_conntrack() {
        let a = original_dst_verdict(Err(Errno::ENOPROTOOPT), "SO_ORIGINAL_DST");
        assert!(!a.available);
        assert!(a
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("nf_conntrack")));
        assert!(original_dst_verdict(Err(Errno::ENOENT), "x").available);
    }
}
