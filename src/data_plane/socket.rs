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

/// Fixes a flow socket's receive buffer at `bytes` (`limits.flow_receive_buffer`; 0: leave it
/// to autotuning).
///
/// Autotuning grows a socket's buffer while its reader keeps up in bursts, up to
/// `net.ipv4.tcp_rmem`'s maximum (32 MiB on recent kernels). A proxy's flow socket is then a
/// reservoir the sender fills whenever ringtun cannot forward (a tunnel short of credit, a slow
/// upstream): with 1,000 bulk flows ringtun's captured sockets held 855 MiB, the node's TCP
/// memory went past `tcp_mem`'s pressure mark, the kernel dropped arriving segments of the
/// fullest sockets, and senders in exponential RTO backoff left flows stalled for a minute.
/// The hop into ringtun is local (microseconds of RTT), so a small buffer costs a single stream
/// little (perf/README.md, "Flow receive buffer").
fn bound_receive_buffer(fd: &OwnedFd, bytes: usize) -> io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    sys::set_receive_buffer(fd.as_raw_fd(), u32::try_from(bytes).unwrap_or(u32::MAX))
}

/// The socket that delivers an inbound connection to the local application: an
/// [`outbound_socket`] and, with `client`, one whose source is the client's IP
/// (`IP_TRANSPARENT`; see `data_plane::client_address` for how the replies come back). Its
/// receive buffer is `receive_buffer` ([`bound_receive_buffer`]), set before `connect` so the
/// window scale is chosen for it.
///
/// Its port is the kernel's choice. A tunnel stream's client (port 0: its own port is on
/// another node) leaves the choice to `connect` (`IP_BIND_ADDRESS_NO_PORT`), which only needs
/// the four-tuple to be unique: choosing at `bind` searches the port range for a port free on
/// that address, and with thousands of TIME_WAIT deliveries from one client that search cost
/// 30 % of the HBONE connection rate. A plaintext client's port is never taken: its connection
/// to the same application is in this namespace's conntrack table under that port, and a
/// delivery with the same four-tuple would be taken for it; so here the port is chosen at
/// `bind`, where it can be checked before any packet leaves.
pub fn delivery_socket(
    upstream: &SocketAddr,
    mark: u32,
    client: Option<SocketAddr>,
    receive_buffer: usize,
) -> io::Result<OwnedFd> {
    let flow_socket = || -> io::Result<OwnedFd> {
        let fd = outbound_socket(upstream, mark)?;
        bound_receive_buffer(&fd, receive_buffer)?;
        Ok(fd)
    };
    let Some(client) = client else {
        return flow_socket();
    };
    let bound = || -> io::Result<OwnedFd> {
        let fd = flow_socket()?;
        sys::set_transparent(fd.as_raw_fd(), upstream.is_ipv6()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("IP_TRANSPARENT (needs CAP_NET_ADMIN): {e}"),
            )
        })?;
        if client.port() == 0 {
            sys::set_bind_address_no_port(fd.as_raw_fd())?;
        }
        let from = SocketAddr::new(client.ip(), 0);
        sys::bind(fd.as_raw_fd(), from)
            .map_err(|e| io::Error::new(e.kind(), format!("bind {from}: {e}")))?;
        Ok(fd)
    };
    let fd = bound()?;
    if client.port() == 0 || sys::local_addr(fd.as_raw_fd())?.port() != client.port() {
        return Ok(fd);
    }
    // The one port to avoid: while `fd` holds it, the kernel picks another.
    bound()
}

/// A capture listener: `SO_REUSEPORT` so every reactor has its own accept queue on the same
/// port; `transparent` for TPROXY (accepts connections addressed to any IP). The connections
/// it accepts inherit its receive buffer, `receive_buffer` ([`bound_receive_buffer`]; 0 for
/// port 15008, whose connections are tunnels).
pub fn listener(
    addr: SocketAddr,
    transparent: bool,
    mark: u32,
    backlog: i32,
    receive_buffer: usize,
) -> io::Result<OwnedFd> {
    let fd = sys::tcp_socket(&addr)?;
    bound_receive_buffer(&fd, receive_buffer)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    const BUFFER: usize = 96 * 1024;

    /// Flow sockets carry `SO_MARK`, which needs CAP_NET_ADMIN (the README's suite runs as
    /// root; without it these skip loudly, as the root tests do).
    fn root_or_skip(name: &str) -> bool {
        let root = crate::sys::process::is_root();
        if !root {
            eprintln!("SKIPPED (needs root): {name}");
        }
        root
    }

    /// A captured connection inherits the listener's receive buffer: fixed at what
    /// `limits.flow_receive_buffer` says (the kernel reports twice that), where autotuning
    /// would let the client fill up to `tcp_rmem`'s maximum.
    #[test]
    fn accepted_connections_have_the_flow_receive_buffer() {
        if !root_or_skip("accepted_connections_have_the_flow_receive_buffer") {
            return;
        }
        let fd = listener("127.0.0.1:0".parse().unwrap(), false, 0, 8, BUFFER).unwrap();
        let addr = sys::local_addr(fd.as_raw_fd()).unwrap();
        let _client = TcpStream::connect(addr).unwrap();
        // The handshake is done when `connect` returns: the connection is in the queue.
        let accepted = sys::accept(fd.as_raw_fd()).unwrap();
        assert_eq!(
            sys::receive_buffer(accepted.as_raw_fd()).unwrap(),
            2 * BUFFER
        );
    }

    /// A delivery's receive buffer is fixed the same way, before it connects; 0 leaves it to
    /// the kernel.
    #[test]
    fn deliveries_have_the_flow_receive_buffer_unless_it_is_zero() {
        if !root_or_skip("deliveries_have_the_flow_receive_buffer_unless_it_is_zero") {
            return;
        }
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let fd = delivery_socket(&to, 0, None, BUFFER).unwrap();
        assert_eq!(sys::receive_buffer(fd.as_raw_fd()).unwrap(), 2 * BUFFER);
        let fd = delivery_socket(&to, 0, None, 0).unwrap();
        assert_ne!(sys::receive_buffer(fd.as_raw_fd()).unwrap(), 2 * BUFFER);
    }
}
