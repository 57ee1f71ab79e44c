//! Socket calls: TCP sockets made non-blocking and close-on-exec, the options ringtun sets,
//! bind/listen/connect/accept, addresses, one non-blocking `send`, the kernel's queue depths,
//! and netfilter's record of where a redirected connection was going. Policy (which options a
//! listener gets, what an error means) lives with the callers; these only make the calls.

use std::io;
use std::mem::size_of;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    self as nix_socket, AddressFamily, MsgFlags, SockFlag, SockType, SockaddrLike, SockaddrStorage,
};

use super::{check, io_error};

/// `IP6T_SO_ORIGINAL_DST` from linux/netfilter_ipv6/ip6_tables.h (the same number as
/// `SO_ORIGINAL_DST`, at level `SOL_IPV6`).
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// A socket address in the kernel's layout, for calls that keep a pointer to it (io_uring's
/// connect reads it when the request is prepared, so its owner keeps it alive until then).
pub struct SockAddr(SockaddrStorage);

impl SockAddr {
    pub fn new(addr: SocketAddr) -> SockAddr {
        SockAddr(SockaddrStorage::from(addr))
    }

    /// Valid while `self` lives; the kernel reads [`byte_len`](Self::byte_len) bytes from it.
    pub fn as_ptr(&self) -> *const libc::sockaddr {
        self.0.as_ptr()
    }

    /// Bytes of the address at [`as_ptr`](Self::as_ptr), as the kernel's `addrlen`.
    pub fn byte_len(&self) -> libc::socklen_t {
        self.0.len()
    }
}

/// A TCP socket of `addr`'s family, non-blocking and close-on-exec.
pub fn tcp_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    nix_socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io_error)
}

/// A UDP socket of `addr`'s family, close-on-exec (blocking: only ever connected, never used
/// for traffic — a connect asks the kernel which route and source address it would take).
pub fn udp_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    nix_socket::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(io_error)
}

/// `setsockopt` with an `int` value (every boolean and numeric option ringtun sets).
fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the kernel reads at most `size_of::<c_int>()` bytes from `value`, which lives on
    // this stack frame for the whole call; any fd, level or name only yields an errno.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `getsockopt` of an `int` option.
