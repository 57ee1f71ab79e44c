//! HPACK (RFC 7541): the header compression HTTP/2 requires.
//!
//! The [`Decoder`] handles everything a compliant peer may send: indexed fields, literals with
//! and without indexing, never-indexed literals, Huffman strings, the dynamic table with
//! eviction, and dynamic table size updates. The [`Encoder`] is minimal on purpose: it never
//! inserts into the dynamic table (a CONNECT request has a handful of short fields, and an
//! encoder that never indexes cannot be used to probe other streams' headers), uses the static
//! table where a name or field matches, and Huffman-codes strings when that is shorter.
//! Any decoding error is a connection error of type COMPRESSION_ERROR (RFC 9113 §4.3).

mod decoder;
mod encoder;
pub mod huffman;
mod table;

pub use decoder::{DecodedBlock, Decoder};
pub use encoder::Encoder;

/// One header field: lower-case name and raw value bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

impl Field {
    pub fn new(name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Field {
        Field {
            name: name.into(),
            value: value.into(),
        }
    }

    /// The size RFC 7541 §4.1 defines: name + value + 32 (also SETTINGS_MAX_HEADER_LIST_SIZE's unit).
    pub fn size(&self) -> usize {
        entry_size(&self.name, &self.value)
    }
}

pub(crate) fn entry_size(name: &[u8], value: &[u8]) -> usize {
    //= rfc7541#section-4.1
    //# The size of an entry is the sum of its name's length in octets (as
    //# defined in Section 5.2), its value's length in octets, and 32.
    name.len() + value.len() + 32
}

/// A malformed header block. Always a connection error of type COMPRESSION_ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("HPACK block ends in the middle of a representation")]
    Truncated,
    #[error("HPACK integer overflows")]
    IntegerOverflow,
    #[error("HPACK index {0} is not in the static or dynamic table")]
    InvalidIndex(usize),
    #[error("invalid Huffman-coded string")]
    InvalidHuffman,
    #[error("dynamic table size update to {0} exceeds the limit we advertised")]
    TableSizeTooLarge(usize),
    #[error("dynamic table size update after the first field of a block")]
    LateTableSizeUpdate,
}
