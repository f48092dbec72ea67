//! cargo-fuzz target `nf4_quantize`: the body is `tests/fuzz_harness/mod.rs`'s `nf4_quantize`, which
//! `tests/fuzz_regressions.rs` also runs under `cargo test`.
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::nf4_quantize(data));
