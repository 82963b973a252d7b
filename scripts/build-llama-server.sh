#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` and `llama-batched-bench` from the llama.cpp that
# llama-cpp-python's sdist vendors (the same version corral's runner links), with the same CPU
# flags as corral's build (the build plan of scripts/install-llama.sh), for bench/vs_llama_server.py.
#
#   scripts/build-llama-server.sh stock     # llama.cpp as shipped
#   scripts/build-llama-server.sh patched   # with scripts/patch-llama.py's decode edits, as corral's wheel
#                                           # (its load edits change nothing these binaries measure)
#
# Prints the folder holding the two binaries on its last stdout line (build output goes to
# stderr). The binaries are kept in ~/.cache/corral/llama-server/<key> (CORRAL_LLAMA_SERVER_DIR
# overrides the parent), key = version + CMake options + decode edits, so a second call returns at
# once.
# Statically linked (-DBUILD_SHARED_LIBS=OFF): a shared build leaves the binaries needing
# libllama-server-impl.so and friends from the build tree, which is deleted afterwards.
# Only the two targets are built (~10-20 minutes on 2 cores for both variants).
set -euo pipefail
variant="${1:-stock}"
case "$variant" in stock|patched) ;; *) echo "usage: $0 stock|patched" >&2; exit 2 ;; esac
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
# the build plan of scripts/install-llama.sh (daemon/buildplan.py runs as a plain file)
eval "$("$PY" "$ROOT/daemon/buildplan.py" --shell)"
if [ "$LLAMA_BACKEND" != cpu ]; then
  echo "build-llama-server: corral's build here is $LLAMA_BACKEND; the comparison builds the CPU flags only" >&2
fi
# keep the CPU instruction-set options of the plan (the GPU ones need toolkits this bench doesn't use)
cpu_args=()
for a in $LLAMA_CMAKE_ARGS; do
  case "$a" in -DGGML_CUDA*|-DGGML_HIP*|-DCMAKE_CUDA*|-DAMDGPU*|-DGGML_METAL*) ;; *) cpu_args+=("$a") ;; esac
done
patch_sha=$("$PY" "$HERE/patch-llama.py" --digest decode)
extra=(-DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
       -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release)
parent="${CORRAL_LLAMA_SERVER_DIR:-$HOME/.cache/corral/llama-server}"
dir_of() {  # the cache folder of a variant: key = version + CMake options + decode edits (or "stock")
  local patch_id=stock
  if [ "$1" = patched ]; then patch_id="$patch_sha"; fi
  echo "$parent/$(printf '%s\n' "$VERSION" "${cpu_args[*]}" "${extra[*]}" "$patch_id" | sha256sum | cut -c1-16)"
}
have() { [ -x "$(dir_of "$1")/llama-server" ] && [ -x "$(dir_of "$1")/llama-batched-bench" ]; }
if have "$variant"; then
  dir_of "$variant"
  exit 0
fi
# Every missing variant is built in one tree: stock first, then the patch and an incremental
# rebuild (the patch touches one source file), so the second variant costs a minute, not ten.
missing=()
for v in stock patched; do have "$v" || missing+=("$v"); done
echo "building llama-server + llama-batched-bench (${missing[*]}; llama-cpp-python $VERSION's llama.cpp; ~10 minutes on 2 cores, once)" >&2
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$PY" -m pip download -q --no-cache-dir --no-deps --no-binary :all: -d "$src" "llama-cpp-python==$VERSION" >&2
tar xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
sdist="$src/llama_cpp_python-$VERSION"
cmake -S "$sdist/vendor/llama.cpp" -B "$src/build" "${cpu_args[@]}" "${extra[@]}" >&2
for v in "${missing[@]}"; do
  if [ "$v" = patched ]; then "$PY" "$HERE/patch-llama.py" "$sdist" --only decode; fi
  cmake --build "$src/build" --target llama-server llama-batched-bench -j"${CORRAL_BUILD_JOBS:-2}" >&2
  out=$(dir_of "$v")
  mkdir -p "$out.tmp"
  cp "$src/build/bin/llama-server" "$src/build/bin/llama-batched-bench" "$out.tmp/"
  printf '%s\n' "$v" "${cpu_args[*]} ${extra[*]}" > "$out.tmp/build-plan.txt"
  rm -rf "$out"
  mv "$out.tmp" "$out"
done
dir_of "$variant"
