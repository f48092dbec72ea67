#!/usr/bin/env bash
# Builds the test and bench executables (release) into one folder that runs on a GPU
# machine with no Rust toolchain, plus the peer fixtures and a run.sh:
#
#   bash scripts/gpu-bundle.sh [DIR]        # default: gpu-bundle/
#   DIR/run.sh [all|tests|sanitize|example|bench] [NAME-FILTER]   # on the GPU machine
#   DIR/run.sh bench-report                 # there: BENCHMARKS.md + benchmarks.svg in $OUT
#   DIR/run.sh finetune                     # there: the finetune example (LoRA, DoRA) + peft check
#   (also DIR.tar.xz, the same folder compressed: `tar -xJf DIR.tar.xz` there first)
#
# run.sh runs every test executable with LORA_KERNELS_REQUIRE_GPU=1 (a missing GPU is a
# failure there, not a skip), the GPU suite under compute-sanitizer (memcheck,
# racecheck, synccheck), the main example, then the benches. Logs go to $OUT (or DIR/out).
# `run.sh bench-report` (not part of `all`) runs every bench with JSON records and then
# bench_report.py (python3, standard library), writing $OUT/BENCHMARKS.md and
# $OUT/benchmarks.svg: copy them to the repository as BENCHMARKS.md and
# docs/benchmarks.svg (the markdown already links that path) and commit them.
# CUDA_COMPUTE_CAP narrows the kernel archs as for any build (e.g. 90 for H100/H200).
# `run.sh crosscheck` (not part of `all`; needs python3 with torch and peft) writes fresh
# random layers through the crate and compares them with peft (scripts/crosscheck.py).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-"$repo/gpu-bundle"}
fixtures=${LORA_KERNELS_FIXTURES:-"$repo/tests/fixtures/peer"}
cd "$repo"

rm -rf "$dir/bin" "$dir/fixtures"
mkdir -p "$dir/bin/test" "$dir/bin/bench" "$dir/bin/example" "$dir/fixtures"
list_executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kind = m["target"]["kind"]
        if "example" in kind:
            print("example", m["target"]["name"], m["executable"])
        elif "bench" in kind:
            print("bench", m["target"]["name"], m["executable"])
        elif m["profile"]["test"]:
            print("test", m["target"]["name"], m["executable"])
'
}
{
  cargo test --release --no-run --message-format=json
  cargo bench --no-run --message-format=json
  cargo build --release --examples --message-format=json
} | list_executables | while read -r kind name exe; do
  cp "$exe" "$dir/bin/$kind/$name"
done
cp -r "$fixtures"/. "$dir/fixtures/"
cp tests/fixtures/adamw_torch.safetensors "$dir/fixtures/"
cp scripts/bench_report.py "$dir/bench_report.py"
cp scripts/check_finetune.py "$dir/check_finetune.py"
# The commit the executables were built from, for the report.
commit=$(git rev-parse --short HEAD 2> /dev/null || echo unknown)
if ! git diff --quiet HEAD -- . 2> /dev/null; then
  commit="$commit (with uncommitted changes)"
fi
echo "$commit" > "$dir/COMMIT"
cp scripts/crosscheck.py "$dir/crosscheck.py"

