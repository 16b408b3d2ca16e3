#!/usr/bin/env bash
# scripts/test.sh: installs what is missing, then runs stowage's whole test suite, as CI does
# (.ci/run calls exactly this). Steps, each timed:
#   1. configure + build (preset "ci": Release, tests, examples, CMAKE_VERIFY_INTERFACE_HEADER_SETS)
#      and all_verify_interface_header_sets (every public header compiles alone), then ctest
#   2. clang-format check of every C++ file (fails on an unformatted one)
#   3. cmake --install to a stage prefix; conan/test_package built against it with find_package
#   4. Conan 2 from PyPI in a venv, hermetic CONAN_HOME: conan create with no remote
#   5. the unit tests (tests/unit) again under ASan + UBSan (preset "asan"; STOWAGE_CI_ASAN=0
#      skips it)
#   6. libFuzzer targets in tests/fuzz/*_fuzz.cpp, each run STOWAGE_FUZZ_SECONDS (default 20);
#      a no-op while there are none
# Everything is written under build/ (git-ignored). The CUDA toolkit is used when
# /usr/local/cuda exists; nothing needs a GPU.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
scripts/install-deps.sh --test
# nvcc on PATH when the CUDA toolkit is installed (optional: everything builds without it).
if [[ -d /usr/local/cuda/bin && ":$PATH:" != *:/usr/local/cuda/bin:* ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

build=build
logs="$build/logs"
mkdir -p "$logs"
rm -f "$logs"/ctest-*.log
summary=()
t_all=$SECONDS
step() {  # step NAME COMMAND...: runs one step, records its wall time
  local name=$1 t0=$SECONDS
  shift
  echo
  echo "==== test.sh: $name"
  "$@"
  summary+=("$(printf '%-26s %4ds' "$name" $((SECONDS - t0)))")
}

build_and_test() {
  cmake --preset ci
  cmake --build --preset ci  # all + all_verify_interface_header_sets
  ctest --preset ci 2>&1 | tee "$logs/ctest-ci.log"
}

format_check() {
  local fmt
  fmt=$(command -v clang-format-14 || command -v clang-format)
  local files=()
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    mapfile -d '' files < <(git ls-files -z -co --exclude-standard -- \
      '*.cpp' '*.hpp' '*.h' '*.cc' '*.cxx' '*.cu' '*.cuh' | sort -z)
  else
    mapfile -d '' files < <(find . -path ./build -prune -o -path ./.git -prune -o -type f \
      \( -name '*.cpp' -o -name '*.hpp' -o -name '*.h' -o -name '*.cc' -o -name '*.cxx' \
         -o -name '*.cu' -o -name '*.cuh' \) -print0 | sort -z)
  fi
  local existing=()
  for f in "${files[@]}"; do [[ -f "$f" ]] && existing+=("$f"); done
  echo "$($fmt --version): checking ${#existing[@]} files"
  if ! "$fmt" --dry-run --Werror "${existing[@]}"; then
    echo "test.sh: the files above are not clang-formatted; run: $fmt -i <file>" >&2
    return 1
  fi
}

install_and_consume() {
  rm -rf "$build/stage" "$build/consumer"
  cmake --install build/ci --prefix "$build/stage"
  cmake -S conan/test_package -B "$build/consumer" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$repo/$build/stage"
  cmake --build "$build/consumer" -j2
  "$build/consumer/test_package"
}

conan_create() {
  local venv="$build/conan-venv"
  if [[ ! -x "$venv/bin/conan" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q "conan>=2,<3"
  fi
  export CONAN_HOME="$repo/$build/conan-home"  # hermetic: nothing read from or left in ~/.conan2
  "$venv/bin/conan" --version
  "$venv/bin/conan" create conan -pr:a conan/profiles/debian12-gcc12 --no-remote
}

sanitizers() {
  # Only the unit tests (tests/unit/*.cpp, targets unit_*): rebuilding every conformance test
  # under ASan too would double the build, the largest part of the suite's time.
  # One target for all of them: with one --target per test, make builds one file at a time.
  cmake --preset asan
  cmake --build --preset asan --target stowage_unit_tests
  ctest --preset asan 2>&1 | tee "$logs/ctest-asan.log"  # label "unit" only (see the preset)
}

fuzz() {
  cmake --preset fuzz -DSTOWAGE_FUZZ_SECONDS="${STOWAGE_FUZZ_SECONDS:-20}"
  cmake --build --preset fuzz
  ctest --preset fuzz 2>&1 | tee "$logs/ctest-fuzz.log"
}

step "build + ctest" build_and_test
step "clang-format" format_check
step "install + consumer" install_and_consume
step "conan create" conan_create
if [[ "${STOWAGE_CI_ASAN:-1}" != 0 ]]; then
  step "asan+ubsan ctest" sanitizers
else
  echo "test.sh: ASan/UBSan step skipped (STOWAGE_CI_ASAN=0)"
fi
if compgen -G "tests/fuzz/*_fuzz.cpp" >/dev/null; then
  step "fuzz" fuzz
else
  echo "test.sh: no fuzz targets (tests/fuzz/*_fuzz.cpp); fuzz step skipped"
fi

echo
echo "==== test.sh: all steps passed in $((SECONDS - t_all))s"
printf '  %s\n' "${summary[@]}"
for log in "$logs"/ctest-*.log; do
  echo "  $(basename "$log" .log): $(grep -E 'tests passed|tests failed' "$log" | tail -1)"
done
