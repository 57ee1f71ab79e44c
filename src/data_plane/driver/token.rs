//! The 64-bit tag both drivers attach to each request (io_uring `user_data`, epoll `data`):
//! what the request was for, and for which flow and socket.
//!
//! Layout: bits 0..4 operation, 4..6 side and interest, 6..30 slab index (24 bits), 32..64
//! generation.

use super::interface::{FlowKey, Interest, Side};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Accept = 1,
    Connect = 2,
    Poll = 3,
    Waker = 4,
    Timer = 5,
    /// Cancellations and removals: their own completions carry nothing we need.
    Cancel = 6,
}

/// Largest slab index a token can carry.
pub const MAX_INDEX: u32 = (1 << 24) - 1;

pub fn encode(op: Op, side: Side, interest: Interest, index: u32, generation: u32) -> u64 {
    debug_assert!(index <= MAX_INDEX);
    (op as u64)
        | ((side as u64) << 4)
        | ((interest as u64) << 5)
        | (((index & MAX_INDEX) as u64) << 6)
        | ((generation as u64) << 32)
}

pub fn flow(op: Op, key: FlowKey, side: Side, interest: Interest) -> u64 {
    encode(op, side, interest, key.index, key.generation)
}

pub fn simple(op: Op, index: u32) -> u64 {
    encode(op, Side::Downstream, Interest::Read, index, 0)
}

pub struct Decoded {
    pub op: Option<Op>,
    pub side: Side,
    pub interest: Interest,
    pub index: u32,
    pub key: FlowKey,
}

pub fn decode(v: u64) -> Decoded {
    let op = match v & 0xf {
        1 => Some(Op::Accept),
        2 => Some(Op::Connect),
        3 => Some(Op::Poll),
        4 => Some(Op::Waker),
        5 => Some(Op::Timer),
        6 => Some(Op::Cancel),
        _ => None,
    };
    let side = if (v >> 4) & 1 == 0 {
        Side::Downstream
    } else {
        Side::Upstream
    };
    let interest = if (v >> 5) & 1 == 0 {
        Interest::Read
    } else {
        Interest::Write
    };
    let index = ((v >> 6) as u32) & MAX_INDEX;
    let generation = (v >> 32) as u32;
    Decoded {
        op,
        side,
        interest,
        index,
        key: FlowKey { index, generation },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_every_field() {
        let key = FlowKey {
            index: MAX_INDEX,
            generation: u32::MAX,
        };
        let d = decode(flow(Op::Poll, key, Side::Upstream, Interest::Write));
        assert_eq!(d.op, Some(Op::Poll));
        assert_eq!(d.side, Side::Upstream);
        assert_eq!(d.interest, Interest::Write);
        assert_eq!(d.key, key);
        let d = decode(simple(Op::Accept, 7));
        assert_eq!((d.op, d.index), (Some(Op::Accept), 7));
    }
}
