//! See `ringtun::fuzzing::connect_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringtun::fuzzing::connect_request(data));
