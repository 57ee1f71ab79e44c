//! The client's address reaches the application: an inbound connection (plaintext captured on
//! 15006, or a stream of a tunnel on 15008) is delivered to the local application from the
//! client's own IP, as ztunnel does, instead of from the workload's address — so the
//! application's logs, its own access rules and its view of who calls it stay true.
//!
//! How: the delivery socket is made in the workload's namespace with `IP_TRANSPARENT`, bound to
//! the client's IP (a port of the kernel's choice), and carries ringtun's `SO_MARK`. Its
//! packets reach the application over `lo`. The application's replies are addressed to the
//! client, which this namespace would route away; the capture rules (`ringtun redirect
//! install`) mark the connection when its first packet arrives with ringtun's mark, restore that
//! mark on the replies, and the mark's policy rule routes them to the `local` table, back to
//! the delivery socket.
//!
//! Boundary: [`check_return_path`] decides, in a workload's namespace when its listeners are
//! made, whether that routing is in place (a route lookup, then one real connection through
//! it); [`delivery_source`] decides, per connection, which address to bind. Making the socket
//! is `data_plane::socket::delivery_socket`. `ringtun probe` runs the same check.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::control_plane::config::ClientAddressChoice;
use crate::control_plane::workload_registry::canonical;
use crate::sys::socket as sys;

/// The mark the capture rules restore on the application's replies, and the mark their policy
/// rule routes to the `local` table (`RedirectSettings::tproxy_mark`).
pub const REPLY_MARK: u32 = 0x111;

/// Stand-in client addresses for the check (RFC 5737 TEST-NET-2, RFC 3849): never a real
/// client, never local.
const PROBE_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const PROBE_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0x5269, 0x6e67);

/// How long the check's connection may take. Over `lo` it takes microseconds when the rules
/// are there; without them the reply is routed away and never comes.
const CHECK_DEADLINE: Duration = Duration::from_secs(1);

/// Why the client's address cannot be delivered in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReturnPathError {
    #[error("IP_TRANSPARENT (needs CAP_NET_ADMIN): {0}")]
    Transparent(String),
    #[error(
        "replies to a client address are not routed back to ringtun here ({0}: no `fwmark \
         {REPLY_MARK:#x}` rule to a `local` route); install the capture rules with \
         `ringtun redirect install`"
    )]
    NoLocalRoute(String),
    #[error(
        "replies are routed back but the connection is not marked (capture rules from an \
         older ringtun?); reinstall them with `ringtun redirect install`"
    )]
    NotMarked,
    #[error("cannot test from {0}: {1}")]
    Test(IpAddr, String),
}

/// Checks, in the calling thread's namespace, that a connection from a client address to
/// `local` (an address of the workload there) gets its replies back: first the policy route
/// for marked replies (no packet sent), then one connection from a stand-in client address
/// through the capture rules, as a delivery makes it.
pub fn check_return_path(local: IpAddr, socket_mark: u32) -> Result<(), ReturnPathError> {
    let client = match canonical(local) {
        IpAddr::V4(_) => IpAddr::V4(PROBE_CLIENT_V4),
        IpAddr::V6(_) => IpAddr::V6(PROBE_CLIENT_V6),
    };
    let local = canonical(local);
    // The IPv4 route answers for the namespace: the capture rules install both families,
    // and only IPv4 names a `local` route in its answer (IPv6 picks a global source either
    // way). The connection below then tests the family itself.
    check_route()?;
    // The kernel routes a reply by the ordinary tables first and only then (restoring the
    // mark) to the local table: where no route leads toward the stand-in client at all, no
    // connection can test the marking, and real clients (routable, or they could not have
    // connected) are not in question.
    if !routable(client) {
        return Ok(());
    }
    let test = |what: &str, e: std::io::Error| ReturnPathError::Test(local, format!("{what}: {e}"));
    let listener = sys::tcp_socket(&SocketAddr::new(local, 0)).map_err(|e| test("socket", e))?;
    sys::bind(listener.as_raw_fd(), SocketAddr::new(local, 0)).map_err(|e| test("bind", e))?;
    sys::listen(listener.as_raw_fd(), 1).map_err(|e| test("listen", e))?;
    let to = sys::local_addr(listener.as_raw_fd()).map_err(|e| test("getsockname", e))?;
    let from = crate::data_plane::socket::delivery_socket(
        &to,
        socket_mark,
        Some(SocketAddr::new(client, 0)),
        0,
    )
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ReturnPathError::Transparent(e.to_string()),
        _ => test("delivery socket", e),
    })?;
    match sys::connect(from.as_raw_fd(), to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(test("connect", e)),
    }
    let started = Instant::now();
    loop {
        let left = CHECK_DEADLINE.saturating_sub(started.elapsed());
        let mut pfd = [libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        }];
        match sys::poll(&mut pfd, left.as_millis() as i32) {
            Ok(0) => return Err(ReturnPathError::NotMarked),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted && !left.is_zero() => continue,
            Err(e) => return Err(test("poll", e)),
        }
    }
    match sys::take_error(from.as_raw_fd()) {
        Ok(0) => Ok(()),
        Ok(errno) => Err(test("connect", std::io::Error::from_raw_os_error(errno))),
        Err(e) => Err(test("SO_ERROR", e)),
    }
}

