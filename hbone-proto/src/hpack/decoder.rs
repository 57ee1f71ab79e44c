//! The HPACK decoder.

use super::table::{DynamicTable, STATIC};
use super::{entry_size, huffman, Field, HpackError};

/// A decoded header block.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DecodedBlock {
    /// The fields in order. Once the list would exceed the size limit, further fields are
    /// decoded (to keep the dynamic table in step with the peer) but not kept.
    pub fields: Vec<Field>,
    /// The header list size (RFC 9113 §6.5.2 units) of the whole block, kept or not.
    pub list_size: usize,
    /// Whether `list_size` exceeded the limit passed to [`Decoder::decode`].
    pub over_limit: bool,
}

/// Decoder state for one direction of one connection.
#[derive(Debug)]
pub struct Decoder {
    table: DynamicTable,
    /// The SETTINGS_HEADER_TABLE_SIZE we advertised: the most the peer may ask for.
    max_allowed: usize,
}

impl Decoder {
    /// `max_table_size` is the SETTINGS_HEADER_TABLE_SIZE this side advertises.
    pub fn new(max_table_size: usize) -> Decoder {
        Decoder {
            table: DynamicTable::new(max_table_size),
            max_allowed: max_table_size,
        }
    }

    /// Decodes one complete header block (all HEADERS/CONTINUATION fragments joined).
    pub fn decode(
        &mut self,
        mut src: &[u8],
        max_list_size: usize,
    ) -> Result<DecodedBlock, HpackError> {
        let mut out = DecodedBlock::default();
        let mut seen_field = false;
        while let Some(&first) = src.first() {
            if first & 0x80 != 0 {
                //= rfc7541#section-6.1
                //# The index value of 0 is not used.  It MUST be treated as a decoding
                //# error if found in an indexed header field representation.
                let (idx, rest) = decode_int(src, 7)?;
                src = rest;
                let (n, v) = self.lookup(idx)?;
                let (n, v) = (n.to_vec(), v.to_vec());
                push(&mut out, n, v, max_list_size);
                seen_field = true;
            } else if first & 0xe0 == 0x20 {
                //= rfc7541#section-4.2
                //# This dynamic table size
                //# update MUST occur at the beginning of the first header block
                //# following the change to the dynamic table size.
                if seen_field {
                    return Err(HpackError::LateTableSizeUpdate);
                }
                let (size, rest) = decode_int(src, 5)?;
                src = rest;
                //= rfc7541#section-6.3
                //# The new maximum size MUST be lower than or equal to the limit
                //# determined by the protocol using HPACK.  A value that exceeds this
                //# limit MUST be treated as a decoding error.
                if size > self.max_allowed {
                    return Err(HpackError::TableSizeTooLarge(size));
                }
                self.table.set_max_size(size);
            } else {
                // Literal: with incremental indexing (01), without (0000) or never indexed (0001).
                let (prefix, index) = if first & 0xc0 == 0x40 {
                    (6, true)
                } else {
                    (4, false)
                };
                let (idx, rest) = decode_int(src, prefix)?;
                src = rest;
                let name = if idx == 0 {
                    let (name, rest) = decode_string(src)?;
                    src = rest;
                    name
                } else {
                    self.lookup(idx)?.0.to_vec()
                };
                let (value, rest) = decode_string(src)?;
                src = rest;
                if index {
                    self.table.insert(name.clone(), value.clone());
                }
                push(&mut out, name, value, max_list_size);
                seen_field = true;
            }
        }
        Ok(out)
    }

