#!/usr/bin/env bash
# Installs the build into a scratch prefix, then builds and runs one language's consumer project
# (a copy of tests/package/LANG, outside the source tree) with only the steps that
# bindings/README.md gives for an installed library: no LD_LIBRARY_PATH, no repository paths.
# The consumer compresses a golden case and compares its selection with the expected file.
# Usage: check_binding_consumer.sh LANG BUILD_DIR CONSUMER_SRC WORK_DIR CONFORMANCE_DIR
set -euo pipefail
lang=$1; build=$2; src=$3; work=$4; data=$5
unset LD_LIBRARY_PATH
rm -rf "$work"; mkdir -p "$work"
prefix=$work/prefix
cmake --install "$build" --prefix "$prefix" >/dev/null
case_file=$data/pub2-g1-L300.case.safetensors
expected=$data/pub2-g1-L300.defensivekv.expected.safetensors
app=$work/app
cp -r "$src" "$app"
cd "$app"
# The README's "non-standard prefix" settings.
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
case $lang in
go)
  export GOPROXY=off GOFLAGS=-mod=mod GOTOOLCHAIN=local GOCACHE=$work/go-cache GOPATH=$work/gopath
  go mod edit -replace "github.com/defkv/defkv/bindings/go=$prefix/share/defkv/go"
  go build -o defkv-consumer .
  ./defkv-consumer "$case_file" "$expected"
  go run . "$case_file" "$expected"
  bin=./defkv-consumer ;;
rust)
  export CARGO_TARGET_DIR=$work/target CARGO_HOME=$work/cargo-home
  sed -i "s|@PREFIX@|$prefix|g" Cargo.toml
  cargo run --offline --release -q -- "$case_file" "$expected"
  bin=$CARGO_TARGET_DIR/release/defkv-consumer
  "$bin" "$case_file" "$expected" ;;
java)
  jar=$prefix/share/java/defkv.jar
  javac -cp "$jar" -d classes Consumer.java
  java -cp "$jar:classes" Consumer "$case_file" "$expected"
  bin="" ;;
python)
  export PYTHONPATH=$(echo "$prefix"/lib/python3*/*-packages)
  "${PYTHON:-python3}" consumer.py "$case_file" "$expected"
  bin=$(echo "$PYTHONPATH"/defkv/_native*.so) ;;
*) echo "unknown language $lang"; exit 2 ;;
esac
# The binary finds libdefkv through its own run path, which points into the prefix only.
if [[ -n "$bin" ]]; then
  runpath=$(readelf -d "$bin" | sed -n 's/.*R\(UN\)\?PATH.*\[\(.*\)\]/\2/p')
  IFS=: read -r -a dirs <<<"$runpath"
  ((${#dirs[@]})) || { echo "error: $bin has no run path"; exit 1; }
  for d in "${dirs[@]}"; do
    d=${d//\$ORIGIN/$(dirname "$(realpath "$bin")")}
    d=$(realpath -m "$d")
    [[ "$d" == "$(realpath "$prefix")"/* ]] || { echo "error: $bin has run path entry $d outside the install prefix"; exit 1; }
  done
  loaded=$(ldd "$bin" | sed -n 's/.*libdefkv.so.0 => \([^ ]*\) .*/\1/p')
  [[ -n "$loaded" && "$(realpath "$loaded")" == "$(realpath "$prefix/lib/libdefkv.so.0")" ]] || { echo "error: $bin does not load the installed libdefkv:"; ldd "$bin"; exit 1; }
fi
echo "$lang consumer passed"
