#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| limbic_server::fuzz::join_request(data));
