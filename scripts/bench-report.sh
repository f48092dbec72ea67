#!/usr/bin/env bash
# The benchmark report: runs every bench on this machine's GPU and writes BENCHMARKS.md
# (per kernel and shape: µs, speedup over its baseline, % of the copy bandwidth and of
# the cuBLAS matrix throughput measured in the same process) and docs/benchmarks.svg (a
# chart of the speedups), both at the repository root, ready to commit.
#
#   bash scripts/bench-report.sh            # needs cargo, nvcc and an NVIDIA GPU
#   CUDA_COMPUTE_CAP=90 bash scripts/bench-report.sh    # H100/H200: builds one arch only
#
# Each bench appends JSON records to $LORA_KERNELS_BENCH_JSON (the schema: `Recorder` in
# benches/common/mod.rs); scripts/bench_report.py turns them into the two files. The
# records and each bench's log stay in target/bench-report/. Without a GPU (nvidia-smi
# missing or failing, or a bench that skips and records nothing) it stops with an
# error and writes no report. LORA_KERNELS_BENCH_QUICK=1 takes fewer samples (the
# report says so). On a GPU machine without cargo: scripts/gpu-bundle.sh, then
# `gpu-bundle/run.sh bench-report` there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

die() {
  echo "bench-report: $*" >&2
  exit 1
}
command -v nvidia-smi > /dev/null || die "nvidia-smi not found: no NVIDIA GPU here; no report written"
nvidia-smi -L > /dev/null 2>&1 || die "nvidia-smi -L failed: no usable GPU here; no report written"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

work="$repo/target/bench-report"
mkdir -p "$work"
records="$work/records.jsonl"
: > "$records"
for src in benches/*.rs; do
  name=$(basename "$src" .rs)
  echo "== cargo bench --bench $name"
  before=$(wc -l < "$records")
  LORA_KERNELS_BENCH_JSON="$records" LORA_KERNELS_BENCH_OUT="$work/bench-$name.txt" \
    cargo bench --bench "$name" > "$work/bench-$name.log" 2>&1 \
    || die "cargo bench --bench $name failed (log: $work/bench-$name.log)"
  after=$(wc -l < "$records")
  if [ "$after" = "$before" ]; then
    grep -h "SKIPPED" "$work/bench-$name.log" >&2 || true
    die "bench $name recorded nothing (did it skip for lack of a GPU? log: $work/bench-$name.log); no report written"
  fi
  cat "$work/bench-$name.txt" 2> /dev/null || true
done

commit=$(git rev-parse --short HEAD 2> /dev/null || echo unknown)
if ! git diff --quiet HEAD -- . ':!BENCHMARKS.md' ':!docs/benchmarks.svg' 2> /dev/null; then
  commit="$commit (with uncommitted changes)"
fi
command_line="bash scripts/bench-report.sh"
[ "${LORA_KERNELS_BENCH_QUICK:-}" = 1 ] && command_line="LORA_KERNELS_BENCH_QUICK=1 $command_line"
python3 scripts/bench_report.py "$records" --md BENCHMARKS.md --svg docs/benchmarks.svg \
  --command "$command_line" --commit "$commit"
