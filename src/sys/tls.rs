//! The kernel TLS socket calls (linux/tls.h): installing the ULP and a direction's keys, and
//! the `recvmsg`/`sendmsg` forms that carry a record's content type in a `SOL_TLS` control
//! message, so non-data records (alerts, post-handshake messages) can be read and sent on a
//! kTLS socket.

use std::io;
use std::os::fd::RawFd;

use nix::errno::Errno;

/// `TLS_TX` / `TLS_RX` (linux/tls.h): the `SOL_TLS` options that install one direction's keys.
pub const TLS_TX: libc::c_int = 1;
pub const TLS_RX: libc::c_int = 2;
/// `TLS_SET_RECORD_TYPE` / `TLS_GET_RECORD_TYPE` cmsg types at `SOL_TLS`.
pub const TLS_SET_RECORD_TYPE: libc::c_int = 1;
pub const TLS_GET_RECORD_TYPE: libc::c_int = 2;
/// The TLS application_data content type (RFC 8446 §5.1): what a recv without a record-type
/// control message returned.
const CONTENT_APPLICATION_DATA: u8 = 23;

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> Result<(), Errno> {
    let len = libc::socklen_t::try_from(value.len()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `value` is a live, initialised buffer of `len` bytes for the whole call and the
    // kernel only reads it; a bad fd or option gives an errno, not undefined behaviour.
    let rc = unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// `TCP_ULP` "tls": the socket gets the TLS layer (refused per socket, e.g. when not
/// ESTABLISHED, or when the kernel has no kTLS; the socket is unchanged then).
pub fn set_ulp_tls(fd: RawFd) -> Result<(), Errno> {
    setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, b"tls")
}

/// Installs one direction's keys: `crypto_info` is the kernel's `tls12_crypto_info_*` for the
/// cipher, as bytes; `option` is [`TLS_TX`] or [`TLS_RX`].
pub fn set_crypto_info(fd: RawFd, option: libc::c_int, crypto_info: &[u8]) -> Result<(), Errno> {
    setsockopt(fd, libc::SOL_TLS, option, crypto_info)
}

/// One `recvmsg` on a kTLS socket: how many bytes, and the record type they came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub record_type: u8,
}

/// CMSG_SPACE(1), as a buffer aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuf([u8; 32]);

/// Receives on a kTLS socket with a control buffer, so non-data records come back as data with
/// their content type instead of failing with EIO. The kernel never mixes record types in one
/// call. On a socket without kTLS there is no control message and the type is application data.
pub fn recv_record(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
    let mut control = ControlBuf([0; 32]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid "no name, no iov, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: `msg` points at `iov` (which covers `buf`) and `control`, all live and writable
    // for the whole call; the kernel writes at most their lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let control_len = (msg.msg_controllen as usize).min(control.0.len());
    let record_type =
        parse_record_type(&control.0[..control_len]).unwrap_or(CONTENT_APPLICATION_DATA);
    Ok(Received {
        len: n as usize,
        record_type,
    })
}

/// Finds the `SOL_TLS`/`TLS_GET_RECORD_TYPE` control message in a `recvmsg` control buffer and
/// returns its one-byte record type. Walks the buffer as `CMSG_NXTHDR` does, without pointers.
pub fn parse_record_type(control: &[u8]) -> Option<u8> {
    // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } then data, each
    // header and data start aligned to size_t.
    const W: usize = std::mem::size_of::<usize>();
    const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
    let align = |len: usize| len.div_ceil(W) * W;
    let mut offset = 0;
    while offset + HDR <= control.len() {
        let at = &control[offset..];
        let len = usize::from_ne_bytes(at[..W].try_into().ok()?);
        let level = i32::from_ne_bytes(at[W..W + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(at[W + 4..W + 8].try_into().ok()?);
        if len < HDR || offset + len > control.len() {
            return None;
        }
        if level == libc::SOL_TLS && kind == TLS_GET_RECORD_TYPE && len > HDR {
            return Some(control[offset + align(HDR)]);
        }
        offset += align(len);
    }
    None
}

/// Sends one record of `content_type` (an alert, say) on a kTLS socket, with
/// `TLS_SET_RECORD_TYPE`.
pub fn send_record(fd: RawFd, content_type: u8, payload: &[u8]) -> io::Result<usize> {
    let mut control = ControlBuf([0; 32]);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: msg_control points at `control`, which is aligned for cmsghdr and at least
    // CMSG_SPACE(1) bytes, so the first header and its one data byte lie inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = content_type;
    }
    // SAFETY: every pointer in `msg` refers to live buffers of the stated lengths; the kernel
    // only reads the payload (sendmsg), so the const-to-mut cast is never written through.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT_HANDSHAKE: u8 = 22;

    #[test]
    fn record_type_is_read_from_a_constructed_cmsg_buffer() {
        // Two control messages, as recvmsg could return them: an unrelated one first.
        let mut buf = ControlBuf([0; 32]);
        let mut big = [0u64; 8];
        // SAFETY: CMSG_* only compute sizes; the msghdr points at `big`, which is aligned for
        // cmsghdr and large enough for both headers written below.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_control = big.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&big) as _;
            let first = libc::CMSG_FIRSTHDR(&msg);
            (*first).cmsg_level = libc::SOL_SOCKET;
            (*first).cmsg_type = libc::SCM_RIGHTS;
            (*first).cmsg_len = libc::CMSG_LEN(4) as _;
            let second = libc::CMSG_NXTHDR(&msg, first);
            (*second).cmsg_level = libc::SOL_TLS;
            (*second).cmsg_type = TLS_GET_RECORD_TYPE;
            (*second).cmsg_len = libc::CMSG_LEN(1) as _;
            *libc::CMSG_DATA(second) = CONTENT_HANDSHAKE;
            let used = libc::CMSG_SPACE(4) as usize + libc::CMSG_SPACE(1) as usize;
            let bytes = std::slice::from_raw_parts(big.as_ptr().cast::<u8>(), used);
            assert_eq!(parse_record_type(bytes), Some(CONTENT_HANDSHAKE));
            // Only the unrelated message: no record type.
            let only_first =
                std::slice::from_raw_parts(big.as_ptr().cast::<u8>(), libc::CMSG_SPACE(4) as usize);
            assert_eq!(parse_record_type(only_first), None);
            // The one-message buffer the receive path uses.
            let one = libc::CMSG_SPACE(1) as usize;
            std::ptr::copy_nonoverlapping(
                (second as *const libc::cmsghdr).cast::<u8>(),
                buf.0.as_mut_ptr(),
                one,
            );
            assert_eq!(parse_record_type(&buf.0[..one]), Some(CONTENT_HANDSHAKE));
        }
        assert_eq!(parse_record_type(&[]), None);
        // A header whose length runs past the buffer is refused, not read past.
        let mut bad = buf.0;
        bad[..8].copy_from_slice(&1000usize.to_ne_bytes());
        assert_eq!(parse_record_type(&bad), None);
    }

    #[test]
    fn on_a_socket_without_ktls_records_read_as_application_data() {
        let (mut a, b) = crate::data_plane::socket::tcp_pair();
        std::io::Write::write_all(&mut a, b"plain").unwrap();
        let mut buf = [0u8; 16];
        let r = recv_record(std::os::fd::AsRawFd::as_raw_fd(&b), &mut buf, 0).unwrap();
        assert_eq!((r.len, r.record_type), (5, CONTENT_APPLICATION_DATA));
        assert_eq!(&buf[..5], b"plain");
    }
}
