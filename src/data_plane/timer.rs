//! What a reactor's timer heap holds: a deadline for one keyed object (flow, stream or
//! tunnel) and what kind of deadline it is. Entries for objects that are gone (their key's
//! generation no longer matches) are skipped when they fire.

use std::time::Instant;

use super::driver::FlowKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// Connect deadline: a flow's upstream connect, an inbound stream's destination connect, an
    /// outbound stream waiting for its tunnel and answer, a tunnel's connect and handshake.
    Connect,
    /// A flow or stream without a byte either way for `timeouts.idle`.
    Idle,
    /// A tunnel session's keepalive deadline.
    Session,
    /// A politely closing tunnel waits this long for the peer's FIN.
    Linger,
    /// A flow or stream of a workload a reload took off this node: reset when it comes.
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    pub at: Instant,
    pub index: u32,
    pub generation: u32,
    pub kind: TimerKind,
}

impl Timer {
    pub fn new(key: FlowKey, at: Instant, kind: TimerKind) -> Timer {
        Timer {
            at,
            index: key.index,
            generation: key.generation,
            kind,
        }
    }

    pub fn key(&self) -> FlowKey {
        FlowKey {
            index: self.index,
            generation: self.generation,
        }
    }
}
