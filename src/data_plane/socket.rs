//! Socket set-up for the data path: non-blocking TCP sockets carrying ringtun's `SO_MARK`,
//! capture listeners, addresses, and the abortive close that turns a failure into a reset.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::sys::socket as sys;

// Plain socket calls the tunnel code shares with the data path live in `sys::socket` (the
// lead's tunnel/TLS calls join them there); the names stay here so code written against
// `data_plane::socket` keeps working.
pub use crate::sys::socket::{local_addr, peer_addr, queued_bytes, send_nonblocking, set_nodelay};

/// A non-blocking, close-on-exec TCP socket for `addr`'s family, marked with `mark` so the
/// capture rules let it through, with Nagle off (the proxy forwards what it gets at once).
pub fn outbound_socket(addr: &SocketAddr, mark: u32) -> io::Result<OwnedFd> {
    let fd = sys::tcp_socket(addr)?;
    sys::set_mark(fd.as_raw_fd(), mark).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("SO_MARK {mark:#x} (needs CAP_NET_ADMIN): {e}"),
        )
    })?;
    sys::set_nodelay(fd.as_raw_fd())?;
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
    let fd = sys::tcp_socket(&addr)?;
    let raw = fd.as_raw_fd();
    sys::set_reuse_addr(raw)?;
    sys::set_reuse_port(raw)?;
    sys::set_mark(raw, mark)?;
    if addr.is_ipv6() {
        sys::set_ipv6_only(raw)?;
    }
    if transparent {
        sys::set_transparent(raw, addr.is_ipv6()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("IP_TRANSPARENT (needs CAP_NET_ADMIN): {e}"),
            )
        })?;
    }
    sys::bind(raw, addr).map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    sys::listen(raw, backlog)?;
    Ok(fd)
}

/// Closes a socket so the peer sees a reset (RST) rather than an orderly end (FIN): how a reset
/// or a refusal on one side is passed on to the other.
pub fn close_with_reset(fd: OwnedFd) {
    let _ = sys::set_linger_zero(fd.as_raw_fd());
    drop(fd);
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
