//! The HPACK Huffman code (RFC 7541 §5.2 and Appendix B).
//!
//! The code is canonical: sorting the 257 symbols by (code length, symbol) and counting up
//! gives exactly Appendix B's codes. So only the lengths are written here; the codes, and the
//! per-length ranges the decoder uses, are derived from them once.

use super::HpackError;
use std::sync::OnceLock;

/// Appendix B's code lengths in bits, for symbols 0..=255 and EOS (256).
#[rustfmt::skip]
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
];

const EOS: u16 = 256;
const MAX_LEN: usize = 30;

struct Code {
    /// Code of each symbol, right-aligned.
    codes: [u32; 257],
    /// For each length: the first code of that length, how many codes have it, and where its
    /// symbols start in `sorted`.
    first_code: [u32; MAX_LEN + 1],
    count: [u16; MAX_LEN + 1],
    first_index: [u16; MAX_LEN + 1],
    /// Symbols sorted by (length, symbol).
    sorted: [u16; 257],
}

fn code() -> &'static Code {
    static CODE: OnceLock<Code> = OnceLock::new();
    CODE.get_or_init(|| {
        let mut count = [0u16; MAX_LEN + 1];
        for &l in &LENGTHS {
            count[l as usize] += 1;
        }
        let mut first_code = [0u32; MAX_LEN + 1];
        let mut first_index = [0u16; MAX_LEN + 1];
        let (mut c, mut idx) = (0u32, 0u16);
        for len in 1..=MAX_LEN {
            c = (c + count[len - 1] as u32) << 1;
            first_code[len] = c;
            first_index[len] = idx;
            idx += count[len];
        }
        let mut sorted = [0u16; 257];
        let mut next = first_index;
        let mut codes = [0u32; 257];
        for len in 1..=MAX_LEN {
            let mut code = first_code[len];
            for sym in 0..257u16 {
                if LENGTHS[sym as usize] as usize == len {
                    codes[sym as usize] = code;
                    code += 1;
                    sorted[next[len] as usize] = sym;
                    next[len] += 1;
                }
            }
        }
        Code {
            codes,
            first_code,
            count,
            first_index,
            sorted,
        }
    })
}

/// Number of bytes `src` takes Huffman-encoded.
pub fn encoded_len(src: &[u8]) -> usize {
    let bits: usize = src.iter().map(|&b| LENGTHS[b as usize] as usize).sum();
    bits.div_ceil(8)
}

/// Appends the Huffman encoding of `src`, padded with the most significant bits of EOS.
pub fn encode(src: &[u8], out: &mut Vec<u8>) {
    let code = code();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in src {
        let len = LENGTHS[b as usize] as u32;
        acc = (acc << len) | code.codes[b as usize] as u64;
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    //= rfc7541#section-5.2
    //# As the Huffman-encoded data doesn't always end at an octet boundary,
    //# some padding is inserted after it, up to the next octet boundary.  To
    //# prevent this padding from being misinterpreted as part of the string
    //# literal, the most significant bits of the code corresponding to the
    //# EOS (end-of-string) symbol are used.
    if bits > 0 {
        let pad = 8 - bits;
        out.push(((acc << pad) as u8) | ((1u8 << pad) - 1));
    }
}

/// Decodes a Huffman-encoded string literal.
pub fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let code = code();
    let (mut c, mut len) = (0u32, 0usize);
    for &byte in src {
        for shift in (0..8).rev() {
            c = (c << 1) | ((byte >> shift) & 1) as u32;
            len += 1;
            if len > MAX_LEN {
                return Err(HpackError::InvalidHuffman);
            }
            let offset = c.wrapping_sub(code.first_code[len]);
            if c >= code.first_code[len] && offset < code.count[len] as u32 {
                let sym = code.sorted[(code.first_index[len] as u32 + offset) as usize];
                //= rfc7541#section-5.2
                //# A Huffman-encoded string literal containing the EOS symbol MUST be
                //# treated as a decoding error.
                if sym == EOS {
                    return Err(HpackError::InvalidHuffman);
                }
                out.push(sym as u8);
                c = 0;
                len = 0;
            }
        }
    }
    //= rfc7541#section-5.2
    //# A padding strictly longer than 7 bits MUST be treated as a decoding
    //# error.  A padding not corresponding to the most significant bits of
    //# the code for the EOS symbol MUST be treated as a decoding error.
    if len > 7 || c != (1 << len) - 1 {
        return Err(HpackError::InvalidHuffman);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn derived_codes_match_appendix_b() {
        let c = code();
        // (symbol, code, length) rows from RFC 7541 Appendix B.
        for (sym, hex, len) in [
            (0usize, 0x1ff8u32, 13u8),
            (10, 0x3ffffffc, 30),
            (32, 0x14, 6),
            (48, 0x0, 5),
            (97, 0x3, 5),
            (255, 0x3ffffee, 26),
            (256, 0x3fffffff, 30),
        ] {
            assert_eq!((c.codes[sym], LENGTHS[sym]), (hex, len), "symbol {sym}");
        }
    }

    #[test]
    fn padding_longer_than_seven_bits_is_rejected() {
        // 'a' is 00011 (5 bits); a following 0xff byte makes 11 bits of padding.
        assert_eq!(
            decode(&[0x1f, 0xff], &mut Vec::new()),
            Err(HpackError::InvalidHuffman)
        );
    }

    #[test]
    fn padding_not_of_eos_bits_is_rejected() {
        // 'a' then three zero bits of padding.
        assert_eq!(
            decode(&[0x18], &mut Vec::new()),
            Err(HpackError::InvalidHuffman)
        );
    }

    #[test]
    fn explicit_eos_is_rejected() {
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], &mut Vec::new()),
            Err(HpackError::InvalidHuffman)
        );
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip(src in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut enc = Vec::new();
            encode(&src, &mut enc);
            prop_assert_eq!(enc.len(), encoded_len(&src));
            let mut dec = Vec::new();
            decode(&enc, &mut dec).unwrap();
            prop_assert_eq!(dec, src);
        }
    }
}
