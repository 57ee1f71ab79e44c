//! How a reactor names what it holds: a [`FlowKey`] whose top index bits say which slab the
//! slot is in (plain flows, tunnel-carried connections, tunnels), so one token format and one
//! timer heap serve all three, and a generation so a late event for an entry that is gone —
//! its slot reused — finds nothing.

use slab::Slab;

use crate::data_plane::driver::FlowKey;

/// What a key's slot belongs to. Keys carry it in the top bits of their index, so one token
/// format serves plain flows, tunnel-carried flows and tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Direct,
    Stream,
    Tunnel,
}

const KIND_SHIFT: u32 = 22;
pub(super) const SLOT_MASK: u32 = (1 << KIND_SHIFT) - 1;

pub(super) fn kind_of(key: FlowKey) -> Kind {
    match key.index >> KIND_SHIFT {
        0 => Kind::Direct,
        1 => Kind::Stream,
        _ => Kind::Tunnel,
    }
}

/// What the reactor keeps in a slab under a `FlowKey`: plain flows, flows on streams, tunnels.
pub(super) trait Keyed {
    fn key(&self) -> FlowKey;
}

/// The entry `key` names: its slot, and only while the generation matches (a reused slot
/// holds another flow, and a late event for the old one must not reach it).
pub(super) fn entry<T: Keyed>(slab: &Slab<T>, key: FlowKey) -> Option<&T> {
    slab.get(slot(key)).filter(|e| e.key() == key)
}

/// [`entry`], mutable.
pub(super) fn entry_mut<T: Keyed>(slab: &mut Slab<T>, key: FlowKey) -> Option<&mut T> {
    slab.get_mut(slot(key)).filter(|e| e.key() == key)
}

pub(super) fn slot(key: FlowKey) -> usize {
    (key.index & SLOT_MASK) as usize
}

pub(super) fn make_key(kind: Kind, slot: usize, generation: u32) -> FlowKey {
    let tag = match kind {
        Kind::Direct => 0,
        Kind::Stream => 1,
        Kind::Tunnel => 2,
    };
    FlowKey {
        index: (tag << KIND_SHIFT) | (slot as u32 & SLOT_MASK),
        generation,
    }
}