    fn lookup(&self, idx: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match idx {
            0 => Err(HpackError::InvalidIndex(0)),
            1..=61 => {
                let (n, v) = STATIC[idx - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => self
                .table
                .get(idx - 62)
                .ok_or(HpackError::InvalidIndex(idx)),
        }
    }

    #[cfg(test)]
    pub(crate) fn table(&self) -> &DynamicTable {
        &self.table
    }
}

fn push(out: &mut DecodedBlock, name: Vec<u8>, value: Vec<u8>, max_list_size: usize) {
    out.list_size = out.list_size.saturating_add(entry_size(&name, &value));
    if out.list_size > max_list_size {
        out.over_limit = true;
        out.fields.clear();
    }
    if !out.over_limit {
        out.fields.push(Field { name, value });
    }
}

/// Decodes an integer with an `n`-bit prefix (RFC 7541 §5.1).
pub(crate) fn decode_int(src: &[u8], n: u32) -> Result<(usize, &[u8]), HpackError> {
    let mask = (1u16 << n) as usize - 1;
    let (&first, mut rest) = src.split_first().ok_or(HpackError::Truncated)?;
    let mut value = (first as usize & mask) as u64;
    if value < mask as u64 {
        return Ok((value as usize, rest));
    }
    let mut shift = 0u32;
    loop {
        let (&b, r) = rest.split_first().ok_or(HpackError::Truncated)?;
        rest = r;
        // Four continuation bytes already reach 2^28; a longer integer is no table index,
        // size or string length we would accept.
        if shift > 28 {
            return Err(HpackError::IntegerOverflow);
        }
        value += ((b & 0x7f) as u64) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return usize::try_from(value)
                .map(|v| (v, rest))
                .map_err(|_| HpackError::IntegerOverflow);
        }
    }
}

fn decode_string(src: &[u8]) -> Result<(Vec<u8>, &[u8]), HpackError> {
    let huff = src.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let (len, rest) = decode_int(src, 7)?;
    if rest.len() < len {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = rest.split_at(len);
    let s = if huff {
        let mut out = Vec::with_capacity(len * 8 / 5);
        huffman::decode(raw, &mut out)?;
        out
    } else {
        raw.to_vec()
    };
    Ok((s, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn fields(block: &DecodedBlock) -> Vec<(String, String)> {
        block
            .fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.clone()).unwrap(),
                    String::from_utf8(f.value.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn c2_1_literal_with_indexing() {
        let mut d = Decoder::new(4096);
        let b = d
            .decode(
                &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
                1 << 20,
            )
            .unwrap();
        assert_eq!(fields(&b), pairs(&[("custom-key", "custom-header")]));
        assert_eq!(d.table().size(), 55);
    }

    #[test]
    fn c2_2_literal_without_indexing() {
        let mut d = Decoder::new(4096);
        let b = d
            .decode(&hex("040c 2f73 616d 706c 652f 7061 7468"), 1 << 20)
            .unwrap();
        assert_eq!(fields(&b), pairs(&[(":path", "/sample/path")]));
        assert_eq!(d.table().len(), 0);
    }

    #[test]
    fn c2_3_literal_never_indexed() {
        let mut d = Decoder::new(4096);
        let b = d
            .decode(&hex("1008 7061 7373 776f 7264 0673 6563 7265 74"), 1 << 20)
            .unwrap();
        assert_eq!(fields(&b), pairs(&[("password", "secret")]));
        assert_eq!(d.table().len(), 0);
    }

    #[test]
    fn c2_4_indexed_field() {
        let mut d = Decoder::new(4096);
        let b = d.decode(&hex("82"), 1 << 20).unwrap();
        assert_eq!(fields(&b), pairs(&[(":method", "GET")]));
    }

    /// C.3 (plain) and C.4 (Huffman): three requests sharing one dynamic table.
    fn requests(blocks: [&str; 3]) {
        let mut d = Decoder::new(4096);
        let expect = [
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ],
        ];
        let sizes = [57, 110, 164];
        for i in 0..3 {
            let b = d.decode(&hex(blocks[i]), 1 << 20).unwrap();
            assert_eq!(fields(&b), pairs(&expect[i]), "request {}", i + 1);
            assert_eq!(d.table().size(), sizes[i], "request {}", i + 1);
        }
    }

    #[test]
    fn c3_requests_without_huffman() {
        requests([
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ]);
    }

    #[test]
    fn c4_requests_with_huffman() {
        requests([
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ]);
    }

    /// C.5 (plain) and C.6 (Huffman): three responses with a 256-byte table, so entries get evicted.
    fn responses(blocks: [&str; 3]) {
        let mut d = Decoder::new(256);
        let date1 = "Mon, 21 Oct 2013 20:13:21 GMT";
        let date2 = "Mon, 21 Oct 2013 20:13:22 GMT";
        let loc = "https://www.example.com";
        let cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
        let expect = [
            vec![
                (":status", "302"),
                ("cache-control", "private"),
                ("date", date1),
                ("location", loc),
            ],
            vec![
                (":status", "307"),
                ("cache-control", "private"),
                ("date", date1),
                ("location", loc),
            ],
            vec![
                (":status", "200"),
                ("cache-control", "private"),
                ("date", date2),
                ("location", loc),
                ("content-encoding", "gzip"),
                ("set-cookie", cookie),
            ],
        ];
        let sizes = [222, 222, 215];
        for i in 0..3 {
            let b = d.decode(&hex(blocks[i]), 1 << 20).unwrap();
            assert_eq!(fields(&b), pairs(&expect[i]), "response {}", i + 1);
            assert_eq!(d.table().size(), sizes[i], "response {}", i + 1);
        }
    }

    #[test]
    fn c5_responses_without_huffman() {
        responses([
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
             5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
             3d31",
        ]);
    }

    #[test]
    fn c6_responses_with_huffman() {
        responses([
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ffc1 c0bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
             77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
             9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ]);
    }

    #[test]
    fn index_zero_is_an_error() {
        assert_eq!(
            Decoder::new(4096).decode(&[0x80], 1 << 20),
            Err(HpackError::InvalidIndex(0))
        );
    }

    #[test]
    fn index_beyond_tables_is_an_error() {
        assert_eq!(
            Decoder::new(4096).decode(&[0xbe], 1 << 20),
            Err(HpackError::InvalidIndex(62))
        );
    }

    #[test]
    fn size_update_above_advertised_limit_is_an_error() {
        // 001 prefix, 5-bit integer 4097 = 31 + 4066 → 0x3f, 0xe2, 0x1f
        assert_eq!(
            Decoder::new(4096).decode(&[0x3f, 0xe2, 0x1f], 1 << 20),
            Err(HpackError::TableSizeTooLarge(4097))
        );
    }

    #[test]
    fn size_update_after_a_field_is_an_error() {
        assert_eq!(
            Decoder::new(4096).decode(&[0x82, 0x20], 1 << 20),
            Err(HpackError::LateTableSizeUpdate)
        );
    }

    #[test]
    fn size_update_to_zero_empties_the_table() {
        let mut d = Decoder::new(4096);
        d.decode(
            &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
            1 << 20,
        )
        .unwrap();
        assert_eq!(d.table().len(), 1);
        d.decode(&[0x20], 1 << 20).unwrap();
        assert_eq!(d.table().len(), 0);
    }

    #[test]
    fn truncated_block_is_an_error() {
        assert_eq!(
            Decoder::new(4096).decode(&[0x40, 0x05, b'a'], 1 << 20),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            Decoder::new(4096).decode(&[0xff], 1 << 20),
            Err(HpackError::Truncated)
        );
    }

    #[test]
    fn huge_integer_is_an_error() {
        let src = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(
            Decoder::new(4096).decode(&src, 1 << 20),
            Err(HpackError::IntegerOverflow)
        );
    }

    #[test]
    fn list_over_limit_is_flagged_but_table_stays_in_step() {
        let mut d = Decoder::new(4096);
        let b = d
            .decode(
                &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572 82"),
                60,
            )
            .unwrap();
        assert!(b.over_limit);
        assert!(b.fields.is_empty());
        assert_eq!(b.list_size, 55 + 42);
        assert_eq!(d.table().len(), 1);
    }
}
