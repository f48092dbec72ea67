//! cargo-fuzz target `peft_adapter`: the body is `tests/fuzz_harness/mod.rs`'s `peft_adapter`, which
//! `tests/fuzz_regressions.rs` also runs under `cargo test`.
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::peft_adapter(data));