fn get_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` live on this stack frame for the call; `len` tells the kernel
    // it may write at most one int into `value`.
    check(unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// `SO_MARK`: the firewall mark every packet of the socket carries (needs CAP_NET_ADMIN).
pub fn set_mark(fd: RawFd, mark: u32) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

/// `SO_RCVBUF`: the socket's receive buffer, fixed at `bytes` (the kernel doubles it for its
/// bookkeeping and no longer autotunes it).
pub fn set_receive_buffer(fd: RawFd, bytes: u32) -> io::Result<()> {
    set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        bytes.min(i32::MAX as u32) as libc::c_int,
    )
}

/// `SO_RCVBUF` as the kernel reports it: twice what was set (its bookkeeping share), or the
/// autotuned size.
pub fn receive_buffer(fd: RawFd) -> io::Result<usize> {
    get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).map(|v| usize::try_from(v).unwrap_or(0))
}

/// `TCP_NODELAY`: Nagle off.
pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

/// `SO_REUSEADDR`.
pub fn set_reuse_addr(fd: RawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
}

/// `SO_REUSEPORT`: several sockets bound to one port, each with its own accept queue.
pub fn set_reuse_port(fd: RawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)
}

/// `IPV6_V6ONLY`: an IPv6 socket that does not also take IPv4 connections.
pub fn set_ipv6_only(fd: RawFd) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)
}

/// `IP_TRANSPARENT` (or `IPV6_TRANSPARENT`): bind and accept for addresses that are not local,
/// as TPROXY needs (needs CAP_NET_ADMIN).
pub fn set_transparent(fd: RawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)
    } else {
        set_int(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1)
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: `bind` to an address with port 0 takes only the address; the
/// port is chosen at `connect`, where the kernel needs the four-tuple to be unique instead of
/// the port to be free on that address, and can reuse TIME_WAIT ports. Without it, binding
/// many connections' source address searches the port range for an unbound port, which grows
/// slower as TIME_WAIT sockets fill the range.
pub fn set_bind_address_no_port(fd: RawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// `SO_LINGER` with a zero timeout: closing the socket then sends a reset (RST), not a FIN.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the kernel reads `size_of::<linger>()` bytes from `linger`, a plain struct of two
    // ints on this stack frame for the whole call.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(drop)
}

pub fn bind(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    nix_socket::bind(fd, &SockaddrStorage::from(addr)).map_err(io_error)
}

pub fn listen(fd: RawFd, backlog: i32) -> io::Result<()> {
    // SAFETY: no memory is involved; any fd only yields an errno.
    check(unsafe { libc::listen(fd, backlog) }).map(drop)
}

/// `connect(2)`. On a non-blocking socket `EINPROGRESS` means started: the socket turns
/// writable when it finishes and [`take_error`] then says how.
pub fn connect(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    nix_socket::connect(fd, &SockaddrStorage::from(addr)).map_err(io_error)
}

/// One accepted connection, non-blocking and close-on-exec (its address is not asked for).
pub fn accept(fd: RawFd) -> io::Result<OwnedFd> {
    let raw = nix_socket::accept4(fd, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)
        .map_err(io_error)?;
    // SAFETY: accept4 just returned this descriptor; nothing else has it, so the OwnedFd is its
    // only owner and closes it once.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// The address a socket is bound to.
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    to_socket_addr(&nix_socket::getsockname::<SockaddrStorage>(fd).map_err(io_error)?)
}

/// The address of a connected socket's peer.
pub fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    to_socket_addr(&nix_socket::getpeername::<SockaddrStorage>(fd).map_err(io_error)?)
}

/// An IPv4 or IPv6 address; a v4 peer on a v6 socket is reported as the v4 address it is.
fn to_socket_addr(addr: &SockaddrStorage) -> io::Result<SocketAddr> {
    if let Some(sin) = addr.as_sockaddr_in() {
        return Ok(SocketAddr::V4(SocketAddrV4::from(*sin)));
    }
    if let Some(sin6) = addr.as_sockaddr_in6() {
        let v6 = SocketAddrV6::from(*sin6);
        return Ok(match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => SocketAddr::V6(v6),
        });
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected address family {:?}", addr.family()),
    ))
}

/// `SO_ERROR`, which reading clears: 0 when a non-blocking connect succeeded, else its errno.
pub fn take_error(fd: RawFd) -> io::Result<i32> {
    get_int(fd, libc::SOL_SOCKET, libc::SO_ERROR)
}

/// One non-blocking `send` (no SIGPIPE), retrying EINTR; `WouldBlock` when the socket is full.
pub fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        match nix_socket::send(fd, buf, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io_error(e)),
        }
    }
}

/// One non-blocking `send` with `MSG_MORE` when `more` (the caller sends the rest of the
/// record right after: a DATA frame header and its spliced payload share TLS records).
pub fn send_more(fd: RawFd, buf: &[u8], more: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | if more { libc::MSG_MORE } else { 0 };
    loop {
        // SAFETY: `buf` is a live slice for the whole call; the kernel reads at most
        // `buf.len()` bytes of it. Any fd only yields an errno.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One non-blocking `recv`, retrying EINTR; `Ok(0)` is EOF, `WouldBlock` when nothing waits.
pub fn recv_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv_retrying(fd, buf, MsgFlags::MSG_DONTWAIT)
}

/// One non-blocking `recv` with `MSG_PEEK`: copies what waits without taking it off the
/// socket. `Ok(0)` is EOF, `WouldBlock` when nothing waits.
pub fn peek_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv_retrying(fd, buf, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK)
}

/// Takes `room.len()` bytes that [`peek_nonblocking`] saw off a TCP socket without copying
/// them: `MSG_TRUNC`, which TCP implements as discard (tcp(7)); `room` only has to be as long
/// as what is dropped. Returns how many were dropped.
pub fn discard(fd: RawFd, room: &mut [u8]) -> io::Result<usize> {
    recv_retrying(fd, room, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC)
}

fn recv_retrying(fd: RawFd, buf: &mut [u8], flags: MsgFlags) -> io::Result<usize> {
    loop {
        match nix_socket::recv(fd, buf, flags) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io_error(e)),
        }
    }
}

/// `readv(2)` into `iov`, retrying EINTR; `Ok(0)` is EOF, `WouldBlock` on a non-blocking
/// socket with nothing to read.
pub fn readv(fd: RawFd, iov: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
    let count =
        libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: `IoSliceMut` is ABI-compatible with `struct iovec` (std guarantees it); every
        // slice is live and writable for the whole call and the kernel writes at most each
        // one's length. Any fd only yields an errno.
        let n = unsafe { libc::readv(fd, iov.as_ptr().cast(), count) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `shutdown(SHUT_WR)`: the peer reads EOF once what was sent is read; reading goes on.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    nix_socket::shutdown(fd, nix_socket::Shutdown::Write).map_err(io_error)
}

/// Bytes in a TCP socket's receive queue not yet read (`SIOCINQ`) and in its send queue not
/// yet acknowledged (`SIOCOUTQ`); `None` where the ioctl fails.
pub fn queued_bytes(fd: RawFd) -> (Option<i32>, Option<i32>) {
    let query = |request| {
        let mut n: libc::c_int = 0;
        // SAFETY: both requests write one int through the pointer, to `n`, which lives across
        // the call; any fd only yields an errno.
        let rc = unsafe { libc::ioctl(fd, request, &mut n as *mut libc::c_int) };
        (rc == 0).then_some(n)
    };
    (query(libc::FIONREAD), query(libc::TIOCOUTQ))
}

/// Where a connection redirected by nat REDIRECT was going, from conntrack
/// (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for `ipv6`). `ENOENT`: conntrack has no NAT for
/// it; `ENOPROTOOPT`: nf_conntrack is not loaded.
pub fn original_dst(fd: RawFd, ipv6: bool) -> io::Result<SocketAddr> {
    if ipv6 {
        let mut sin6 = libc::sockaddr_in6 {
            sin6_family: 0,
            sin6_port: 0,
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
            sin6_scope_id: 0,
        };
        let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: `sin6` and `len` live on this stack frame for the call; `len` bounds what the
        // kernel writes to the size of `sin6`.
        check(unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                IP6T_SO_ORIGINAL_DST,
                (&mut sin6 as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        })?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            sin6.sin6_addr.s6_addr.into(),
            u16::from_be(sin6.sin6_port),
            sin6.sin6_flowinfo,
            sin6.sin6_scope_id,
        )))
    } else {
        let mut sin = libc::sockaddr_in {
            sin_family: 0,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: as above, for `sin`.
        check(unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                libc::SO_ORIGINAL_DST,
                (&mut sin as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        })?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            u32::from_be(sin.sin_addr.s_addr).into(),
            u16::from_be(sin.sin_port),
        )))
    }
}

/// `poll(2)` on `fds` for up to `timeout_ms` (-1: no limit); the number of entries with events.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    let n = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fds` is a live array of `n` pollfds for the whole call; the kernel writes only
    // their `revents`. Any fd in it only yields POLLNVAL.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
    check(rc).map(|n| n as usize)
}

