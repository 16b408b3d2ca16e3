#!/usr/bin/env bash
# scripts/install-deps.sh: installs the Debian packages stowage needs, and nothing else.
# Idempotent: each package is checked with dpkg-query first, and apt-get (update + install)
# runs only when something is missing, so a second run installs nothing and needs no network.
#
#   scripts/install-deps.sh          what building the library and its examples needs
#   scripts/install-deps.sh --test   also what the whole test suite needs (tests, clang-format,
#                                    sanitizers, libFuzzer, the Python venv that holds Conan)
#
# The CUDA toolkit is not a Debian package here: it is used when /usr/local/cuda exists and
# skipped otherwise.
set -euo pipefail

# Building the library and the examples (the four header-only dependencies + a toolchain).
build_packages=(
  cmake g++ make
  libeigen3-dev libboost-dev libcereal-dev nlohmann-json3-dev
)
# The test suite: Catch2 v2, Google Benchmark, clang (libFuzzer and its sanitizer runtimes),
# clang-format 14 (the committed .clang-format is checked with it), git (lists the C++ files),
# and a Python that can make a venv for Conan 2 from PyPI.
test_packages=(
  catch2 libbenchmark-dev
  clang libclang-rt-14-dev clang-format-14
  git ca-certificates
  python3 python3-venv python3-pip
)

packages=("${build_packages[@]}")
case "${1:-}" in
  --test) packages+=("${test_packages[@]}") ;;
  "") ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=()
if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
