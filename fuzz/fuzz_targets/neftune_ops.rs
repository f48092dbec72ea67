//! cargo-fuzz target `neftune_ops`: the body is `tests/fuzz_harness/mod.rs`'s `neftune_ops`, which
//! `tests/fuzz_regressions.rs` also runs under `cargo test`.
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::neftune_ops(data));
