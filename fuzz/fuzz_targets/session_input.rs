//! See `ringtun::fuzzing::session_input`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringtun::fuzzing::session_input(data));
