#!/usr/bin/env bash
# The README's test command: installs what is missing, builds everything, runs every test.
# Ends with CTest's summary. Usage: tools/test.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
bash tools/install-deps.sh
# Model and text for the real-model tests (cached outside the repository; skipped loudly if
# they cannot be fetched).
if [[ -x tools/engine/fetch_assets.sh ]]; then
  bash tools/engine/fetch_assets.sh || echo "defkv: model/text not fetched; the engine tests will be skipped" >&2
fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build" -j2
cd "$build"
ctest -j2 --output-on-failure --timeout 1500
