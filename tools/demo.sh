#!/usr/bin/env bash
# The README's main job: installs what is missing, builds, and runs the default comparison.
# With the real-model engine built and its model/text cached, that is `defkv demo`
# (SmolLM2-135M on Moby Dick, every method at a 20% cache); otherwise `defkv compress` on a
# bundled golden case, printing the kept entries per head and the time.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${DEFKV_BUILD_DIR:-build}
bash tools/install-deps.sh
have_assets=0
if [[ -x tools/engine/fetch_assets.sh ]] && bash tools/engine/fetch_assets.sh; then have_assets=1; fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDEFKV_BUILD_TOOLS=ON \
  -DDEFKV_WERROR="${DEFKV_WERROR:-OFF}" >/dev/null
cmake --build "$build" -j2 --target defkv_cli
cli="$build/tools/defkv"
if [[ $have_assets == 1 ]] && "$cli" demo --help >/dev/null 2>&1; then
  exec "$cli" demo "$@"
fi
echo "defkv: running the built-in default (defkv compress on a bundled golden case)" >&2
exec "$cli" compress --input tests/data/conformance/pub1-g4-L1024.case.safetensors \
  --output "$build/demo-defensivekv.safetensors" --method defensivekv --compression-ratio 0.8 "$@"
