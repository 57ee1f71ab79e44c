//! See `ringtun::fuzzing::hpack_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringtun::fuzzing::hpack_decode(data));
