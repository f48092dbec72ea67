#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 30): `bash fuzz/run.sh [SECONDS]
# [TARGET...]`. Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); a stable
# toolchain is enough: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags (AddressSanitizer,
# coverage instrumentation). Each target starts from its corpus in fuzz/corpus/<target>
# (kept between runs, ignored by git), the seeds made here from tests/fixtures/peer/, and
# the saved crash inputs in fuzz/regressions/<target>. A crash, an out-of-memory (2 GiB)
# or a slow input (10 s) stops the run with a non-zero status and leaves the input in
# fuzz/artifacts/<target>/; copy it into fuzz/regressions/<target>/ once it is fixed, so
# that tests/fuzz_regressions.rs replays it under `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(peft_adapter linear4bit nf4_quantize cpu_ops neftune_ops)

export RUSTC_BOOTSTRAP=1
# The kernels are not fuzzed, but the crate's build script compiles them: share the
# main build's nvcc cache so that they are not compiled a second time.
export LORA_KERNELS_CACHE_DIR="${LORA_KERNELS_CACHE_DIR:-$PWD/target/lora-kernels-nvcc-cache}"

cargo fuzz build --fuzz-dir fuzz -O

# Seeds in each target's input format (see tests/fuzz_harness/mod.rs).
peer=tests/fixtures/peer
mkdir -p fuzz/corpus/peft_adapter fuzz/corpus/linear4bit
for d in peft_lora_48x80_r8_adapter peft_dora_48x80_r8_adapter; do
    { cat "$peer/$d/adapter_config.json"; printf '\0'; cat "$peer/$d/adapter_model.safetensors"; } \
        > "fuzz/corpus/peft_adapter/seed_$d"
done
for f in nf4_64x128_bs64_linear4bit_checkpoint nf4_64x128_bs64_dq_linear4bit_checkpoint; do
    { printf '\0'; cat "$peer/$f.safetensors"; } > "fuzz/corpus/linear4bit/seed_$f"
done

bin=fuzz/target/x86_64-unknown-linux-gnu/release
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    dirs=("fuzz/corpus/$t")
    [ -d "fuzz/regressions/$t" ] && dirs+=("fuzz/regressions/$t")
    log="fuzz/artifacts/$t.log"
    echo "-- $t: ${secs} s"
    # Leak detection is off: the CPU oracle's worker threads leave glibc's thread-exit
    # records behind, which LeakSanitizer reports (a leak is not a crash here anyway).
    if ! "$bin/$t" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
        -detect_leaks=0 -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
        "${dirs[@]}" > "$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz target $t FAILED: the input is in fuzz/artifacts/$t/ (log: $log)" >&2
        exit 1
    fi
    grep -E '^Done|stat::number_of_executed_units|stat::peak_rss_mb' "$log" | sed 's/^/   /'
done
echo "fuzz: ${#targets[@]} targets ran ${secs} s each without a crash"
