//! libFuzzer target: see `tidemark_core_fuzz::check_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidemark_core_fuzz::check_parse(data));