cat > "$dir/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundled tests, compute-sanitizer and benches on a GPU machine.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-"$here/out"}
mkdir -p "$out"
what=${1:-all}
export LORA_KERNELS_FIXTURES="$here/fixtures" LORA_KERNELS_REQUIRE_GPU=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# Second argument: a name filter (e.g. `run.sh tests neftune`, `run.sh bench lora`).
filter=${2:-}
if [ "$what" = all ] || [ "$what" = tests ]; then
  for t in "$here"/bin/test/*; do
    name=$(basename "$t")
    case "$name" in *"$filter"*) ;; *) continue ;; esac
    echo "== test $name"
    "$t" --test-threads=4 2>&1 | tee "$out/test-$name.log" | grep -E "^test |test result|SKIPPED|running on|panicked" || true
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "FAILED: $name"; status=1; }
  done
fi
if [ "$what" = all ] || [ "$what" = sanitize ]; then
  for t in "$here"/bin/test/gpu_*; do
    name=$(basename "$t")
    case "$name" in *"$filter"*) ;; *) continue ;; esac
    for tool in memcheck racecheck synccheck; do
      # racecheck's host memory grows with every launch of a process (gpu_dora in one
      # process went past 128 GB): it runs each test function in a process of its own.
      if [ "$tool" = racecheck ]; then
        cases=$("$t" --list --format terse 2>/dev/null | sed -n 's/: test$//p')
      else
        cases=ALL
      fi
      for c in $cases; do
        log="$out/sanitize-$tool-$name.log"
        args=(--test-threads=1)
        if [ "$c" != ALL ]; then
          log="$out/sanitize-$tool-$name-$c.log"
          args+=(--exact "$c")
        fi
        echo "== compute-sanitizer --tool $tool $name ${args[*]:1}"
        compute-sanitizer --tool "$tool" --error-exitcode 17 --print-limit 20 \
          "$t" "${args[@]}" > "$log" 2>&1
        rc=$?
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$log" | tail -3
        [ $rc = 0 ] || { echo "FAILED: compute-sanitizer $tool $name $c (rc $rc)"; status=1; }
      done
    done
  done
fi
if [ "$what" = all ] || [ "$what" = example ]; then
  echo "== example lora_layer"
  "$here/bin/example/lora_layer" 2>&1 | tee "$out/example.log" || { echo "FAILED: example"; status=1; }
fi
if [ "$what" = crosscheck ]; then
  echo "== crosscheck against peft"
  rm -rf "$out/crosscheck"
  { "$here/bin/example/crosscheck" --out "$out/crosscheck" && python3 "$here/crosscheck.py" "$out/crosscheck"; } 2>&1 \
    | tee "$out/crosscheck.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "FAILED: crosscheck"; status=1; }
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  for b in "$here"/bin/bench/*; do
    name=$(basename "$b")
    case "$name" in *"$filter"*) ;; *) continue ;; esac
    echo "== bench $name"
    LORA_KERNELS_BENCH_OUT="$out/bench-$name.txt" "$b" --bench > "$out/bench-$name.log" 2>&1 \
      || { echo "FAILED: bench $name"; status=1; }
    cat "$out/bench-$name.txt" 2>/dev/null
  done
fi
if [ "$what" = finetune ]; then
  # The end-to-end example with LoRA and with DoRA adapters, each adapter then loaded
  # by peft (python3 with torch and peft) and its logits compared with the crate's.
  for variant in lora dora; do
    flag=""
    [ $variant = dora ] && flag=--dora
    echo "== example finetune $flag"
    # The log keeps every progress update; the terminal gets one line in ten.
    "$here/bin/example/finetune" $flag --out "$out/finetune-$variant" 2>&1 \
      | tr '\r' '\n' | tee "$out/finetune-$variant.log" | awk '!/^\[/ || /0\/[0-9]+ loss/'
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "FAILED: finetune $variant"; status=1; continue; }
    python3 "$here/check_finetune.py" "$out/finetune-$variant" 2>&1 | tee -a "$out/finetune-$variant.log"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "FAILED: peft check of finetune $variant"; status=1; }
  done
fi
if [ "$what" = bench-report ]; then
  # Every bench with JSON records, then the report; refuses without a GPU.
  if ! nvidia-smi -L > /dev/null 2>&1; then
    echo "FAILED: bench-report: nvidia-smi missing or failing: no GPU, no report written"
    exit 1
  fi
  records="$out/bench-records.jsonl"
  : > "$records"
  for b in "$here"/bin/bench/*; do
    name=$(basename "$b")
    case "$name" in *"$filter"*) ;; *) continue ;; esac
    echo "== bench $name (records)"
    before=$(wc -l < "$records")
    LORA_KERNELS_BENCH_JSON="$records" LORA_KERNELS_BENCH_OUT="$out/bench-$name.txt" \
      "$b" --bench > "$out/bench-$name.log" 2>&1 || { echo "FAILED: bench $name"; status=1; }
    if [ "$(wc -l < "$records")" = "$before" ]; then
      grep -h SKIPPED "$out/bench-$name.log"
      echo "FAILED: bench $name recorded nothing (see $out/bench-$name.log)"
      status=1
    fi
    cat "$out/bench-$name.txt" 2>/dev/null
  done
  if [ $status = 0 ]; then
    python3 "$here/bench_report.py" "$records" --md "$out/BENCHMARKS.md" \
      --svg "$out/benchmarks.svg" --svg-link docs/benchmarks.svg \
      --command "gpu-bundle/run.sh bench-report${filter:+ $filter}" \
      --commit "$(cat "$here/COMMIT" 2>/dev/null || echo unknown)" || status=1
  else
    echo "FAILED: bench-report: no report written"
  fi
fi
exit $status
RUN
chmod +x "$dir/run.sh"
# The executables share most bytes (the embedded kernels): one xz archive of the folder
# is a fraction of its size, for machines reached through an upload limit.
tar -C "$(dirname "$dir")" -cf - "$(basename "$dir")" | xz -9 -T0 > "$dir.tar.xz"
du -sh "$dir" "$dir.tar.xz"
ls -la "$dir"/bin/*
