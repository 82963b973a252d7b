#!/usr/bin/env bash
# Installs llama-cpp-python into the active Python environment, built for this machine: the
# backend (CPU, CUDA, HIP, Metal) and the CPU instruction sets are chosen by daemon/buildplan.py
# (it prints its choice and the reason; CORRAL_LLAMA_BACKEND=auto|cpu|cuda|hip|metal overrides),
# from the sdist with the source edits of scripts/patch-llama.py (decode and load speed, see there).
# The wheel is kept in a folder keyed by version + backend + flags + Python + patch, because pip's
# own wheel cache ignores CMAKE_ARGS and would silently reuse a wheel built without them.
set -euo pipefail
export LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
LLAMA_VERSION="$LLAMA_CPP_PYTHON_VERSION"
PY="${PYTHON:-python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PATCHER="$HERE/patch-llama.py"
plan=$("$PY" "$HERE/../daemon/buildplan.py" --shell)
eval "$plan"
echo "$LLAMA_REASON" >&2
if [ -n "$LLAMA_WARNINGS" ]; then printf 'warning: %s\n' "$LLAMA_WARNINGS" >&2; fi
export CMAKE_ARGS="$LLAMA_CMAKE_ARGS"
for kv in $LLAMA_ENV; do export "$kv"; done
wheels="${CORRAL_WHEEL_DIR:-$HOME/.cache/corral/wheels}/$LLAMA_KEY"
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$LLAMA_VERSION')" 2>/dev/null \
   && [ -f "$wheels/.installed-from-here" ] && [ "$(cat "$wheels/.installed-from-here")" = "$("$PY" -c 'import sys;print(sys.prefix)')" ]; then
  exit 0
fi
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_VERSION ($LLAMA_BACKEND; about 8 minutes on 2 cores for a CPU build, once)" >&2
  # Sources and CMake's build folder live under a folder of this key until the wheel exists, so
  # an interrupted build (a CUDA build takes hours on two cores) resumes where it stopped.
  work="${CORRAL_BUILD_DIR:-$HOME/.cache/corral/build}/$LLAMA_KEY"
  src="$work/src/llama_cpp_python-$LLAMA_VERSION"
  if [ ! -f "$work/src/.patched" ]; then
    rm -rf "$work"; mkdir -p "$work/src" "$work/sdist"
    "$PY" -m pip download --no-cache-dir --no-deps --no-binary :all: -d "$work/sdist" "llama-cpp-python==$LLAMA_VERSION" >/dev/null
    tar xzf "$work/sdist"/llama_cpp_python-*.tar.gz -C "$work/src"
    "$PY" "$PATCHER" "$src"
    touch "$work/src/.patched"
  else
    echo "resuming the build in $work" >&2
  fi
  rm -rf "$wheels.tmp"; mkdir -p "$wheels.tmp"
  SKBUILD_BUILD_DIR="$work/build" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || sysctl -n hw.ncpu)" \
    "$PY" -m pip wheel --no-cache-dir --no-deps -w "$wheels.tmp" "$src"
  printf '%s\n' "$LLAMA_BACKEND" "$CMAKE_ARGS" > "$wheels.tmp/build-plan.txt"
  rm -rf "$wheels"; mv "$wheels.tmp" "$wheels"
  rm -rf "$work"
fi
"$PY" -m pip install --no-deps --force-reinstall --no-index "$wheels"/llama_cpp_python-*.whl >/dev/null
"$PY" -m pip install "llama-cpp-python==$LLAMA_VERSION" --no-index --find-links "$wheels" >/dev/null 2>&1 || \
  "$PY" -m pip install "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3" >/dev/null
"$PY" -c "$(printf 'import json, sys\njson.dump({"backend": sys.argv[1], "cmake_args": sys.argv[2], "key": sys.argv[3], "version": sys.argv[4], "patch_sha256": sys.argv[5]}, open(sys.argv[6], "w"))')" \
  "$LLAMA_BACKEND" "$CMAKE_ARGS" "$LLAMA_KEY" "$LLAMA_VERSION" "$(sha256sum < "$PATCHER" | cut -c1-64)" \
  "$("$PY" -c 'import sys;print(sys.prefix)')/corral-llama-build.json"
"$PY" -c 'import sys;print(sys.prefix)' > "$wheels/.installed-from-here"