/// Waits until `fd` is readable (for a listener: a connection is waiting) or `timeout` passes;
/// true when readable. Interrupted waits count as not readable.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one pollfd on this stack frame, nfds 1; the kernel writes only `revents`.
    match check(unsafe { libc::poll(&mut pfd, 1, ms) }) {
        Ok(n) => Ok(n > 0 && pfd.revents & libc::POLLIN != 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    #[test]
    fn a_listener_made_here_accepts_a_connection_and_names_both_ends() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let l = tcp_socket(&addr).unwrap();
            set_reuse_addr(l.as_raw_fd()).unwrap();
            if addr.is_ipv6() {
                set_ipv6_only(l.as_raw_fd()).unwrap();
            }
            bind(l.as_raw_fd(), addr).unwrap();
            listen(l.as_raw_fd(), 8).unwrap();
            let bound = local_addr(l.as_raw_fd()).unwrap();
            assert_eq!(bound.ip(), addr.ip());
            assert_ne!(bound.port(), 0);
            let mut client = TcpStream::connect(bound).unwrap();
            assert!(wait_readable(l.as_raw_fd(), Duration::from_secs(5)).unwrap());
            let s = accept(l.as_raw_fd()).unwrap();
            assert_eq!(
                peer_addr(s.as_raw_fd()).unwrap(),
                client.local_addr().unwrap()
            );
            client.write_all(b"hello").unwrap();
            let mut got = [0u8; 5];
            let mut s = std::net::TcpStream::from(s);
            s.set_nonblocking(false).unwrap();
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hello");
        }
    }

    #[test]
    fn accept_on_an_empty_listener_would_block_and_polling_it_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let err = accept(l.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(!wait_readable(l.as_raw_fd(), Duration::from_millis(20)).unwrap());
    }

    #[test]
    fn a_nonblocking_connect_reports_its_refusal_through_so_error() {
        // A port nothing listens on: bind one, learn its number, close it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let s = tcp_socket(&to).unwrap();
        match connect(s.as_raw_fd(), to) {
            Ok(()) => panic!("connected to a closed port"),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                loop {
                    let err = take_error(s.as_raw_fd()).unwrap();
                    if err != 0 {
                        assert_eq!(err, libc::ECONNREFUSED);
                        break;
                    }
                    assert!(std::time::Instant::now() < deadline, "connect never failed");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED)),
        }
    }

    #[test]
    fn linger_zero_turns_close_into_a_reset() {
        let (c, mut s) = pair();
        set_linger_zero(c.as_raw_fd()).unwrap();
        drop(c);
        let mut buf = [0u8; 8];
        let err = s.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn send_nonblocking_fills_the_socket_then_would_block_and_shutdown_sends_eof() {
        let (c, mut s) = pair();
        let chunk = [7u8; 65536];
        let mut sent = 0usize;
        let err = loop {
            match send_nonblocking(c.as_raw_fd(), &chunk) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(sent > 0);
        shutdown_write(c.as_raw_fd()).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), sent);
    }

    #[test]
    fn options_are_set_or_refused_with_the_errno() {
        let (c, _s) = pair();
        set_nodelay(c.as_raw_fd()).unwrap();
        assert!(c.nodelay().unwrap());
        set_reuse_port(c.as_raw_fd()).unwrap();
        // Not a socket: the kernel says so, nothing else happens.
        let err = set_nodelay(-1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn queued_bytes_counts_what_waits_unread() {
        let (mut c, mut s) = pair();
        assert_eq!(queued_bytes(s.as_raw_fd()).0, Some(0));
        c.write_all(&[7u8; 1000]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
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

    #[test]
    fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let (c, _s) = pair();
        let err = original_dst(c.as_raw_fd(), false).unwrap_err();
        // ENOENT with conntrack loaded, ENOPROTOOPT without it: never an address.
        assert!(
            matches!(
                err.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENOPROTOOPT)
            ),
            "{err}"
        );
    }
}
