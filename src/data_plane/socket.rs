//! Socket set-up for the data path: non-blocking TCP sockets carrying ringtun's `SO_MARK`,
//! capture listeners, addresses, and the abortive close that turns a failure into a reset.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: T) -> io::Result<()> {
    // SAFETY: `value` is a plain value of the type the option expects, passed with its size.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const T as *const libc::c_void,
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// A non-blocking, close-on-exec TCP socket of `addr`'s family.
fn tcp_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the result is checked.
    let fd = check(unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: socket() returned a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A non-blocking, close-on-exec TCP socket for `addr`'s family, marked with `mark` so the
/// capture rules let it through, with Nagle off (the proxy forwards what it gets at once).
pub fn outbound_socket(addr: &SocketAddr, mark: u32) -> io::Result<OwnedFd> {
    let fd = tcp_socket(addr)?;
    setsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_MARK,
        mark as libc::c_int,
    )
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("SO_MARK {mark:#x} (needs CAP_NET_ADMIN): {e}"),
        )
    })?;
    setsockopt(
        fd.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_NODELAY,
        1 as libc::c_int,
    )?;
    Ok(fd)
}

/// A capture listener: `SO_REUSEPORT` so every reactor has its own accept queue on the same
/// port; `transparent` for TPROXY (accepts connections addressed to any IP).
pub fn listener(
    addr: SocketAddr,
    transparent: bool,
    mark: u32,
    backlog: i32,
) -> io::Result<OwnedFd> {
    let fd = tcp_socket(&addr)?;
    let raw = fd.as_raw_fd();
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1 as libc::c_int)?;
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1 as libc::c_int)?;
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)?;
    if addr.is_ipv6() {
        setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1 as libc::c_int)?;
    }
    if transparent {
        let (level, opt) = if addr.is_ipv4() {
            (libc::SOL_IP, libc::IP_TRANSPARENT)
        } else {
            (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
        };
        setsockopt(raw, level, opt, 1 as libc::c_int).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("IP_TRANSPARENT (needs CAP_NET_ADMIN): {e}"),
            )
        })?;
    }
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` holds a valid sockaddr of `len` bytes.
    check(unsafe { libc::bind(raw, &sa as *const _ as *const libc::sockaddr, len) })
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    // SAFETY: listen on a bound socket we own.
    check(unsafe { libc::listen(raw, backlog) })?;
    Ok(fd)
}

/// `sockaddr_storage` for an address, with its length.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn to_socket_addr(ss: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            // A v4 peer on a v6 socket is reported as the v4 address it is.
            if let Some(v4) = ip.to_ipv4_mapped() {
                return Ok(SocketAddr::V4(SocketAddrV4::new(
                    v4,
                    u16::from_be(sin6.sin6_port),
                )));
            }
            Ok(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        f => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected address family {f}"),
        )),
    }
}

pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss`/`len` describe a buffer large enough for any address.
    check(unsafe { libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) })?;
    to_socket_addr(&ss)
}

pub fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss`/`len` describe a buffer large enough for any address.
    check(unsafe { libc::getpeername(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) })?;
    to_socket_addr(&ss)
}

pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1 as libc::c_int)
}

/// Closes a socket so the peer sees a reset (RST) rather than an orderly end (FIN): how a reset
/// or a refusal on one side is passed on to the other.
pub fn close_with_reset(fd: OwnedFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, linger);
    drop(fd);
}

/// One non-blocking `send` (no SIGPIPE), retrying EINTR; `WouldBlock` when the socket is full.
pub fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live slice; the kernel reads at most `buf.len()` bytes from it.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Bytes in a TCP socket's receive queue not yet read (`SIOCINQ`) and in its send queue not
/// yet acknowledged (`SIOCOUTQ`); `None` where the ioctl fails. For logs about stalls.
pub fn queued_bytes(fd: RawFd) -> (Option<i32>, Option<i32>) {
    let query = |request| {
        let mut n: libc::c_int = 0;
        // SAFETY: both requests write one int through the pointer, which lives across the call.
        let rc = unsafe { libc::ioctl(fd, request, &mut n) };
        (rc == 0).then_some(n)
    };
    (query(libc::FIONREAD), query(libc::TIOCOUTQ))
}

/// A connected loopback TCP pair for unit tests: `(connecting side, accepted side)`, both
/// blocking.
#[cfg(test)]
pub(crate) fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn queued_bytes_counts_what_waits_unread() {
        let (mut c, mut s) = tcp_pair();
        assert_eq!(queued_bytes(s.as_raw_fd()).0, Some(0));
        c.write_all(&[7u8; 1000]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while queued_bytes(s.as_raw_fd()).0 != Some(1000) {
            assert!(
                std::time::Instant::now() < deadline,
                "1000 bytes never showed as unread"
            );
            std::thread::yield_now();
        }
        let mut buf = [0u8; 400];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(queued_bytes(s.as_raw_fd()).0, Some(600));
        assert_eq!(queued_bytes(-1), (None, None));
    }
}
