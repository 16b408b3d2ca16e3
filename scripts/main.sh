#!/usr/bin/env bash
# scripts/main.sh: installs what is missing, builds stowage's main program (Release) and runs it.
#   scripts/main.sh                 runs it on its default arguments (below)
#   scripts/main.sh ARGS...         runs it on ARGS instead
set -euo pipefail

# The main program (a CMake target under examples/) and its default arguments: change this line.
# stowage-generate without arguments runs the bundled tiny Llama split across cpu and disk.
main=(stowage-generate)

caller_dir=$PWD
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
scripts/install-deps.sh
# nvcc on PATH when the CUDA toolkit is installed (optional: everything builds without it).
if [[ -d /usr/local/cuda/bin && ":$PATH:" != *:/usr/local/cuda/bin:* ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

target=${main[0]}
cmake --preset release --log-level=WARNING
cmake --build --preset release --target "$target"
exe=$(find "$repo/build/release" -path '*/CMakeFiles' -prune -o -type f -name "$target" -perm -u+x -print -quit)
if [[ -z "$exe" ]]; then
  echo "main.sh: built target $target but found no executable of that name under build/release" >&2
  exit 1
fi
# The default arguments are relative to the repository; the caller's are relative to the caller.
if (($# > 0)); then args=("$@"); cd "$caller_dir"; else args=("${main[@]:1}"); fi
echo "main.sh: $exe ${args[*]}" >&2
exec "$exe" "${args[@]}"
