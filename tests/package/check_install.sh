#!/usr/bin/env bash
# Installs the build into a scratch prefix, then builds the README's C example against it
# twice (CMake package config, pkg-config) and runs both. Also checks the SONAME.
set -euo pipefail
build=$1; src=$2; work=$3
rm -rf "$work"; mkdir -p "$work"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
lib=$(find "$work/prefix" -name libdefkv.so.0 | head -n1)
soname=$(readelf -d "$lib" | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
[[ "$soname" == "libdefkv.so.0" ]] || { echo "SONAME is '$soname', expected libdefkv.so.0"; exit 1; }
libdir=$(dirname "$lib")
PKG_CONFIG_PATH="$libdir/pkgconfig" cmake -S "$src" -B "$work/b" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/b" >/dev/null
LD_LIBRARY_PATH="$libdir" "$work/b/example_cmake"
LD_LIBRARY_PATH="$libdir" "$work/b/example_pkgconfig"
# Only the public API is exported.
bad=$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -v '^defkv_' | grep -v '^DEFKV_[0-9]*$' || true)
[[ -z "$bad" ]] || { echo "unexpected exported symbols:"; echo "$bad" | head; exit 1; }
echo "package check passed: SONAME $soname, find_package and pkg-config consumers ran"
