//! A minimal HPACK encoder: static-table references and literals without indexing.

use super::table::STATIC;
use super::{huffman, Field};

/// Encoder state for one direction of one connection. It never inserts into the dynamic
/// table, so its only state is a pending dynamic table size update.
#[derive(Debug)]
pub struct Encoder {
    /// The table size the peer's decoder currently assumes.
    table_size: usize,
    /// A size update to put at the start of the next block.
    pending_update: Option<usize>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder {
            //= rfc9113#section-6.5.2
            //# SETTINGS_HEADER_TABLE_SIZE (0x01):  This setting allows the sender to
            //# inform the remote endpoint of the maximum size of the compression
            //# table used to decode field blocks, in units of octets.
            //# [...] The initial value is 4,096 octets.
            table_size: 4096,
            pending_update: None,
        }
    }

    /// The peer advertised SETTINGS_HEADER_TABLE_SIZE `size`.
    ///
    /// The peer's decoder keeps using the size we last signalled, which must not exceed its
    /// new limit; since this encoder never indexes, shrinking the table to the new limit costs
    /// nothing, so the update is signalled whenever the limit drops below the current size.
    pub fn peer_table_size(&mut self, size: usize) {
        if size < self.table_size {
            self.table_size = size;
            self.pending_update = Some(size);
        }
    }

    /// Appends the encoding of `fields` as one header block.
    pub fn encode<'a>(&mut self, fields: impl IntoIterator<Item = &'a Field>, out: &mut Vec<u8>) {
        //= rfc7541#section-4.2
        //# This dynamic table size
        //# update MUST occur at the beginning of the first header block
        //# following the change to the dynamic table size.
        if let Some(size) = self.pending_update.take() {
            encode_int(size, 5, 0x20, out);
        }
        for f in fields {
            self.encode_field(f, out);
        }
    }

    fn encode_field(&self, f: &Field, out: &mut Vec<u8>) {
        let mut name_idx = 0;
        for (i, (n, v)) in STATIC.iter().enumerate() {
            if n.as_bytes() == f.name.as_slice() {
                if v.as_bytes() == f.value.as_slice() {
                    encode_int(i + 1, 7, 0x80, out);
                    return;
                }
                if name_idx == 0 {
                    name_idx = i + 1;
                }
            }
        }
        // Literal without indexing (0000 prefix).
        encode_int(name_idx, 4, 0x00, out);
        if name_idx == 0 {
            encode_string(&f.name, out);
        }
        encode_string(&f.value, out);
    }
}

/// Appends an integer with an `n`-bit prefix; `flags` fills the bits above the prefix.
pub(crate) fn encode_int(mut value: usize, n: u32, flags: u8, out: &mut Vec<u8>) {
    let mask = (1usize << n) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    let hlen = huffman::encoded_len(s);
    if hlen < s.len() {
        encode_int(hlen, 7, 0x80, out);
        huffman::encode(s, out);
    } else {
        encode_int(s.len(), 7, 0x00, out);
        out.extend_from_slice(s);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Decoder;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn integer_examples_from_rfc7541_c1() {
        let mut out = Vec::new();
        encode_int(10, 5, 0, &mut out);
        assert_eq!(out, [0x0a]);
        out.clear();
        encode_int(1337, 5, 0, &mut out);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        out.clear();
        encode_int(42, 8, 0, &mut out);
        assert_eq!(out, [0x2a]);
    }

    #[test]
    fn static_matches_are_indexed() {
        let mut out = Vec::new();
        Encoder::new().encode(&[Field::new(":status", "200")], &mut out);
        assert_eq!(out, [0x88]);
    }

    #[test]
    fn lowered_table_size_is_signalled_once_at_block_start() {
        let mut e = Encoder::new();
        e.peer_table_size(0);
        let mut out = Vec::new();
        e.encode(&[Field::new(":status", "200")], &mut out);
        assert_eq!(out, [0x20, 0x88]);
        out.clear();
        e.encode(&[Field::new(":status", "200")], &mut out);
        assert_eq!(out, [0x88]);
    }

    proptest! {
        #[test]
        fn encoded_fields_decode_to_the_same_fields(
            fields in proptest::collection::vec(
                (proptest::sample::select(vec![":method", ":authority", "forwarded", "x-custom", ":status"]),
                 proptest::collection::vec(any::<u8>(), 0..40)),
                0..8)
        ) {
            let fields: Vec<Field> = fields.into_iter().map(|(n, v)| Field::new(n, v)).collect();
            let mut e = Encoder::new();
            let mut d = Decoder::new(4096);
            for _ in 0..2 {
                let mut out = Vec::new();
                e.encode(&fields, &mut out);
                let block = d.decode(&out, usize::MAX).unwrap();
                prop_assert_eq!(&block.fields, &fields);
            }
        }
    }
}
