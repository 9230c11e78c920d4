#!/usr/bin/env bash
# Short libFuzzer runs (called by .ci/run). Installs nothing: needs clang-14 and
# libclang-rt-14-dev (libFuzzer, ASan, UBSan runtimes), cmake, ninja and the library's build
# dependencies. Builds fuzz/ in build-fuzz, runs every target for FUZZ_SECONDS (default 50)
# over a copy of its checked-in seed corpus, and exits non-zero on any crash, sanitizer
# report, leak, timeout or out-of-memory. Crash inputs are kept in build-fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${FUZZ_SECONDS:-50}
JOBS=${JOBS:-2}
CC=${FUZZ_CC:-clang-14} CXX=${FUZZ_CXX:-clang++-14} \
  cmake -S fuzz -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-fuzz -j "$JOBS" --target fuzz_ops fuzz_capi $( [[ -f tools/safetensors.cpp ]] && echo fuzz_safetensors )
mkdir -p build-fuzz/artifacts
status=0
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
for target in fuzz_ops fuzz_capi fuzz_safetensors; do
  [[ -x build-fuzz/$target ]] || { echo "fuzz.sh: $target not built (skipped: its sources are absent)"; continue; }
  name=${target#fuzz_}
  work=build-fuzz/corpus-$name
  rm -rf "$work" && mkdir -p "$work"
  echo "=== fuzz.sh: $target for ${SECONDS_PER_TARGET}s (seeds: fuzz/corpus/$name) ==="
  # -malloc_limit_mb: any single allocation over 256 MiB is a failure (untrusted sizes must be
  # bounded before allocating); -rss_limit_mb bounds the whole process.
  if ./build-fuzz/$target -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
       -malloc_limit_mb=256 -print_final_stats=1 -artifact_prefix=build-fuzz/artifacts/$name- \
       "$work" "fuzz/corpus/$name" > "build-fuzz/$target.log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "build-fuzz/$target.log" | grep -o '[0-9]*$' || true)
    echo "$target: passed, ${runs:-?} executions"
  else
    echo "$target: FAILED"; grep -v '^#[0-9]' "build-fuzz/$target.log" | tail -60; status=1
  fi
done
exit $status
