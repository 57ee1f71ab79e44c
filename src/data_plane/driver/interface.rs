//! What a reactor asks of a driver and what it hears back: the [`Driver`] trait, the
//! [`Event`]s it returns, and the keys that name a flow's sockets in every request. Both
//! drivers implement exactly this, so the reactor and the flows never know which one runs.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

/// A flow's slot in the reactor's slab plus a generation, so a late completion for a flow that
/// has gone (and whose slot was reused) is recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub index: u32,
    pub generation: u32,
}

impl FlowKey {
    /// A key no slab entry ever has (generations start at 1): "not registered yet".
    pub const NONE: FlowKey = FlowKey {
        index: u32::MAX,
        generation: 0,
    };
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
    /// The reactor is about to return: cancel what is still in flight and hand back, in `late`,
    /// the connections accepted meanwhile, so they are refused (a reset, counted) rather than
    /// closed as if served. Nothing to do where accepting happens inside `wait` (epoll).
    fn quiesce(&mut self, late: &mut Vec<Event>) {
        let _ = late;
    }
}
