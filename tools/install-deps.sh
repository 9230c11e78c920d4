#!/usr/bin/env bash
# Installs what defkv's build, tests and demo need on Debian 12 (idempotent: packages already
# present are not reinstalled). Run as root or with sudo available.
#   tools/install-deps.sh            everything the tests use
#   tools/install-deps.sh --minimal  only the library, the CLI and the C tests
# Besides the Debian packages, the full install makes a Python virtual environment with the
# Hugging Face `tokenizers` package from PyPI (the engine tokenizer test's independent reference):
# ${DEFKV_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/defkv}/venv, about 65 MB. Only tests use it.
set -euo pipefail

core=(build-essential cmake ninja-build pkg-config ccache python3 libopenblas-dev libopenblas0-pthread
      nlohmann-json3-dev libcmocka-dev)
extra=(clang-14 libclang-rt-14-dev libclang1-14 valgrind
       mesa-vulkan-drivers libvulkan-dev libvulkan1 vulkan-tools glslc glslang-tools spirv-tools vulkan-validationlayers
       swig golang-go default-jdk-headless junit5 bindgen python3-pip dpkg-dev
       python3-numpy python3-venv maven libsurefire-java libmaven-compiler-plugin-java libmaven-resources-plugin-java
       python3-dev libdlpack-dev librust-pkg-config-dev librust-half-dev
       openmpi-bin libopenmpi-dev)
pkgs=("${core[@]}")
if [[ "${1:-}" != "--minimal" ]]; then pkgs+=("${extra[@]}"); fi
command -v cargo >/dev/null 2>&1 || pkgs+=(cargo rustc)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "defkv: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The tokenizer reference test's virtual environment (not for --minimal). Failing to make it
# (no network) is not fatal: that test is then skipped, and says why.
if [[ "${1:-}" != "--minimal" ]]; then
  venv="${DEFKV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/defkv}/venv"
  tokenizers_pin="tokenizers==0.21.4"
  if ! "$venv/bin/python" -c 'import tokenizers' >/dev/null 2>&1; then
    echo "defkv: making $venv with $tokenizers_pin from PyPI (for the tokenizer reference test)" >&2
    if ! { /usr/bin/python3 -m venv "$venv" &&
           "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$tokenizers_pin"; } >&2; then
      echo "defkv: could not make $venv; engine_tokenizer_reference will be skipped" >&2
    fi
  fi
fi
