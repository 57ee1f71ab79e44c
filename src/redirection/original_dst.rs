//! The destination a captured connection was really for. nat REDIRECT rewrites it, so it is
//! read back from conntrack with `SO_ORIGINAL_DST` (IPv4) / `IP6T_SO_ORIGINAL_DST` (IPv6);
//! TPROXY keeps it as the socket's local address.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Original destination of a REDIRECTed socket, asked in the family the connection arrived
/// in. `ENOENT` means conntrack has no NAT for it (the connection was not redirected);
/// `ENOPROTOOPT` means nf_conntrack is not loaded.
pub fn original_dst(fd: RawFd, local: &SocketAddr) -> io::Result<SocketAddr> {
    crate::sys::socket::original_dst(fd, local.is_ipv6())
}
