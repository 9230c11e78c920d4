#!/usr/bin/env bash
# Sanitizer and valgrind jobs (called by .ci/run). Installs nothing: needs gcc/g++ 12 (their
# libasan/libubsan/libtsan come with the compiler package), valgrind, cmake, ninja, and the
# library's own build dependencies. Exits non-zero on any failure.
#
#   1. build-asan  : -DDEFKV_SANITIZE=ON (ASan + UBSan, no recovery), runs ctest -L unit,
#                    the CLI tests (-R '^cli\.') when the defkv program is built, -L reliability
#                    (which includes the allocation fault-injection sweep
#                    reliability_fault_injection, run here with leak detection), and the
#                    real-model engine's tests (-L engine: tools/engine built here too; the
#                    tests that need the cached model say SKIPPED without it).
#   2. build-tsan  : -DDEFKV_TSAN=ON, runs the multithreaded tests (-L threads, and the unit
#                    determinism/threads tests).
#   3. build-valgrind: a plain RelWithDebInfo build; every `unit` and `reliability` C test
#                    executable under valgrind memcheck --error-exitcode=1 --leak-check=full.
#
# GCC, not clang: libdefkv.so links with -Wl,--no-undefined, and clang does not link the
# sanitizer runtimes into shared objects (undefined __asan_*/__tsan_* symbols); gcc does.
# Vulkan and CUDA backends are off here (they are tested in their own jobs; lavapipe's JIT and
# nvcc do not take these flags), and so are the language bindings.
# SANITIZE_JOBS picks the jobs (default "asan tsan valgrind").
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
SANITIZE_JOBS=${SANITIZE_JOBS:-asan tsan valgrind}
want() { [[ " $SANITIZE_JOBS " == *" $1 "* ]]; }
COMMON=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++
        -DDEFKV_VULKAN=OFF -DDEFKV_CUDA=OFF -DDEFKV_TOOLS_ENGINE=OFF -DDEFKV_TOOLS_BENCH=OFF
        -DDEFKV_BINDING_RUST=OFF -DDEFKV_BINDING_GO=OFF -DDEFKV_BINDING_JAVA=OFF -DDEFKV_BINDING_PYTHON=OFF
        -DDEFKV_WERROR="${DEFKV_WERROR:-OFF}")
