//! One proxied connection: the accepted (downstream) socket, the upstream socket, and the two
//! [`Pump`]s between them. The flow knows nothing of io_uring or epoll; the reactor calls
//! [`Flow::drive`] after readiness and arms whatever the flow says it waits for.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::authorization::Admission;
use super::driver::{armed_bit, FlowKey, Interest, Side};
use super::first_connection::Resolution;
use super::splice::{Moved, PipePool, Pump, PumpError, PumpStatus};
use crate::observability::access_log::FlowRecord;
use crate::observability::metrics::{CloseKind, FailureKind, ReactorMetrics, TcpCounters};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The upstream connect is in flight; no byte moves yet.
    Connecting,
    Open,
}

pub struct Flow {
    pub key: FlowKey,
    pub down: OwnedFd,
    pub up: OwnedFd,
    pub phase: Phase,
    /// Client → upstream.
    pub to_upstream: Pump,
    /// Upstream → client.
    pub to_downstream: Pump,
    /// Readiness requests the driver holds for this flow (bits from `armed_bit`).
    pub armed: u8,
    /// Queued to run again without waiting (it used its budget).
    pub queued: bool,
    pub started: Instant,
    pub last_active: Instant,
    pub resolution: Resolution,
    /// Inbound plaintext: what authorization admitted it on (a reload decides it again).
    pub admission: Option<Admission>,
    /// The local workload it belongs to (`namespace/name`; the source of an outbound flow,
    /// the destination of an inbound one): a reload that takes it off this node drains it.
    pub owner: Arc<str>,
    /// A drain deadline is set (its workload left this node).
    pub draining: bool,
    pub counters: Arc<TcpCounters>,
    pub record: FlowRecord,
}

/// Which directions a wakeup should pump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Directions {
    pub to_upstream: bool,
    pub to_downstream: bool,
}

impl Directions {
    pub const BOTH: Directions = Directions {
        to_upstream: true,
        to_downstream: true,
    };

    /// The direction a readiness event moves: the client readable or the upstream writable
    /// feed client → upstream; the other two feed upstream → client.
    pub fn for_event(side: Side, interest: Interest) -> Directions {
        let to_upstream = matches!(
            (side, interest),
            (Side::Downstream, Interest::Read) | (Side::Upstream, Interest::Write)
        );
        Directions {
            to_upstream,
            to_downstream: !to_upstream,
        }
    }
}

/// What the flow needs next.
#[derive(Debug)]
pub enum Step {
    Continue { wants: Wants, yielded: bool },
    Finished(End),
}

/// Up to two readiness interests (one per direction).
#[derive(Debug, Default)]
pub struct Wants {
    items: [Option<(Side, Interest)>; 2],
}

impl Wants {
    fn push(&mut self, w: (Side, Interest)) {
        if self.items[0].is_none() {
            self.items[0] = Some(w);
        } else {
            self.items[1] = Some(w);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (Side, Interest)> + '_ {
        self.items.iter().flatten().copied()
    }
}

/// How a flow ended, from the data path's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions delivered their EOF.
    Clean,
    /// `failed` side broke (reset or error); the other side gets a reset.
    Broken {
        failed: Side,
        kind: FailureKind,
        errno: i32,
    },
    /// ringtun ended it (idle timeout, drain deadline): both sides are reset, so no client can
    /// take a cut-off stream for a complete one.
    Cut(CloseKind),
}

impl Flow {
    /// Moves bytes both ways, at most `budget` bytes read per direction.
    pub fn drive(
        &mut self,
        which: Directions,
        short_read_drains: bool,
        pool: &mut PipePool,
        budget: usize,
        metrics: &ReactorMetrics,
        now: Instant,
    ) -> Step {
        let (down, up) = (self.down.as_raw_fd(), self.up.as_raw_fd());
        let mut to_up = Moved::default();
        let mut to_down = Moved::default();
        // A readiness event concerns one direction; pumping the other would only cost two
        // splice calls that return EAGAIN.
        let a = if which.to_upstream {
            self.to_upstream
                .pump(down, up, pool, budget, short_read_drains, &mut to_up)
        } else {
            Ok(self.to_upstream.last_status())
        };
        let b = if which.to_downstream {
            self.to_downstream
                .pump(up, down, pool, budget, short_read_drains, &mut to_down)
        } else {
            Ok(self.to_downstream.last_status())
        };
        // Count on every splice, not at the end, so a long flow's bytes show up as they move.
        if to_up.0 > 0 {
            self.counters.received_bytes.fetch_add(to_up.0, Relaxed);
            metrics.splice_bytes_to_upstream.fetch_add(to_up.0, Relaxed);
            self.record.bytes_to_upstream += to_up.0;
        }
        if to_down.0 > 0 {
            self.counters.sent_bytes.fetch_add(to_down.0, Relaxed);
            metrics
                .splice_bytes_to_downstream
                .fetch_add(to_down.0, Relaxed);
            self.record.bytes_to_downstream += to_down.0;
        }
        if to_up.0 + to_down.0 > 0 {
            self.last_active = now;
        }
        let (a, b) = match (a, b) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) => return Step::Finished(broken(e, Side::Downstream, Side::Upstream)),
            (_, Err(e)) => return Step::Finished(broken(e, Side::Upstream, Side::Downstream)),
        };
        if a == PumpStatus::Done && b == PumpStatus::Done {
            return Step::Finished(End::Clean);
        }
        let mut wants = Wants::default();
        let mut yielded = false;
        match a {
            PumpStatus::WantRead => wants.push((Side::Downstream, Interest::Read)),
            PumpStatus::WantWrite => wants.push((Side::Upstream, Interest::Write)),
            PumpStatus::Yield => yielded = true,
            PumpStatus::Done => {}
        }
        match b {
            PumpStatus::WantRead => wants.push((Side::Upstream, Interest::Read)),
            PumpStatus::WantWrite => wants.push((Side::Downstream, Interest::Write)),
            PumpStatus::Yield => yielded = true,
            PumpStatus::Done => {}
        }
        Step::Continue { wants, yielded }
    }

    pub fn is_armed(&self, side: Side, interest: Interest) -> bool {
        self.armed & armed_bit(side, interest) != 0
    }
}

/// Maps a pump error to the side that broke. `src`/`dst` are the pump's source and destination.
fn broken(e: PumpError, src: Side, dst: Side) -> End {
    let kind_for = |side: Side| match side {
        Side::Downstream => FailureKind::DownstreamReset,
        Side::Upstream => FailureKind::UpstreamReset,
    };
    match e {
        PumpError::Source(errno) => End::Broken {
            failed: src,
            kind: kind_for(src),
            errno,
        },
        PumpError::Destination(errno) => End::Broken {
            failed: dst,
            kind: kind_for(dst),
            errno,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_side_that_broke_is_the_one_named() {
        let (down, up) = (Side::Downstream, Side::Upstream);
        assert!(matches!(
            broken(PumpError::Source(libc::ECONNRESET), down, up),
            End::Broken {
                failed: Side::Downstream,
                kind: FailureKind::DownstreamReset,
                errno: libc::ECONNRESET
            }
        ));
        assert!(matches!(
            broken(PumpError::Destination(libc::EPIPE), down, up),
            End::Broken {
                failed: Side::Upstream,
                kind: FailureKind::UpstreamReset,
                errno: libc::EPIPE
            }
        ));
    }
}
