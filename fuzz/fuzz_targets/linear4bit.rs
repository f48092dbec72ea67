//! cargo-fuzz target `linear4bit`: the body is `tests/fuzz_harness/mod.rs`'s `linear4bit`, which
//! `tests/fuzz_regressions.rs` also runs under `cargo test`.
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::linear4bit(data));