/// Whether an unmarked packet toward `client` has any route here.
fn routable(client: IpAddr) -> bool {
    let to = SocketAddr::new(client, 9);
    let ask = || -> std::io::Result<()> {
        let fd = sys::udp_socket(&to)?;
        sys::connect(fd.as_raw_fd(), to)
    };
    ask().is_ok()
}

/// The policy route for replies, without a connection: what `ringtun probe` checks in a
/// namespace without an address to test from.
pub fn check_route() -> Result<(), ReturnPathError> {
    routes_locally(IpAddr::V4(PROBE_CLIENT_V4))
}

/// The route a reply to `client` (IPv4) carrying [`REPLY_MARK`] takes, asked of the kernel
/// without sending anything (a connected UDP socket): a `local` route makes the client itself
/// the source.
fn routes_locally(client: IpAddr) -> Result<(), ReturnPathError> {
    let to = SocketAddr::new(client, 9);
    let ask = || -> std::io::Result<IpAddr> {
        let fd = sys::udp_socket(&to)?;
        sys::set_mark(fd.as_raw_fd(), REPLY_MARK)?;
        // A source that is not local is refused at the route lookup unless transparent.
        sys::set_transparent(fd.as_raw_fd(), to.is_ipv6())?;
        sys::connect(fd.as_raw_fd(), to)?;
        Ok(sys::local_addr(fd.as_raw_fd())?.ip())
    };
    match ask() {
        Ok(source) if source == client => Ok(()),
        Ok(source) => Err(ReturnPathError::NoLocalRoute(format!(
            "they would leave from {source}"
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(ReturnPathError::Transparent(e.to_string()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => {
            Err(ReturnPathError::NoLocalRoute("no route".into()))
        }
        Err(e) => Err(ReturnPathError::Test(client, e.to_string())),
    }
}

/// What `node.deliver_client_address` and the check make of one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// From client addresses.
    FromClient,
    /// From the workload's address: `off`, or `auto` and the check failed (why).
    FromWorkload(Option<ReturnPathError>),
    /// `on` and the check failed: the workload cannot be served as configured.
    Unservable(ReturnPathError),
}

impl Delivery {
    pub fn from_client(&self) -> bool {
        matches!(self, Delivery::FromClient)
    }
}

/// Runs `check` unless the choice is `off`, and says what its answer means.
pub fn decide(
    choice: ClientAddressChoice,
    check: impl FnOnce() -> Result<(), ReturnPathError>,
) -> Delivery {
    match choice {
        ClientAddressChoice::Off => Delivery::FromWorkload(None),
        ClientAddressChoice::On => match check() {
            Ok(()) => Delivery::FromClient,
            Err(e) => Delivery::Unservable(e),
        },
        ClientAddressChoice::Auto => match check() {
            Ok(()) => Delivery::FromClient,
            Err(e) => Delivery::FromWorkload(Some(e)),
        },
    }
}

/// The address a delivery binds: the client's, when this workload delivers client addresses
/// and it is of the upstream's family (an IPv4 client cannot be the source toward an IPv6
/// application); `None` delivers from the workload's address.
pub fn delivery_source(
    enabled: bool,
    client: SocketAddr,
    upstream: SocketAddr,
) -> Option<SocketAddr> {
    let ip = canonical(client.ip());
    (enabled && ip.is_ipv4() == canonical(upstream.ip()).is_ipv4())
        .then(|| SocketAddr::new(ip, client.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_delivery_binds_the_client_only_when_on_and_of_the_same_family() {
        let up4 = addr("10.0.0.2:80");
        let up6 = addr("[fd00::2]:80");
        assert_eq!(
            delivery_source(true, addr("10.0.0.9:4000"), up4),
            Some(addr("10.0.0.9:4000"))
        );
        assert_eq!(delivery_source(false, addr("10.0.0.9:4000"), up4), None);
        assert_eq!(delivery_source(true, addr("10.0.0.9:4000"), up6), None);
        assert_eq!(
            delivery_source(true, addr("[::ffff:10.0.0.9]:4000"), up4),
            Some(addr("10.0.0.9:4000")),
            "a v4-mapped client is the IPv4 client it is"
        );
        assert_eq!(
            delivery_source(true, addr("[fd00::9]:4000"), up6),
            Some(addr("[fd00::9]:4000"))
        );
    }

    #[test]
    fn the_choice_decides_whether_the_check_runs_and_what_its_failure_means() {
        let no_route = || ReturnPathError::NoLocalRoute("no route".into());
        let fails = || Err(no_route());
        let passes = || Ok(());
        assert_eq!(
            decide(ClientAddressChoice::Off, || panic!("off never checks")),
            Delivery::FromWorkload(None)
        );
        assert_eq!(
            decide(ClientAddressChoice::Auto, passes),
            Delivery::FromClient
        );
        assert_eq!(
            decide(ClientAddressChoice::Auto, fails),
            Delivery::FromWorkload(Some(no_route()))
        );
        assert_eq!(
            decide(ClientAddressChoice::On, passes),
            Delivery::FromClient
        );
        assert_eq!(
            decide(ClientAddressChoice::On, fails),
            Delivery::Unservable(no_route())
        );
    }
}
