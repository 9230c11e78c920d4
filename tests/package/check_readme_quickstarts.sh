#!/usr/bin/env bash
# Runs bindings/README.md's quick starts as written, against a scratch install prefix: for each
# language given, every ```sh block of its "## Quick start: LANG" section, in order, in a fresh
# directory, with P set to the prefix. Each must print "kept 102 of 512 entries".
# Usage: check_readme_quickstarts.sh BUILD_DIR README WORK_DIR PYTHON LANG...
set -euo pipefail
build=$1; readme=$2; work=$3; python=$4; shift 4
unset LD_LIBRARY_PATH
rm -rf "$work"; mkdir -p "$work"
prefix=$work/prefix
cmake --install "$build" --prefix "$prefix" >/dev/null
# Isolate the tools' per-user state in the scratch directory (not part of the quick starts).
export GOPROXY=off GOTOOLCHAIN=local GOCACHE=$work/go-cache GOPATH=$work/gopath
export CARGO_HOME=$work/cargo-home CARGO_TARGET_DIR=$work/cargo-target
ran=0
for lang in "$@"; do
  script=$work/$lang.sh
  {
    echo "set -euo pipefail"
    echo "P=$prefix"
    echo "python3() { \"$python\" \"\$@\"; }"   # the interpreter the package was built for
    awk -v want="## Quick start: $lang" '
      /^## / { insec = ($0 == want) }
      insec && /^```sh$/ { inblk = 1; next }
      inblk && /^```$/ { inblk = 0; next }
      inblk { print }' "$readme"
  } >"$script"
  grep -q . <(sed 1,3d "$script") || { echo "no quick start for $lang in $readme"; exit 1; }
  mkdir -p "$work/run-$lang"
  out=$(cd "$work/run-$lang" && bash "$script" 2>&1) || { echo "$out"; echo "quick start $lang failed"; exit 1; }
  echo "$out" | tail -n 3
  grep -q "^kept 102 of 512 entries$" <<<"$out" || { echo "quick start $lang did not print the expected line"; exit 1; }
  ran=$((ran + 1))
done
((ran == $#)) && ((ran > 0))
echo "README quick starts passed: $*"
