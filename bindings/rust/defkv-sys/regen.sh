#!/bin/sh
# Regenerates src/bindings.rs from the public C header with Debian's bindgen (0.60).
# Usage: regen.sh [OUTPUT]   (default: src/bindings.rs next to this script)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
header="$here/../../../capi/include/defkv/defkv.h"
out="${1:-$here/src/bindings.rs}"
exec bindgen --size_t-is-usize --no-layout-tests \
  --allowlist-function 'defkv_.*' --allowlist-type 'defkv_.*' --allowlist-var 'DEFKV_.*' \
  "$header" -o "$out"
