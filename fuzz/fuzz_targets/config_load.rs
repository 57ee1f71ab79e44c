//! See `ringtun::fuzzing::config_load`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringtun::fuzzing::config_load(data));