# OpenBLAS is not instrumented. One BLAS thread keeps its work on the calling thread, where the
# sanitizers see every access (the library's own pool still runs with n_threads 1..4).
export OPENBLAS_NUM_THREADS=1
status=0
step() { echo; echo "=== sanitize.sh: $* ==="; }
build_targets() { # dir, targets... (those that exist in this configuration)
  local dir=$1; shift
  local have; have=$(cmake --build "$dir" --target help 2>/dev/null | sed -n 's/^\([A-Za-z0-9_.-]*\): .*/\1/p')
  local t want=()
  for t in "$@"; do grep -qx "$t" <<<"$have" && want+=("$t"); done
  [[ ${#want[@]} -gt 0 ]] || { echo "sanitize.sh: none of the targets $* exist in $dir"; exit 1; }
  cmake --build "$dir" -j "$JOBS" --target "${want[@]}"
}
run_ctest() { # dir, args...
  local dir=$1; shift
  if ! ctest --test-dir "$dir" --output-on-failure --no-tests=error "$@"; then status=1; fi
}

# ---- 1. AddressSanitizer + UndefinedBehaviorSanitizer ------------------------------------
if want asan; then
step "ASan+UBSan build (build-asan)"
cmake -S . -B build-asan "${COMMON[@]}" -DDEFKV_SANITIZE=ON -DDEFKV_TOOLS_ENGINE=ON >/dev/null
cmake --build build-asan -j "$JOBS"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export LSAN_OPTIONS=suppressions=$PWD/.ci/lsan.supp
step "ASan+UBSan: unit tests"
run_ctest build-asan -L unit
if ctest --test-dir build-asan -N -R '^cli\.' | grep -q 'Total Tests: [1-9]'; then
  step "ASan+UBSan: CLI tests"
  run_ctest build-asan -R '^cli\.'
fi
step "ASan+UBSan: reliability tests (the fault-injection sweep included)"
run_ctest build-asan -L reliability -E oversized
step "ASan+UBSan: the paged-cache harness"
run_ctest build-asan -R '^paged_cpu$'
step "ASan+UBSan: the real-model engine (forward, one-token batches, compression, tasks)"
run_ctest build-asan -L engine
unset ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS
fi

# ---- 2. ThreadSanitizer --------------------------------------------------------------------
if want tsan; then
step "TSan build (build-tsan)"
cmake -S . -B build-tsan "${COMMON[@]}" -DDEFKV_TSAN=ON -DDEFKV_BUILD_TOOLS=OFF >/dev/null
# only the multithreaded tests (and what they link): keeps the job short
build_targets build-tsan rel_test_concurrency rel_test_determinism test_determinism test_thread_pool rel_test_hardening
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/.ci/tsan.supp"
step "TSan: multithreaded tests"
run_ctest build-tsan -L threads
if ctest --test-dir build-tsan -N -R 'unit_.*(determinism|thread)' | grep -q 'Total Tests: [1-9]'; then
  run_ctest build-tsan -R 'unit_.*(determinism|thread)'
fi
unset TSAN_OPTIONS
fi

# ---- 3. valgrind memcheck ------------------------------------------------------------------
if want valgrind; then
step "valgrind build (build-valgrind)"
cmake -S . -B build-valgrind "${COMMON[@]}" -DDEFKV_BUILD_TOOLS=OFF >/dev/null
# the C test executables of `unit` and `reliability` only (valgrind runs each of them)
# (ctest only reports a test's command once its executable exists, so map test names to the
# target names the test directories use: unit_X -> X, reliability_X -> rel_X)
mapfile -t vg_targets < <(ctest --test-dir build-valgrind -L 'unit|reliability' --show-only=json-v1 |
  python3 -c 'import json,sys
for t in json.load(sys.stdin)["tests"]:
    n = t["name"]
    if n.startswith("unit_"): print(n[5:])
    elif n.startswith("reliability_"): print("rel_" + n[12:])')
build_targets build-valgrind "${vg_targets[@]}"
# valgrind does not emulate AVX-512: pin OpenBLAS to its Haswell (AVX2) kernels.
export OPENBLAS_CORETYPE=Haswell
step "valgrind memcheck: unit and reliability C tests"
# valgrind is ~50x slower than native: the heaviest unit tests (conformance alone takes over
# 3 minutes under valgrind on 2 cores) run under ASan only; VALGRIND_EXCLUDE='' runs them all.
VALGRIND_EXCLUDE=${VALGRIND_EXCLUDE-unit_test_(conformance|layouts|determinism)}
mapfile -t tests < <(ctest --test-dir build-valgrind -L 'unit|reliability' -E "cli|oversized${VALGRIND_EXCLUDE:+|$VALGRIND_EXCLUDE}" --show-only=json-v1 |
  python3 -c 'import json,sys
for t in json.load(sys.stdin)["tests"]:
    c = t.get("command") or []
    if c and not c[0].endswith(("python3", "sh")): print(t["name"] + "\t" + " ".join(c))')
[[ ${#tests[@]} -gt 0 ]] || { echo "no C tests found for valgrind"; exit 1; }
vg_pass=0
vg_skip=0
for line in "${tests[@]}"; do
  name=${line%%$'\t'*}; cmd=${line#*$'\t'}
  echo "--- valgrind: $name"
  # shellcheck disable=SC2086
  rc=0
  valgrind --tool=memcheck --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    --suppressions=.ci/valgrind.supp --quiet $cmd > "build-valgrind/valgrind-$name.log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]]; then
    vg_pass=$((vg_pass + 1))
  elif [[ $rc -eq 77 ]]; then # the test's own skip code (CTest SKIP_RETURN_CODE)
    echo "skipped by the test itself: $(tail -1 "build-valgrind/valgrind-$name.log")"; vg_skip=$((vg_skip + 1))
  else
    echo "valgrind FAILED: $name (exit $rc)"; tail -60 "build-valgrind/valgrind-$name.log"; status=1
  fi
done
# the paged-cache harness (small cases) and the stream reference test
build_targets build-valgrind paged stream_ref
for extra in "paged tests/parity/paged --backend cpu --small" "stream_ref tests/stream/stream_ref --backend cpu"; do
  name=${extra%% *}; cmd=${extra#* }
  echo "--- valgrind: $cmd"
  # shellcheck disable=SC2086
  if valgrind --tool=memcheck --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
      --suppressions=.ci/valgrind.supp --quiet build-valgrind/$cmd > "build-valgrind/valgrind-$name.log" 2>&1; then
    vg_pass=$((vg_pass + 1)); tail -1 "build-valgrind/valgrind-$name.log"
  else
    echo "valgrind FAILED: $name"; tail -60 "build-valgrind/valgrind-$name.log"; status=1
  fi
done
echo "valgrind memcheck: $vg_pass of $((${#tests[@]} + 2)) test executables clean, $vg_skip skipped by the test"
fi

echo
if [[ $status -ne 0 ]]; then echo "sanitize.sh: FAILED"; else echo "sanitize.sh: all sanitizer and valgrind runs passed"; fi
exit $status
