//! Readiness drivers: the only code that talks to io_uring or epoll. A reactor asks a driver to
//! accept on listeners, connect sockets, watch sockets for readiness and sleep until a deadline;
//! the driver answers with [`Event`]s. Both drivers run the same connection state machines, so the
//! data path behaves the same whichever one the kernel allows.
//!
//! Bytes never move through a driver: `splice(2)` is called inline by the flow after readiness.

pub mod backoff;
pub mod epoll;
pub mod token;
pub mod uring;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use crate::control_plane::config::DriverChoice;

/// A flow's slot in the reactor's slab plus a generation, so a late completion for a flow that
/// has gone (and whose slot was reused) is recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub index: u32,
    pub generation: u32,
}

/// Which socket of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream = 0,
    Upstream = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    Read = 0,
    Write = 1,
}

impl Interest {
    pub fn poll_mask(self) -> u32 {
        match self {
            Interest::Read => (libc::POLLIN | libc::POLLRDHUP) as u32,
            Interest::Write => libc::POLLOUT as u32,
        }
    }
}

/// Bit of a flow's `armed` set for one (side, interest) pair.
pub fn armed_bit(side: Side, interest: Interest) -> u8 {
    1 << ((side as u8) * 2 + interest as u8)
}

#[derive(Debug)]
pub enum Event {
    /// A connection accepted on listener `listener` (non-blocking, close-on-exec).
    Accepted { listener: usize, fd: OwnedFd },
    /// Accepting on `listener` failed (EMFILE, ENFILE, …); the driver keeps accepting.
    AcceptFailed { listener: usize, errno: i32 },
    /// The connect started for this flow finished: `Ok` or the errno.
    Connected {
        flow: FlowKey,
        result: Result<(), i32>,
    },
    /// A socket of this flow is ready (or in error) for the given interest.
    Ready {
        flow: FlowKey,
        side: Side,
        interest: Interest,
    },
    /// The reactor's waker fired (a control message is waiting).
    Woken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    IoUring,
    Epoll,
}

impl DriverKind {
    pub fn label(self) -> &'static str {
        match self {
            DriverKind::IoUring => "io_uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

pub trait Driver {
    fn kind(&self) -> DriverKind;
    /// Start accepting on a listening socket; accepted sockets arrive as [`Event::Accepted`].
    fn watch_listener(&mut self, listener: usize, fd: RawFd) -> io::Result<()>;
    /// Stop accepting on a listener (before it is closed).
    fn unwatch_listener(&mut self, listener: usize, fd: RawFd);
    /// Watch the reactor's eventfd; each write to it yields [`Event::Woken`].
    fn watch_waker(&mut self, fd: RawFd) -> io::Result<()>;
    /// Flow sockets: called once per socket before any `arm`.
    fn register(&mut self, flow: FlowKey, side: Side, fd: RawFd) -> io::Result<()>;
    /// Start a non-blocking connect of `fd` (already registered as the upstream side).
    fn connect(&mut self, flow: FlowKey, fd: RawFd, addr: SocketAddr) -> io::Result<()>;
    /// Ask for one readiness event. Returns true when the driver now holds an armed request that
    /// must be disarmed before the socket is closed (io_uring); false when readiness is
    /// edge-triggered and permanent (epoll).
    fn arm(&mut self, flow: FlowKey, side: Side, interest: Interest, fd: RawFd) -> bool;
    /// True when an armed readiness request checks the socket's state at arming time (a level
    /// check), so a socket that still has data is reported at once; false for edge-triggered
    /// readiness, where only new data is reported.
    fn arming_checks_level(&self) -> bool;
    /// Drop the armed requests in `armed` (bits from [`armed_bit`]) and any pending connect, before
    /// the flow's sockets are closed.
    fn release(&mut self, flow: FlowKey, armed: u8, connecting: bool);
    /// Wait for events until `timeout` (None = until something happens).
    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()>;
}

/// What one reactor should run, decided once per process (see [`plan`]).
#[derive(Debug, Clone)]
pub enum DriverPlan {
    IoUring {
        multishot_accept: bool,
        fall_back: bool,
    },
    Epoll {
        reason: String,
    },
}

/// Turns the configured choice into a plan, probing the ring once. A forced `io_uring` that the
/// kernel cannot give is an error; `auto` falls back to epoll and says why.
pub fn plan(choice: DriverChoice) -> Result<(DriverPlan, String), String> {
    use crate::kernel_features::{decide_driver, Driver as Probed};
    match choice {
        DriverChoice::Epoll => Ok((
            DriverPlan::Epoll {
                reason: "forced by configuration".into(),
            },
            "forced by configuration".into(),
        )),
        DriverChoice::IoUring | DriverChoice::Auto => {
            let d = decide_driver();
            match (d.driver, choice) {
                (Probed::IoUring, _) => Ok((
                    DriverPlan::IoUring {
                        multishot_accept: d.multishot_accept,
                        fall_back: choice == DriverChoice::Auto,
                    },
                    d.reason,
                )),
                (Probed::Epoll, DriverChoice::Auto) => Ok((
                    DriverPlan::Epoll {
                        reason: d.reason.clone(),
                    },
                    d.reason,
                )),
                (Probed::Epoll, _) => Err(format!(
                    "io_uring was asked for but is unusable: {}",
                    d.reason
                )),
            }
        }
    }
}

/// Creates one reactor's driver from the plan; if the ring cannot be set up on this thread
/// (memory limits can differ from the probe's), `auto` still falls back to epoll.
pub fn create(plan: &DriverPlan, entries: u32) -> io::Result<(Box<dyn Driver>, Option<String>)> {
    match plan {
        DriverPlan::Epoll { reason } => {
            Ok((Box::new(epoll::EpollDriver::new()?), Some(reason.clone())))
        }
        DriverPlan::IoUring {
            multishot_accept,
            fall_back,
        } => match uring::UringDriver::new(entries, *multishot_accept) {
            Ok(d) => {
                // One line per reactor (the logger names the thread): which request modes
                // this ring runs; `ringtun_io_uring_accepts_total{mode}` counts what they did.
                log::info!("{}", uring_modes(*multishot_accept));
                Ok((Box::new(d), None))
            }
            Err(e) if *fall_back => {
                let reason = crate::kernel_features::io_uring_setup_error(&e);
                Ok((Box::new(epoll::EpollDriver::new()?), Some(reason)))
            }
            Err(e) => Err(io::Error::new(
                e.kind(),
                crate::kernel_features::io_uring_setup_error(&e),
            )),
        },
    }
}

/// The io_uring driver's request modes, as its start-up line states them. Readiness is a
/// one-shot `PollAdd` on every kernel, also where multishot poll exists (5.13+): the flows
/// rely on its level check when armed (`Driver::arming_checks_level`).
fn uring_modes(multishot_accept: bool) -> &'static str {
    if multishot_accept {
        "io_uring driver: multishot accept (one request per listener keeps accepting); \
         readiness by one-shot PollAdd, re-armed per event"
    } else {
        "io_uring driver: single-shot accept, re-armed after every connection (the kernel \
         refused multishot accept, which arrived in 5.19); readiness by one-shot PollAdd, \
         re-armed per event"
    }
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
