#!/usr/bin/env bash
# Builds, on the build machine (no GPU needed), everything device_check.sh runs on the GPU
# machine, and packs it with the shared libraries that machine lacks (OpenBLAS, gfortran,
# quadmath, cmocka) into build-cuda-bundle/ (ignored by git; carried by the device tool).
#
#   bash tests/gpu/make_device_bundle.sh            # then, with the device tool:
#   run(command="bash tests/gpu/device_check.sh", carry=["build-cuda-bundle", ".gl"], timeout_s=540)
#
# The build dir is build-cuda-dev (sm_80 + sm_90 machine code and compute_90 PTX, Vulkan on,
# tests on). The Vulkan loader for that machine is carried separately in .gl (see device_check.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${DEFKV_BUNDLE_BUILD:-$ROOT/build-cuda-dev}
OUT=$ROOT/build-cuda-bundle
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DDEFKV_CUDA=ON \
  -DDEFKV_CUDA_ARCHITECTURES="80-real;90" -DDEFKV_VULKAN=ON -DDEFKV_BUILD_TESTS=ON >/dev/null
ninja -C "$BUILD" -j2 defkv cuda_parity cuda_bench test_cuda_available parity ops_parity paged stream_ref vk_ops
ninja -C "$BUILD" -j2 vk_bench || echo "make_device_bundle: vk_bench did not build; the bundle goes without it"
rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/lib"
cp "$BUILD"/tests/gpu/{cuda_parity,cuda_bench,test_cuda_available} "$OUT/bin/"
# the shared parity harnesses (every method and op, CUDA and the GPU's own Vulkan driver) and
# the Vulkan backend's own op tests
cp "$BUILD"/tests/parity/{parity,ops_parity,paged} "$OUT/bin/"
cp "$BUILD"/tests/stream/stream_ref "$OUT/bin/"
cp "$BUILD"/tests/vulkan/vk_ops "$OUT/bin/"
# and its benchmark when it exists (device_check.sh runs bin/vk_bench if present)
[ -x "$BUILD"/tests/vulkan/vk_bench ] && cp "$BUILD"/tests/vulkan/vk_bench "$OUT/bin/"
cp -L "$BUILD"/capi/libdefkv.so.0 "$OUT/lib/"
# Non-system libraries the binaries need (the GPU machine's image has no OpenBLAS or cmocka).
for f in "$OUT"/bin/* "$OUT"/lib/libdefkv.so.0; do
  ldd "$f" | awk '/=> \//{print $1" "$3}' | while read -r name path; do
    case "$name" in
      libopenblas*|libgfortran*|libquadmath*|libcmocka*) cp -L "$path" "$OUT/lib/$name" ;;
    esac
  done
done
strip --strip-debug "$OUT"/bin/* "$OUT"/lib/*
git -C "$ROOT" rev-parse HEAD > "$OUT/COMMIT"
du -sh "$OUT"
ls -la "$OUT/bin" "$OUT/lib"
# The Vulkan loader, glvnd and the validation layer for the GPU machine's image (it has none):
# Debian packages in .gl (ignored by git), unpacked there by device_check.sh.
if ! ls "$ROOT"/.gl/libvulkan1_*.deb >/dev/null 2>&1; then
  mkdir -p "$ROOT/.gl" /tmp/defkv-apt-amd64/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/defkv-apt-amd64'
  (apt-get $o update >/dev/null && cd "$ROOT/.gl" && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 \
    libgl1 libglx0 libgles2 vulkan-validationlayers) ||
    echo "make_device_bundle: could not fetch the Vulkan packages into .gl; the device run will skip Vulkan"
fi
