#!/usr/bin/env bash
# Installs llama-cpp-python into the active Python environment, built with the CPU flags this
# project needs (the default native build segfaults in ggml's AMX matmul on our CPUs) from its
# sdist with the source edits of scripts/patch-llama.py (batched decode speed, see there).
# The wheel is kept in a folder keyed by version + flags + patch, because pip's own wheel cache
# ignores CMAKE_ARGS and would silently reuse a wheel built without them.
set -euo pipefail
LLAMA_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
-DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
PY="${PYTHON:-python}"
PATCHER="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/patch-llama.py"
key=$(printf '%s|%s|%s|%s' "$LLAMA_VERSION" "$CMAKE_ARGS" "$("$PY" -c 'import sys;print(sys.version_info[:2])')" \
      "$(sha256sum < "$PATCHER")" | sha256sum | cut -c1-16)
wheels="${CORRAL_WHEEL_DIR:-$HOME/.cache/corral/wheels}/$key"
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$LLAMA_VERSION')" 2>/dev/null \
   && [ -f "$wheels/.installed-from-here" ] && [ "$(cat "$wheels/.installed-from-here")" = "$("$PY" -c 'import sys;print(sys.prefix)')" ]; then
  exit 0
fi
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_VERSION (takes about 4 minutes, once)" >&2
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  "$PY" -m pip download --no-cache-dir --no-deps --no-binary :all: -d "$src" "llama-cpp-python==$LLAMA_VERSION" >/dev/null
  tar xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
  "$PY" "$PATCHER" "$src/llama_cpp_python-$LLAMA_VERSION"
  mkdir -p "$wheels.tmp"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip wheel --no-cache-dir --no-deps \
      -w "$wheels.tmp" "$src/llama_cpp_python-$LLAMA_VERSION"
  rm -rf "$wheels"; mv "$wheels.tmp" "$wheels"
fi
"$PY" -m pip install --no-deps --force-reinstall --no-index "$wheels"/llama_cpp_python-*.whl >/dev/null
"$PY" -m pip install "llama-cpp-python==$LLAMA_VERSION" --no-index --find-links "$wheels" >/dev/null 2>&1 || \
  "$PY" -m pip install "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3" >/dev/null
"$PY" -c 'import sys;print(sys.prefix)' > "$wheels/.installed-from-here"
