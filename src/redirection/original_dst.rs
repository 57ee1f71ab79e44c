//! The destination a captured connection was really for. nat REDIRECT rewrites it, so it is
//! read back from conntrack with `SO_ORIGINAL_DST` (IPv4) / `IP6T_SO_ORIGINAL_DST` (IPv6);
//! TPROXY keeps it as the socket's local address.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// `IP6T_SO_ORIGINAL_DST` from linux/netfilter_ipv6/ip6_tables.h (same number as SO_ORIGINAL_DST).
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// Original destination of a REDIRECTed socket. `ENOENT` means conntrack has no NAT for it
/// (the connection was not redirected); `ENOPROTOOPT` means nf_conntrack is not loaded.
pub fn original_dst(fd: RawFd, local: &SocketAddr) -> io::Result<SocketAddr> {
    match local {
        SocketAddr::V4(_) => {
            // SAFETY: sockaddr_in is plain data; getsockopt writes at most `len` bytes into it.
            let mut sin: libc::sockaddr_in = unsafe { zeroed() };
            let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: valid fd, pointer and length describe `sin`.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IP,
                    libc::SO_ORIGINAL_DST,
                    &mut sin as *mut _ as *mut libc::c_void,
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            // SAFETY: sockaddr_in6 is plain data; getsockopt writes at most `len` bytes into it.
            let mut sin6: libc::sockaddr_in6 = unsafe { zeroed() };
            let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            // SAFETY: valid fd, pointer and length describe `sin6`.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IPV6,
                    IP6T_SO_ORIGINAL_DST,
                    &mut sin6 as *mut _ as *mut libc::c_void,
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
    }
}
