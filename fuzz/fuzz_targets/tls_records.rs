//! See `ringtun::fuzzing::tls_records`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringtun::fuzzing::tls_records(data));
