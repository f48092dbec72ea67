#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, synccheck) over the GPU test binaries of a
# bundle (scripts/gpu-bundle.sh), as parallel jobs on one GPU: one job per binary and
# tool (memcheck, synccheck: JOBS at a time), racecheck one process per test function
# (RACE_JOBS at a time, default 1, alongside the others). racecheck's host memory grows
# with every launch of a process: on the H100 machines gpu_dora's largest tests reach
# 79–97 GB each, so two at once are killed for memory on a 128 GB host. The longest
# binaries go first; FILTER (a substring of the binaries' names) splits a sweep across
# calls. One line per job; logs in OUT_DIR.
#
#   [RACE_JOBS=1] scripts/sanitize_parallel.sh BUNDLE_DIR OUT_DIR [JOBS (default 6)] [FILTER]
#
# Exit status nonzero if any job failed (a sanitizer error, a failing or killed test).
set -uo pipefail
bundle=$(cd "$1" && pwd)
out=$2
jobs=${3:-6}
filter=${4:-}
mkdir -p "$out"
export LORA_KERNELS_FIXTURES="$bundle/fixtures" LORA_KERNELS_REQUIRE_GPU=1 SAN_OUT="$out"
list=()
race=()
for name in gpu_dora gpu_lora gpu_qlora gpu_gemm gpu_nf4 gpu_neftune; do
  t="$bundle/bin/test/$name"
  [ -x "$t" ] || continue
  case "$name" in *"$filter"*) ;; *) continue ;; esac
  for tool in memcheck racecheck synccheck; do
    if [ "$tool" = racecheck ]; then
      for c in $("$t" --list --format terse 2>/dev/null | sed -n 's/: test$//p'); do
        race+=("$t $tool $c")
      done
    else
      list+=("$t $tool ALL")
    fi
  done
done
run_one() {
  local t=$1 tool=$2 c=$3 name log rc
  name=$(basename "$t")
  log="$SAN_OUT/$tool-$name-$c.log"
  local args=(--test-threads=1)
  [ "$c" != ALL ] && args+=(--exact "$c")
  compute-sanitizer --tool "$tool" --error-exitcode 17 --print-limit 20 "$t" "${args[@]}" \
    > "$log" 2>&1
  rc=$?
  echo "$tool $name $c rc=$rc | $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1) | $(grep -E 'test result' "$log" | tail -1 | cut -c1-45)"
  return $rc
}
export -f run_one
printf '%s\n' "${race[@]}" | xargs -P "${RACE_JOBS:-1}" -L 1 bash -c 'run_one "$0" "$1" "$2"' &
race_pid=$!
printf '%s\n' "${list[@]}" | xargs -P "$jobs" -L 1 bash -c 'run_one "$0" "$1" "$2"'
status=$?
wait "$race_pid" || status=1
exit $status
