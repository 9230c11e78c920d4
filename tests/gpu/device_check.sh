#!/usr/bin/env bash
# One run on the GPU machine (H200) that checks the CUDA backend end to end, in well under
# 8 minutes, and prints a short table last. Prepare on the build machine first:
#
#   bash tests/gpu/make_device_bundle.sh        # builds build-cuda-bundle/ (sm_80 + sm_90 + PTX)
#   device tool: run(command="bash tests/gpu/device_check.sh", carry=["build-cuda-bundle", ".gl"], timeout_s=540)
#
# Steps, in this order (each under its own limit, all under DEFKV_DEVICE_BUDGET_S = 450 s; a
# failing step never stops the later ones):
#   sass_sm90   the bundle's libdefkv.so holds sm_90 machine code (cuobjdump)
#   available   test_cuda_available: the backend reports itself available on this machine
#   parity      cuda_parity: every op and method on CUDA against the CPU, full case list
#   memcheck    compute-sanitizer memcheck on cuda_parity --small
#   parity_all  tests/parity: every method, host and device outputs, on CUDA against the CPU
#   ops_parity  tests/parity: every backend op on CUDA against the CPU
#   paged       tests/parity/paged: paged caches on CUDA against its contiguous results
#   stream      tests/stream/stream_ref: decode-time eviction against the float64 reference
#   vk_parity   the same two harnesses on the GPU's Vulkan driver, validation on
#   vk_ops      the Vulkan backend's op-level tests on a caller-created device
#   bench       cuda_bench: Llama-3.1-8B-shaped layer at L = 8k, 32k, 128k + cuBLAS bf16 GEMM
#   torch       torch_defensivekv.py: the same method in PyTorch, same shapes, same run
#   racecheck   compute-sanitizer racecheck on one bf16 GQA case (tensor-core projected norm)
#   nvcc_sm90a  the CUDA sources compile with the device's own nvcc for sm_90a
# Logs go to $OUT (the device tool brings them back) or /tmp/defkv-device-check.
# DEFKV_DEVICE_ONLY="parity bench ..." runs only the named steps.
# DEFKV_SKIP_NVCC=1 skips the sm_90a compile (a dry run of the script on the build machine).
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=$ROOT/build-cuda-bundle
[ $# -gt 0 ] && [ "$1" != "--table" ] && B=$1
LOGS=${OUT:-/tmp/defkv-device-check}
mkdir -p "$LOGS"
# the bundle's libraries, then wherever cuBLAS lives there (toolkit or the pip wheel of PyTorch)
PIP_CUBLAS=$(python3 -c 'import nvidia.cublas as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="$B/lib:${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:${PIP_CUBLAS:-}"
export PATH="$PATH:/usr/local/cuda/bin"
T0=$(date +%s)
declare -a ROWS

print_table() {
  echo
  echo "================ defkv CUDA device check ($(( $(date +%s) - T0 ))s, commit $(cat "$B/COMMIT" 2>/dev/null | cut -c1-12)) ================"
  for r in "${ROWS[@]}"; do echo "$r"; done
  echo "--- benchmark (H=32 Hk=8 d=128 D=4096 bf16 W=32; ms = median wall time per call) ---"
  grep -h '^BENCH' "$LOGS/bench.log" 2>/dev/null | grep -E 'device=|phase=cublas'
  printf '%-7s %8s %8s %7s %6s %9s %9s %9s %9s %9s %8s\n' L attn_ms pn_ms pn_TF pn_%g host_sel res_sel graph_sel res_cmp torch_ms speedup
  for L in 8192 32768 131072; do
    get() { grep -h "^BENCH L=$L phase=$1 " "$LOGS/bench.log" 2>/dev/null | sed -n 's/.* ms=\([-0-9.]*\).*/\1/p'; }
    pl=$(grep -h "^BENCH L=$L phase=projected_norm" "$LOGS/bench.log" 2>/dev/null)
    tf=$(echo "$pl" | sed -n 's/.*tflops=\([0-9.]*\).*/\1/p')
    pc=$(echo "$pl" | sed -n 's/.*pct_of_gemm=\([0-9.]*\).*/\1/p')
    a=$(get attention_defensive); p=$(get projected_norm); s=$(get select_defensivekv_whole_layer)
    r=$(get select_resident); g=$(get select_resident_graph); c=$(get compact_resident)
    t=$(grep -h "^TORCH L=$L " "$LOGS/torch.log" 2>/dev/null | sed 's/.*ms=//')
    sp=$(awk -v a="$t" -v b="$r" 'BEGIN{ if (a > 0 && b > 0) printf "%.2fx", a / b; else print "-" }')
    printf '%-7s %8s %8s %7s %6s %9s %9s %9s %9s %9s %8s\n' "$L" "${a:--}" "${p:--}" "${tf:--}" "${pc:--}" "${s:--}" \
      "${r:--}" "${g:--}" "${c:--}" "${t:--}" "$sp"
  done
  echo "host_sel: defkv_select with host outputs (synchronous); res_sel: device-resident defkv_select (enqueue + sync);"
  echo "graph_sel: the same captured in a CUDA graph, per replay; speedup = torch_ms / res_sel"
  echo "targets: pn >= 50% of the GEMM rate; whole layer (res_sel) <= 3 ms at L=32768; >= 2x faster than torch"
}

# --table: print the table again from the logs of an earlier run (in $OUT) and stop.
if [ "${1:-}" = "--table" ]; then
  ROWS=("(step verdicts: see the earlier run)")
  print_table
  exit 0
fi

BUDGET=${DEFKV_DEVICE_BUDGET_S:-450} # all steps together stay under this many seconds

step() { # step NAME TIMEOUT_S COMMAND...   (the limit is cut to what is left of BUDGET)
  local name=$1 limit=$2
  shift 2
  if [ -n "${DEFKV_DEVICE_ONLY:-}" ] && [[ " $DEFKV_DEVICE_ONLY " != *" $name "* ]]; then
    ROWS+=("$(printf '%-22s %-12s' "$name" 'not selected')")
    return
  fi
  local t=$(date +%s)
  local left=$(( BUDGET - (t - T0) ))
  if [ $left -lt 10 ]; then
    ROWS+=("$(printf '%-22s %-12s' "$name" 'NOT RUN (time budget)')")
    return
  fi
  [ $limit -gt $left ] && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$name.log"
  local verdict=PASS
  [ $rc -eq 77 ] && verdict=SKIP
  [ $rc -eq 124 ] && verdict=TIMEOUT
  [ $rc -ne 0 ] && [ $rc -ne 77 ] && [ $rc -ne 124 ] && verdict="FAIL(rc=$rc)"
  ROWS+=("$(printf '%-22s %-12s %5ss' "$name" "$verdict" $(( $(date +%s) - t )))")
  echo "=== $name: $verdict"
}

if [ ! -x "$B/bin/cuda_parity" ]; then
  echo "device_check: no bundle at $B (run tests/gpu/make_device_bundle.sh on the build machine and carry build-cuda-bundle)"
  exit 2
fi
echo "bundle commit: $(cat "$B/COMMIT" 2>/dev/null)"
nvidia-smi -L 2>&1 | head -2
nvcc --version 2>&1 | tail -1

# code for this device, then correctness, then speed, then the slower extra checks
step sass_sm90 20 bash -c "cuobjdump --list-elf '$B/lib/libdefkv.so.0' | tee /dev/stderr | grep -q sm_90"
step available 30 "$B/bin/test_cuda_available"
step parity 120 "$B/bin/cuda_parity"
step parity_all 180 "$B/bin/parity" --backend cuda
step ops_parity 120 "$B/bin/ops_parity" --backend cuda
# paged caches (every method, NHD/HND/per-head pools in host and device memory, the golden cases
# too) and decode-time eviction (every round against the float64 reference)
golden=""
for c in pub1-g4-L1024 pub2-g1-L300 pub3-g8-L700 pub4-3layer-L512; do
  [ -f "$ROOT/tests/data/conformance/$c.case.safetensors" ] && golden="$golden --golden $ROOT/tests/data/conformance/$c.case.safetensors"
done
[ -x "$B/bin/paged" ] && step paged 120 "$B/bin/paged" --backend cuda $golden
[ -x "$B/bin/stream_ref" ] && step stream 60 "$B/bin/stream_ref" --backend cuda
# The Vulkan backend on the GPU's own Vulkan driver (issue 3). The image has no Vulkan loader:
# the loader and the Khronos validation layer travel as Debian packages in .gl (fetched on the
# build machine with apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2
# vulkan-validationlayers); the loader and glvnd go to /
# as the device notes say, the layer to /tmp/vl, found through VK_LAYER_PATH.
if [ -x "$B/bin/parity" ] && ls "$ROOT"/.gl/libvulkan1_*.deb >/dev/null 2>&1; then
  # the loader plus glvnd's libraries, which the NVIDIA Vulkan driver (libGLX_nvidia) needs
  for f in "$ROOT"/.gl/*.deb; do case "$f" in *vulkan-validationlayers*) ;; *) dpkg -x "$f" / ;; esac; done
  ldconfig
  mkdir -p /tmp/vl
  for f in "$ROOT"/.gl/vulkan-validationlayers_*.deb; do [ -f "$f" ] && dpkg -x "$f" /tmp/vl; done
  export VK_LAYER_PATH=/tmp/vl/usr/share/vulkan/explicit_layer.d
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/tmp/vl/usr/lib/x86_64-linux-gnu"
  nv_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f "$nv_icd" ] && export VK_DRIVER_FILES=$nv_icd
  nv_egl=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  [ -f "$nv_egl" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$nv_egl
  ls /usr/local/nvidia/share/vulkan/icd.d /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>&1 | head -8
  step vk_parity 120 env DEFKV_VULKAN_VALIDATION=abort DEFKV_VULKAN_INFO=1 "$B/bin/parity" --backend vulkan
  step vk_ops_parity 60 env DEFKV_VULKAN_VALIDATION=abort "$B/bin/ops_parity" --backend vulkan
  [ -x "$B/bin/paged" ] && step vk_paged 120 env DEFKV_VULKAN_VALIDATION=abort "$B/bin/paged" --backend vulkan
  [ -x "$B/bin/stream_ref" ] && step vk_stream 60 env DEFKV_VULKAN_VALIDATION=abort "$B/bin/stream_ref" --backend vulkan
  step vk_ops 60 env DEFKV_VULKAN_VALIDATION=abort "$B/bin/vk_ops"
  [ -x "$B/bin/vk_bench" ] && step vk_bench 120 env DEFKV_VULKAN_INFO=1 "$B/bin/vk_bench" --reps 1
else
  ROWS+=("$(printf '%-22s %-12s' vk_parity 'SKIP(no parity in the bundle or no .gl loader)')")
fi
step bench 120 "$B/bin/cuda_bench"
step torch 60 python3 "$ROOT/tests/gpu/torch_defensivekv.py"
HAVE_SAN=0
command -v compute-sanitizer >/dev/null && HAVE_SAN=1
if [ $HAVE_SAN = 1 ]; then
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 "$B/bin/cuda_parity" --small
else
  ROWS+=("$(printf '%-22s %-12s' memcheck 'SKIP(no compute-sanitizer)')")
fi
if [ $HAVE_SAN = 1 ]; then
  step racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 "$B/bin/cuda_parity" --small --case 15
fi
[ -n "${DEFKV_SKIP_NVCC:-}" ] || step nvcc_sm90a 90 bash -c "mkdir -p /tmp/defkv-nvcc && for f in '$ROOT'/cuda/*.cu; do \
  nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I'$ROOT/capi/include' -I'$ROOT/core' -I'$ROOT/cuda' \
  -c \"\$f\" -o /tmp/defkv-nvcc/\$(basename \"\$f\").o & done; wait && [ \$(ls /tmp/defkv-nvcc | wc -l) -eq \$(ls '$ROOT'/cuda/*.cu | wc -l) ]"

print_table
